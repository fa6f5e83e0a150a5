"""Training of the embedded model, stage by stage: autoencoder -> CLIP -> UNet.

Every stage is deterministic from its seed: the batch order of epoch e comes from a generator seeded
with (seed, e), the noise of step s from one seeded with (seed, s). Resuming from a checkpoint (taken
at epoch boundaries) therefore continues exactly as an uninterrupted run would. The UNet stage takes an
``exclude`` set: leave-K-out retraining drops those rows from every batch and is otherwise identical.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from abu_explorer.training import checkpoint


@dataclass(frozen=True)
class StageConfig:
    """Optimisation recipe of one stage. Saved next to the weights it produced."""

    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    ckpt_every_epochs: int = 1
    snapshot_every_epochs: int = 0  # keep UNet weights every k epochs (quality-vs-time curve); 0 = off
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The shipped recipes (docs/model-research.md: 150 autoencoder epochs and a UNet peak rate of 3e-3 gave the
# sharper model; the UNet recipe is also what every leave-K-out and LDS retrain re-runs).
AE_RECIPE = StageConfig(epochs=150, batch_size=32, lr=1e-3, warmup_steps=200, max_grad_norm=0.0, seed=0,
                        extra={"kl_weight": 1e-6, "l1_weight": 0.1, "holdout_every": 20, "bf16_autocast": "auto"})
# Phase 2 of the autoencoder stage: the encoder frozen (every latent, and so the UNet and every latent-space
# table, stays as it was), the decoder trained further on the encoder's mode latents.
AE_DECODER_RECIPE = StageConfig(epochs=40, batch_size=32, lr=3e-4, warmup_steps=100, max_grad_norm=0.0, seed=1,
                                extra={"l1_weight": 0.1, "holdout_every": 20, "bf16_autocast": "auto"})
CLIP_RECIPE = StageConfig(epochs=80, batch_size=256, lr=1e-3, warmup_steps=100, weight_decay=0.1, seed=0)
UNET_RECIPE = StageConfig(epochs=150, batch_size=128, lr=3e-3, warmup_steps=200, seed=0,
                          snapshot_every_epochs=25, extra={"cfg_dropout": 0.1, "min_snr_gamma": 5.0})


def _gen(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return g.manual_seed(seed)


def lr_at(step: int, total: int, cfg: StageConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(rows: torch.Tensor, epoch: int, cfg: StageConfig) -> list[torch.Tensor]:
    """The batches of one epoch: a seeded permutation of ``rows`` cut into full batches (last kept)."""
    perm = rows[torch.randperm(len(rows), generator=_gen(cfg.seed, 1, epoch))]
    return list(perm.split(cfg.batch_size))


def _loop(name: str, model, rows: torch.Tensor, cfg: StageConfig, step_fn, run_dir: Path | None,
          progress: bool = True, on_epoch_end=None, after_step=None, extra_state: dict | None = None) -> dict:
    """Shared optimisation loop. ``step_fn(batch_rows, step) -> loss``; returns a log dict.

    ``after_step(step)`` runs after each optimiser step; ``extra_state`` (named tensors, e.g. an EMA of the
    weights) is saved in and restored from the checkpoint with the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    start_epoch, log = 0, {"loss": [], "seconds": 0.0}
    ckpt = run_dir / f"{name}-ckpt.safetensors" if run_dir else None
    if ckpt is not None and ckpt.exists():
        state = checkpoint.load(ckpt, model, opt, extra_state)
        if state["config"] != cfg.to_dict():
            raise RuntimeError(f"{ckpt} was written by another recipe; delete it to start over")
        start_epoch, log = state["epoch"], state["log"]
    model.train()
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=f"train {name}", disable=not progress)
    for epoch in range(start_epoch, cfg.epochs):
        t0, losses = time.time(), []
        for i, batch in enumerate(epoch_batches(rows, epoch, cfg)):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = step_fn(batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if after_step is not None:
                after_step(step)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log["loss"].append(sum(losses) / len(losses))
        log["seconds"] += time.time() - t0
        if ckpt is not None and ((epoch + 1) % cfg.ckpt_every_epochs == 0 or epoch + 1 == cfg.epochs):
            checkpoint.save(ckpt, model, opt, {"epoch": epoch + 1, "log": log, "config": cfg.to_dict()}, extra_state)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, log)
    bar.close()
    model.eval()
    return log


# --- stage 1: autoencoder ------------------------------------------------------------------------


