"""Journey-TRAK (Georgiev, Vendrow, Salman, Park, Madry 2023, "The Journey, Not the Destination: How Data Guides
Diffusion Models"): attribute a generated image along its own sampling trajectory, not at fresh noise on the
final image.

At each sampling step t the sampler predicts a clean latent x0_hat_t; the query's output at that step is the
DDPM loss of x0_hat_t renoised at the same t with fresh noise. The paper shows one attribution per step; as
the D-TRAK authors' re-implementation does, this method averages the query gradient over every step of the
trajectory and ranks once. The training side is TRAK's (the DDPM-loss gradient features of ``trak.py``), so it
has no tables of its own.

# Notation (code -> paper)
#   record                  -> the trajectory {(t, x0_hat_t)}, replayed from the query's prompt, seed and settings
#   f_t(q) = ||eps - eps_theta(sqrt(abar_t) x0_hat_t + sqrt(1 - abar_t) eps, t)||^2   (eps keyed by the step)
#   phi(q) = P^T mean_t grad_theta f_t(q)   -> the query's feature, P the projection of the training features
#   scores = Phi (Phi^T Phi + lambda I)^-1 phi(q)
"""
from __future__ import annotations

import torch

from abu_explorer.attribution import params
from abu_explorer.attribution.ddpm_loss import ddpm_losses, item_noise
from abu_explorer.attribution.dtrak import QUERY_ROW, project
from abu_explorer.attribution.trak import Trak


class JourneyTrak(Trak):
    """TRAK's features and kernel (``DTrak.score``); only the query's feature differs."""

    name = "journey"
    box_note = "box-masked loss along the trajectory"

    def trajectory(self, query) -> list[tuple[int, torch.Tensor]]:
        """The query's sampling steps (timestep, x0_hat), replayed: sampling is deterministic, and the replay
        must end at the query's own latent."""
        src = query.source
        if src.get("type") != "generated":
            raise ValueError("Journey-TRAK attributes a generated image along its sampling trajectory; an "
                             f"{src.get('type', 'unknown')} image has none (use trak)")
        record: list = []
        g = self.explorer.generate(query.prompt, src["seed"], src["steps"], src.get("guidance"), record=record)
        if not torch.equal(g.latent, query.latent):
            raise ValueError("the replayed trajectory does not end at the query's latent (another model or sampler?)")
        return [(t, x0[0]) for t, x0 in record]

    def query_feature(self, query) -> torch.Tensor:
        unet, sched, cfg = self.explorer.unet, self.explorer.scheduler, self.cfg
        steps = self.trajectory(query)
        ts = torch.tensor([t for t, _ in steps])
        x0 = torch.stack([x for _, x in steps])
        shape = tuple(x0.shape[1:])
        noise = torch.stack([item_noise(cfg.noise_seed, QUERY_ROW, 0, t, shape) for t, _ in steps])
        ctx = self.explorer.encode_text([query.prompt]).expand(len(steps), -1, -1)
        sel = params.select(unet, cfg.selection)
        with params.only_grad_for(unet, sel):
            loss = ddpm_losses(unet, sched, x0, ts, noise, ctx, query.mask).mean()
            grads = torch.autograd.grad(loss, list(sel.values()))
        return project(torch.cat([g.reshape(-1) for g in grads])[None], cfg.proj_dim, cfg.projection_seed)[0]
