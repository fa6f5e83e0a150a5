"""Attribution by Unlearning (Wang, Hertzmann, Efros, Zhu, Zhang; NeurIPS 2024, arXiv 2406.09408).

Unlearn the query by a Fisher-preconditioned step of gradient *ascent* on its DDPM loss, restricted to
cross-attention key/value weights, then measure how much each training image's loss went up.

# Notation (code -> paper)
#   query.latent, query.prompt     -> z^ (the synthesized image's latent and its caption)
#   theta0 / theta_new             -> theta_0 / theta_hat^{-z^} (pretrained / unlearned weights)
#   fisher                         -> F, diagonal Fisher information of the training loss
#   n_train                        -> N, training set size
#   cfg.alpha                      -> alpha, the unlearning step size
#   grad                           -> grad_theta L(z^, theta), averaged over (noise, timestep) samples
#   step: theta += alpha/N F^-1 grad -> Newton step of the EWC objective -L(z^) + N/2 (th-th0)^T F (th-th0)
#   base_losses / after            -> L(z, theta_0) / L(z, theta_hat) at fixed timesteps and fixed noise
#   scores                         -> tau(z^, z) = L(z, theta_hat) - L(z, theta_0), max over flips
#
# Fast mode (ours, beyond the paper): a screen ranks every row by how far the unlearning step moves the
# cross-attention *values* of its caption, sum over to_v layers and tokens of ||dW_v c_z||^2 (c_z: the
# row's text states). It needs no UNet pass and no stored features; the top-M rows are then rescored
# exactly with theta_hat. (A first-order screen g_z . dtheta failed here: at the tuned alpha the step is
# far from linear, Spearman(first-order, exact) ~ 0.1; see docs/methods.md.)
#
# Box contrast (ours, ``box_contrast``): a box query is unlearned twice, once with the loss inside the box and
# once with the loss outside it, and a row scores tau_box - tau_rest. Both steps share the caption, so what the
# caption alone drives (on the embedded model: the first-named concept) cancels, and what remains is what the
# box's pixels add. Twice the cost of a plain box query. The two steps differ in size, so with
# ``box_contrast_scaled`` each side is first divided by its median |tau| over all rows (exact mode only):
# tau_box / med|tau_box| - tau_rest / med|tau_rest|.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from abu_explorer.attribution import Ranking
from abu_explorer.attribution.abu_precompute import AbUConfig, AbUTables
from abu_explorer.attribution.ddpm_loss import ddpm_losses, loss_table
from abu_explorer.attribution.gradients import random_draw
from abu_explorer.attribution.params import only_grad_for, select
from abu_explorer.attribution.settings import method_settings


class AbU:
    """``AbU(explorer, tables).score(query, mode="fast"|"exact")``."""

    name = "abu"

    def __init__(self, explorer, tables: AbUTables, cache=None):
        self.explorer = explorer
        self.tables = tables
        self.cfg: AbUConfig = tables.config
        self.cache = cache or explorer.training_cache()
        self.unet = explorer.unet
        self.selected = select(self.unet, self.cfg.selection)
        self.last_screen: torch.Tensor | None = None  # the fast mode's first-order prediction, for diagnostics

    @classmethod
    def load(cls, explorer, folder=None, **overrides):
        from abu_explorer.attribution.abu_precompute import (
            TABLE_FIELDS,
            default_folder,
            load_tables,
        )

        fixed = sorted(set(overrides) & set(TABLE_FIELDS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} are fixed by the precomputed tables; rerun precompute to change them")
        tables = load_tables(explorer, folder)
        if overrides:
            tables = dataclasses.replace(tables, config=dataclasses.replace(tables.config, **overrides))
        method = cls(explorer, tables)
        method.folder = Path(folder or default_folder(explorer))
        return method

    def settings(self) -> dict:
        """What changes this method's ranking: its settings and a hash of its precomputed tables."""
        return method_settings(self.cfg, self.folder)

    # --- 1. unlearning ---------------------------------------------------------------------------

    def query_gradient(self, query, step: int = 0) -> torch.Tensor:
        """grad_theta of the query's (optionally box-masked) DDPM loss, averaged over random draws (fresh draws
        for each unlearning step)."""
        cfg, sched = self.cfg, self.explorer.scheduler
        ctx = self.explorer.encode_text([query.prompt])
        params = list(self.selected.values())
        total = [torch.zeros_like(p) for p in params]
        shape = tuple(query.latent.shape)
        T = sched.config.num_train_timesteps
        with only_grad_for(self.unet, self.selected):
            for start in range(0, cfg.unlearn_samples, cfg.batch_size):
                idx = range(start, min(start + cfg.batch_size, cfg.unlearn_samples))
                draws = [random_draw(cfg.unlearn_seed, s, step, shape, T) for s in idx]
                t = torch.tensor([d[0] for d in draws])
                noise = torch.stack([d[1] for d in draws])
                x0 = query.latent[None].expand(len(idx), -1, -1, -1)
                loss = ddpm_losses(self.unet, sched, x0, t, noise, ctx.expand(len(idx), -1, -1), query.mask)
                grads = torch.autograd.grad(loss.sum(), params)
                for acc, g in zip(total, grads):
                    acc += g
        return torch.cat([g.reshape(-1) for g in total]) / cfg.unlearn_samples

    def unlearn(self, query) -> torch.Tensor:
        """dtheta = theta_hat - theta_0 (flat), after ``unlearn_steps`` Newton steps."""
        cfg = self.cfg
        inv_f = 1.0 / (self.tables.fisher + cfg.fisher_damping).clamp(min=1e-30)
        n_train = self.cache.num_images
        delta = torch.zeros_like(self.tables.fisher)
        for step in range(cfg.unlearn_steps):
            with self.applied(delta):
                grad = self.query_gradient(query, step)
            delta = delta + (cfg.alpha / n_train) * inv_f * grad
        return delta

    def applied(self, delta: torch.Tensor):
        """Context manager: the UNet with theta_0 + delta on the selected weights, restored after."""
        return _Applied(self.selected, delta)

    # --- 2. scoring ------------------------------------------------------------------------------

    def rescore(self, delta: torch.Tensor, rows: torch.Tensor, progress=None) -> torch.Tensor:
        """Exact tau for image ``rows``: the loss change (mean over fixed timesteps and the image's captions),
        max over flips."""
        cfg, cache = self.cfg, self.cache
        captions = cache.caption_rows(rows)
        with self.applied(delta):
            after = loss_table(self.unet, self.explorer.scheduler, cache.latents, cache.text_states,
                               self.tables.timesteps, cfg.noise_seed, cfg.batch_size, captions, progress,
                               cache.caption_image)
        change = cache.per_image((after - self.tables.base_losses[captions]).mean(dim=2), rows)  # (R, F)
        return change.max(dim=1).values

    def screen(self, delta: torch.Tensor) -> torch.Tensor:
        return self.cache.per_image(value_shift(self.selected, delta, self.cache.text_states, self.cfg.selection))

    def contrast_query(self, query):
        """The query with its loss measured outside the box (None: no box, contrast off, or a box covering all)."""
        from abu_explorer.attribution.query import Query

        if not self.cfg.box_contrast or query.mask is None or float((1 - query.mask).sum()) <= 0:
            return None
        return Query(query.latent, query.prompt, query.source, query.image_size, query.box, 1 - query.mask)

    def score(self, query, mode: str = "fast", progress=None) -> Ranking:
        if mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
        rest = self.contrast_query(query)
        if mode == "fast" and self.cfg.box_contrast_scaled and rest is not None:
            raise ValueError("box_contrast_scaled needs exact mode: its scale is the median over every row")
        phases = {}
        t0 = time.perf_counter()
        # 1. unlearn the query (and, for a box contrast, the rest of the image)
        delta = self.unlearn(query)
        rest_delta = None if rest is None else self.unlearn(rest)
        phases["unlearn"] = time.perf_counter() - t0
        scaled = " (each over its median |change|)" if self.cfg.box_contrast_scaled else ""
        note = (f"box contrast: loss change after unlearning the box minus after unlearning the rest{scaled}; "
                if rest else "")

        def measure(rows):
            out = self.rescore(delta, rows, progress)
            if rest_delta is None:
                return out
            other = self.rescore(rest_delta, rows)
            return on_one_scale(out) - on_one_scale(other) if self.cfg.box_contrast_scaled else out - other

        n = self.cache.num_images
        if mode == "exact":
            # 2. re-measure every training image at the fixed timesteps and noise
            t1 = time.perf_counter()
            scores = measure(torch.arange(n))
            phases["scan"] = time.perf_counter() - t1
            return Ranking(self.name, scores, time.perf_counter() - t0, "exact", phases, notes=note.rstrip("; "))
        # 2. screen all rows by the value shift of their captions
        t1 = time.perf_counter()
        predicted = self.last_screen = self.screen(delta) - (0 if rest_delta is None else self.screen(rest_delta))
        phases["screen"] = time.perf_counter() - t1
        # 3. rescore the top-M exactly; the rest are ranked below them in screen order
        t2 = time.perf_counter()
        m = min(self.cfg.screen_candidates, n)
        rows = torch.sort(-predicted, stable=True).indices[:m]
        exact = measure(rows)
        phases["rescore"] = time.perf_counter() - t2
        scores = fill_below(n, rows, exact, predicted)
        return Ranking(self.name, scores, time.perf_counter() - t0, "fast", phases, exact_rows=rows,
                       notes=note + (f"all {n} rows rescored exactly (fewer rows than screen candidates)" if m >= n else
                                     f"the {m} of {n} rows with the largest value shift rescored exactly; "
                                     "the others are ranked below them by the screen (their scores are placeholders)"))