def holdout_rows(n: int, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(n)
    return idx[idx % every != 0], idx[idx % every == 0]


def _shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation with white padding (images are on white, value +1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _shift_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The autoencoder's augmentation: a random shift, then a mirror image for half the rows."""
    x = _shift_augment(x, g)
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], mapped to [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_autoencoder(vae, images: torch.Tensor, cfg: StageConfig = AE_RECIPE, run_dir: Path | None = None,
                      progress: bool = True) -> dict:
    """images: (N, 3, H, W) in [-1, 1]. Holds out every ``holdout_every``-th image to report PSNR."""
    torch.manual_seed(cfg.seed)
    train_rows, held = holdout_rows(len(images), cfg.extra["holdout_every"])
    # bf16 autocast halves the AE step on CPUs with AVX512-BF16/AMX, and is 10x slower without them.
    from abu_explorer.model.components import cpu_supports_bf16

    use_bf16 = cfg.extra.get("bf16_autocast") == "auto" and cpu_supports_bf16()

    def step_fn(batch, step):
        g = _gen(cfg.seed, 2, step)
        x = _shift_flip(images[batch], g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample.float()
        kl = post.kl().float().mean() / x[0].numel()
        return F.mse_loss(rec, x) + cfg.extra["l1_weight"] * F.l1_loss(rec, x) + cfg.extra["kl_weight"] * kl

    log = _loop("autoencoder", vae, train_rows, cfg, step_fn, run_dir, progress)
    log["bf16_autocast"] = use_bf16
    log["heldout_psnr_db"] = reconstruction_psnr(vae, images[held])
    log["train_psnr_db"] = reconstruction_psnr(vae, images[train_rows[:256]])
    return log


def finetune_decoder(vae, images: torch.Tensor, cfg: StageConfig = AE_DECODER_RECIPE, run_dir: Path | None = None,
                     progress: bool = True) -> dict:
    """Train the decoder alone on the frozen encoder's mode latents (what the UNet learns to produce and the
    held-out PSNR decodes). The same rows are held out as in phase 1; the encoder's weights are untouched."""
    from abu_explorer.model.components import cpu_supports_bf16

    torch.manual_seed(cfg.seed)
    train_rows, held = holdout_rows(len(images), cfg.extra["holdout_every"])
    use_bf16 = cfg.extra.get("bf16_autocast") == "auto" and cpu_supports_bf16()
    frozen = [p for name, p in vae.named_parameters() if not name.startswith(("decoder.", "post_quant_conv."))]
    for p in frozen:
        p.requires_grad_(False)

    def step_fn(batch, step):
        x = _shift_flip(images[batch], _gen(cfg.seed, 5, step))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            rec = vae.decode(z).sample.float()
        return F.mse_loss(rec, x) + cfg.extra["l1_weight"] * F.l1_loss(rec, x)

    try:
        log = _loop("autoencoder-decoder", vae, train_rows, cfg, step_fn, run_dir, progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log["bf16_autocast"] = use_bf16
    log["heldout_psnr_db"] = reconstruction_psnr(vae, images[held])
    log["train_psnr_db"] = reconstruction_psnr(vae, images[train_rows[:256]])
    return log


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in images.split(256)])
    return psnr(rec, images)


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor) -> tuple[float, float]:
    """Global (shift, scale) so that (z - shift) * scale has zero mean and unit variance."""
    z = torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(256)])
    return z.mean().item(), 1.0 / z.std().item()


# --- stage 2: CLIP -------------------------------------------------------------------------------


def _clip_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shifts, slight blur and noise: the image tower must also read blurry generated images."""
    x = _shift_augment(x, g)
    blur = torch.rand(len(x), generator=g) < 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur[:, None, None, None], 0.5 * x + 0.5 * blurred, x)
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


def clip_preprocess(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the image tower's input. Identity scale: the tower is trained on this range."""
    return x


def train_clip(clip_model, images: torch.Tensor, tokens: torch.Tensor, cfg: StageConfig = CLIP_RECIPE,
               run_dir: Path | None = None, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)

    def step_fn(batch, step):
        g = _gen(cfg.seed, 3, step)
        img = clip_model.encode_image(clip_preprocess(_clip_augment(images[batch], g)), normalize=True)
        txt = clip_model.encode_text(tokens[batch], normalize=True)
        logits = clip_model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(batch))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    return _loop("clip", clip_model, torch.arange(len(images)), cfg, step_fn, run_dir, progress)


