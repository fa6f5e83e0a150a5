"""Deterministic sampling (DDIM or DPM-Solver++) with classifier-free guidance, both branches in one batched
UNet call."""
from __future__ import annotations

from collections.abc import Callable

import torch

MIN_STEPS, MAX_STEPS = 1, 1000


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting latent of a seed. The same (seed, shape) gives the same noise on every machine."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


@torch.inference_mode()
def ddim_sample(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                steps: int = 50, guidance: float = 3.0,
                callback: Callable[[int, int], None] | None = None, record: list | None = None) -> torch.Tensor:
    """Deterministic sampling with ``scheduler`` (DDIM at eta = 0, or any diffusers multistep solver).
    cond/uncond: (B, L, D) text states; noise: (B, C, h, w). ``record``, when given, receives each step's
    (timestep, predicted clean latents (B, C, h, w)) as the scheduler computed them (DDIM reports them).

    Returns the final latents (B, C, h, w) in the UNet's (scaled) latent space.
    """
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {steps}")
    if guidance < 0 or guidance > 50:
        raise ValueError(f"guidance must be in [0, 50], got {guidance}")
    scheduler.set_timesteps(steps)
    x = noise.clone()
    batch = len(x)
    context = torch.cat([uncond.expand(batch, -1, -1), cond]) if guidance != 1.0 else cond
    step_kwargs = {"eta": 0.0} if type(scheduler).__name__ == "DDIMScheduler" else {}
    for i, t in enumerate(scheduler.timesteps):
        if guidance != 1.0:
            eps_u, eps_c = unet(torch.cat([x, x]), t, context).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(x, t, context).sample
        out = scheduler.step(eps, t, x, **step_kwargs)
        x = out.prev_sample
        if record is not None:
            if getattr(out, "pred_original_sample", None) is None:
                raise ValueError(f"the {type(scheduler).__name__} sampler does not report its predicted clean "
                                 "latents; replay the trajectory with DDIM")
            record.append((int(t), out.pred_original_sample.clone()))
        if callback is not None:
            callback(i + 1, steps)
    return x
