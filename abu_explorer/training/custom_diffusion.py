"""Custom Diffusion (Kumari, Zhang, Zhang, Shechtman, Zhu; CVPR 2023) on a model backend: teach it a new
concept from a few exemplar images.

Trained: the cross-attention key/value projections of the UNet and the embedding of one new modifier token
(initialised from a related word). Everything else stays frozen. Each step draws, from a generator seeded by
(seed, step), a batch of exemplars (with replacement), a timestep and noise per item; with ``prior_rows`` > 0 a
second half-batch of training rows keeps the base model's behaviour on their own captions (prior preservation,
weight ``prior_weight``). The same (seed, exemplars, settings) give the same delta, bit for bit.

# Notation (code -> paper)
#   token / init_word    -> V* and the category word it is initialised from
#   caption              -> "V* category", the exemplars' training text
#   kv + token row       -> the trained parameters (W_k, W_v of every cross-attention; V*'s embedding)
#   prior rows           -> the regularisation set (here training rows, not retrieved images)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from abu_explorer.attribution.ddpm_loss import ddpm_losses
from abu_explorer.model import components
from abu_explorer.model.customized import attach_token, kv_weights


@dataclass(frozen=True)
class CustomConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3  # K/V weights (AdamW, constant after warmup)
    token_lr: float = 1e-2  # the modifier's embedding
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    prior_rows: tuple[int, ...] = ()  # training rows mixed into every step (prior preservation); () = none
    prior_weight: float = 1.0
    seed: int = 0
    token: str = "<new1>"

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("Custom Diffusion: steps and batch_size must be >= 1")
        if not (self.lr > 0 and self.token_lr >= 0):
            raise ValueError("Custom Diffusion: lr must be > 0 and token_lr >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prior_rows"] = list(self.prior_rows)
        return d


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def finetune(explorer, exemplars: torch.Tensor, init_word: str, cfg: CustomConfig = CustomConfig(),
             progress: bool = False) -> dict:
    """Customize ``explorer`` in place on ``exemplars`` ((E, 3, H, W) in [-1, 1]); returns the training log.
    The exemplars' caption is ``f"{cfg.token} {init_word}"``."""
    from tqdm.auto import tqdm

    # 1. the new token and the trainable parameters
    token_row = attach_token(explorer, cfg.token, init_word)
    caption = f"{cfg.token} {init_word}"
    kv = kv_weights(explorer.unet)
    unet, sched = explorer.unet, explorer.scheduler
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in kv.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(kv.values()), "lr": cfg.lr},
                             {"params": [token_row], "lr": cfg.token_lr}], weight_decay=0.0)
    peaks = [cfg.lr, cfg.token_lr]
    # 2. fixed inputs: exemplar latents; prior rows' latents and caption states (the frozen text path)
    latents = explorer.encode_images(exemplars)
    prior = torch.tensor(cfg.prior_rows, dtype=torch.long)
    if len(prior):
        cache = explorer.training_cache()
        lat = cache.latents[:, 0] if cache.latents.dim() == 5 else cache.latents
        prior_lat, prior_states = lat[prior].clone(), cache.text_states[prior].clone()
    ids = explorer.tokenizer([caption])
    tower = explorer.clip
    losses, t0 = [], time.perf_counter()
    unet.train(False)
    for step in tqdm(range(cfg.steps), desc="custom diffusion", disable=not progress):
        # 3. one step: exemplars (and prior rows) at random timesteps and noise
        g = _generator(cfg.seed, step)
        pick = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=g)
        with torch.enable_grad():
            ctx = components.text_hidden_states(tower, ids).expand(cfg.batch_size, -1, -1)
            loss = ddpm_losses(unet, sched, latents[pick], t, noise, ctx).mean()
            if len(prior):
                half = max(1, cfg.batch_size // 2)
                pp = torch.randint(0, len(prior), (half,), generator=g)
                pt = torch.randint(0, sched.config.num_train_timesteps, (half,), generator=g)
                pn = torch.randn((half, *latents.shape[1:]), generator=g)
                loss = loss + cfg.prior_weight * ddpm_losses(unet, sched, prior_lat[pp], pt, pn, prior_states[pp]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(kv.values()) + [token_row], cfg.max_grad_norm)
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * warm
        opt.step()
        losses.append(float(loss.detach()))
    for p in unet.parameters():
        p.requires_grad_(False)
    token_row.requires_grad_(False)
    explorer._training_cache = None  # the caption states of rows holding the token changed
    tail = losses[-max(1, cfg.steps // 10):]
    return {"caption": caption, "seconds": round(time.perf_counter() - t0, 1), "first_loss": losses[0],
            "final_loss": sum(tail) / len(tail), "config": cfg.to_dict()}