def value_shift(selected: dict, delta: torch.Tensor, states: torch.Tensor, selection: str,
                block: int = 4096) -> torch.Tensor:
    """Screen: sum over attn2.to_v layers and caption tokens of ||dW_v c_z||^2 per row (states: (N, L, D)),
    ``block`` rows at a time: the (rows, L, out) products never exist for all N at once."""
    layers = []
    i = 0
    for name, p in selected.items():
        if ".attn2.to_v." in name and name.endswith("weight"):
            layers.append(delta[i:i + p.numel()].view_as(p))
        i += p.numel()
    if not layers:
        raise ValueError(f"fast mode needs attn2.to_v weights in the selection ({selection!r}); use --mode exact")
    shift = torch.zeros(len(states))
    for start in range(0, len(states), block):
        c = states[start:start + block]
        shift[start:start + len(c)] = sum(torch.einsum("oi,nli->nlo", dw, c).pow(2).sum(dim=(1, 2)) for dw in layers)
    return shift


def on_one_scale(tau: torch.Tensor) -> torch.Tensor:
    """tau over its median absolute value (a zero median leaves tau as it is)."""
    m = tau.abs().median()
    return tau / m if float(m) > 0 else tau


def fill_below(n: int, rows: torch.Tensor, exact: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Scores for all n rows: ``exact`` on ``rows``, the rest strictly below them in ``predicted`` order."""
    scores = torch.empty(n)
    scores[rows] = exact
    rest = torch.ones(n, dtype=torch.bool)
    rest[rows] = False
    if rest.any():  # placeholders, not measurements
        others = torch.nonzero(rest).squeeze(1)
        others = others[torch.sort(-predicted[others], stable=True).indices]
        scores[others] = exact.min() - 1e-6 * torch.arange(1, len(others) + 1, dtype=scores.dtype)
    return scores


class _Applied:
    def __init__(self, selected: dict, delta: torch.Tensor):
        self.selected, self.delta, self.saved = selected, delta, None

    def __enter__(self):
        self.saved = {n: p.detach().clone() for n, p in self.selected.items()}
        i = 0
        with torch.no_grad():
            for p in self.selected.values():
                p.add_(self.delta[i:i + p.numel()].view_as(p))
                i += p.numel()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, p in self.selected.items():
                p.copy_(self.saved[n])
        return False
