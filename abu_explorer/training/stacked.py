"""Several leave-K-out UNet retrains in lockstep, as one stacked model (``torch.func``), for accelerators.

Each of the M models follows ``train.train_unet``'s recipe exactly: the same initial weights (same seed),
its own rows in the same seeded order, the same timesteps, noise and caption dropout per step (they depend
on the step alone), the same AdamW and warm-up/cosine schedule, and gradient clipping per model. Only the
arithmetic differs (batched kernels). One step of M models launches the kernels of one, which is what a GPU
needs when a single small UNet leaves it idle between launches.

Notation: params[name] is (M, *shape), model m's slice is params[name][m]; every removal set has the same
size, so every model has the same number of rows, batches and steps.
"""
from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call, stack_module_state, vmap

from abu_explorer.model import components
from abu_explorer.training import train


def train_unets_stacked(unet_config: dict, scheduler, latents: torch.Tensor, text_states: torch.Tensor,
                        null_state: torch.Tensor, cfg: train.StageConfig, excludes: list[set[int]],
                        device: str | torch.device = "cpu", on_epoch_end=None) -> tuple[list[dict], dict]:
    """Returns (one state dict per removal set, log with per-model mean loss per epoch and seconds)."""
    # 1. checks: the lockstep needs equal row counts, and the recipe's features implemented here
    if cfg.extra.get("ema_decay"):
        raise ValueError("train_unets_stacked does not keep a weight EMA; retrain one cell at a time (--stack 1)")
    n, m_count = len(latents), len(excludes)
    if m_count == 0 or len({len(e) for e in excludes}) != 1:
        raise ValueError(f"need one or more removal sets of equal size, got sizes {[len(e) for e in excludes]}")
    bad = sorted(i for e in excludes for i in e if not 0 <= i < n)
    if bad:
        raise ValueError(f"removal sets hold indices outside [0, {n}): {bad[:5]}")
    dev = torch.device(device)
    # 2. M identical initial models (as train_unet: seeded build), stacked
    torch.manual_seed(cfg.seed)
    template = components.build_unet(unet_config).to(dev).eval()  # eval: its dropouts (p = 0) draw nothing
    # Attention keeps diffusers' SDPA processor, as the shipped model's training did: vmap loops over the M
    # models there (no batching rule), while the plain-matmul processor, fully batched, drifts from the
    # one-at-a-time run by more than float rounding after a few AdamW steps (tests/test_train_stacked.py).
    params, buffers = stack_module_state([template] * m_count)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def one(p, b, x, t, c):
        return functional_call(template, (p, b), (x, t, c), kwargs={"return_dict": False})[0]

    batched = vmap(one, in_dims=(0, 0, 0, None, 0), randomness="error")
    # 3. data on the device; each model's rows in train_unet's order
    latents, text_states, null_state = latents.to(dev), text_states.to(dev), null_state.to(dev)
    rows = [torch.tensor([i for i in range(n) if i not in e], dtype=torch.long) for e in excludes]
    snr = (scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)).to(dev)
    gamma, flips = cfg.extra["min_snr_gamma"], latents.dim() == 5
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows[0]) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    log = {"loss": [], "seconds": 0.0}
    for epoch in range(cfg.epochs):
        t0, losses = time.time(), []
        per_model = [train.epoch_batches(r, epoch, cfg) for r in rows]
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step, total, cfg)
            # 4. the step's draws (shared by all models), each model's own batch
            batch = torch.stack([b[i] for b in per_model]).to(dev)  # (M, B)
            bsz = batch.shape[1]
            side, t, noise, drop = train.unet_step_draws(step, bsz, latents.shape[-3:], flips,
                                                         scheduler.config.num_train_timesteps, cfg)
            x0 = latents[batch, side.to(dev)[None].expand_as(batch)] if flips else latents[batch]
            noise, drop = noise.to(dev), drop.to(dev)
            t = t.to(dev)
            ctx = torch.where(drop[None, :, None, None], null_state.expand(bsz, -1, -1)[None], text_states[batch])
            xt = scheduler.add_noise(x0.flatten(0, 1), noise.repeat(m_count, 1, 1, 1), t.repeat(m_count))
            pred = batched(params, buffers, xt.view_as(x0), t, ctx)
            weight = snr[t].clamp(max=gamma) / snr[t] if gamma else torch.ones(bsz, device=dev)
            loss = (weight * (pred - noise).pow(2).mean(dim=(2, 3, 4))).mean(dim=1)  # (M,)
            # 5. backward, clip each model's gradient as clip_grad_norm_ does, AdamW
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            if cfg.max_grad_norm:
                grads = [p.grad for p in params.values()]
                norms = torch.stack([gr.flatten(1).pow(2).sum(1) for gr in grads]).sum(0).sqrt()  # (M,)
                coef = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                for gr in grads:
                    gr.mul_(coef.view(-1, *[1] * (gr.dim() - 1)))
            opt.step()
            losses.append(loss.detach().cpu())
        log["loss"].append(torch.stack(losses).mean(0).tolist())
        log["seconds"] += time.time() - t0
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, log)
    states = [{k: v[m].detach().clone() for k, v in params.items()} for m in range(m_count)]
    return states, log