# --- stage 3: UNet -------------------------------------------------------------------------------


def unet_step_draws(step: int, batch_size: int, latent_shape, flips: bool, num_train_timesteps: int,
                    cfg: StageConfig) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of UNet training step ``step``, from its own seeded CPU generator, in this order:
    flip side per row (None without flips), timestep per row, noise (batch, *latent_shape), caption dropout
    per row. They depend on the step alone, never on which rows are in the batch, so every leave-K-out
    retrain sees the same draws."""
    g = _gen(cfg.seed, 4, step)
    side = torch.randint(0, 2, (batch_size,), generator=g) if flips else None
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *latent_shape), generator=g)
    drop = torch.rand(batch_size, generator=g) < cfg.extra["cfg_dropout"]
    return side, t, noise, drop


def train_unet(unet, scheduler, latents: torch.Tensor, text_states: torch.Tensor, null_state: torch.Tensor,
               cfg: StageConfig = UNET_RECIPE, exclude: set[int] | frozenset = frozenset(),
               run_dir: Path | None = None, progress: bool = True, on_epoch_end=None) -> dict:
    """DDPM training (epsilon MSE, min-SNR weighted) of ``unet`` on precomputed latents and text states.

    With ``cfg.extra["ema_decay"]`` > 0 an exponential moving average of the weights is kept (checkpointed
    with them); the UNet holds the EMA weights during ``on_epoch_end`` and after training.

    latents: (N, C, h, w) or (N, 2, C, h, w) when flips are on (slot 1 = the flipped image's latent).
    The UNet may sit on an accelerator: batch order, timesteps, noise and caption dropout are still drawn
    on the CPU from the same seeded generators, so only the arithmetic differs from a CPU run.
    """
    dev = next(unet.parameters()).device
    latents, text_states, null_state = latents.to(dev), text_states.to(dev), null_state.to(dev)
    n = len(latents)
    bad = [i for i in exclude if not 0 <= i < n]
    if bad:
        raise ValueError(f"exclude holds indices outside [0, {n}): {bad[:5]}")
    rows = torch.tensor([i for i in range(n) if i not in exclude], dtype=torch.long)
    alphas = scheduler.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(dev)
    gamma = cfg.extra["min_snr_gamma"]
    flips = latents.dim() == 5

    def step_fn(batch, step):
        side, t, noise, drop = unet_step_draws(step, len(batch), latents.shape[-3:], flips,
                                               scheduler.config.num_train_timesteps, cfg)
        rows_on = batch.to(dev)
        x0 = latents[rows_on, side.to(dev)] if flips else latents[rows_on]
        noise = noise.to(dev)
        ctx = torch.where(drop.to(dev)[:, None, None], null_state.expand(len(batch), -1, -1), text_states[rows_on])
        t = t.to(dev)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, ctx).sample
        weight = snr[t].clamp(max=gamma) / snr[t] if gamma else torch.ones(len(t), device=dev)
        return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    decay = cfg.extra.get("ema_decay", 0.0)
    if not decay:
        return _loop("unet", unet, rows, cfg, step_fn, run_dir, progress, on_epoch_end)
    ema = {f"ema.{k}": p.detach().clone() for k, p in unet.named_parameters()}

    @torch.no_grad()
    def update_ema(step):
        d = min(decay, (1 + step) / (10 + step))  # short warm-up: early weights fade fast
        for k, p in unet.named_parameters():
            ema[f"ema.{k}"].lerp_(p.detach(), 1 - d)

    def epoch_end(epoch, log):
        if on_epoch_end is not None:
            with swapped_in(unet, ema):
                on_epoch_end(epoch, log)

    log = _loop("unet", unet, rows, cfg, step_fn, run_dir, progress, epoch_end, update_ema, ema)
    with torch.no_grad():
        for k, p in unet.named_parameters():
            p.copy_(ema[f"ema.{k}"])
    return log


class swapped_in:
    """Context manager: the module's parameters replaced by ``ema`` ("ema.<name>" tensors), restored after."""

    def __init__(self, module, ema: dict):
        self.module, self.ema, self.saved = module, ema, None

    @torch.no_grad()
    def __enter__(self):
        self.saved = {k: p.detach().clone() for k, p in self.module.named_parameters()}
        for k, p in self.module.named_parameters():
            p.copy_(self.ema[f"ema.{k}"])

    @torch.no_grad()
    def __exit__(self, *exc):
        for k, p in self.module.named_parameters():
            p.copy_(self.saved[k])
        return False
