"""DDPM losses at fixed timesteps with fixed noise: the measurement AbU takes before and after unlearning.

The noise of an item is a function of (noise_seed, row, flip, timestep) alone, so a score never depends
on the batch size or on how the rows are sharded (the reference code seeds per batch instead).
"""
from __future__ import annotations

import torch

from abu_explorer.attribution import distributed


def eval_timesteps(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """``count`` evenly spaced timesteps, centred in their strides (10 -> 50, 150, ..., 950)."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"timestep count must be in [1, {num_train_timesteps}], got {count}")
    stride = num_train_timesteps // count
    return [k * stride + stride // 2 for k in range(count)]


def item_noise(noise_seed: int, row: int, flip: int, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    seed = ((noise_seed * 1_000_003 + row) * 4 + flip) * 1009 + t
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed % (2**63 - 1)))


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser was trained to predict, read from the scheduler config: the noise (``epsilon``),
    the velocity ``sqrt(abar) eps - sqrt(1 - abar) x0`` (``v_prediction``) or the clean latent (``sample``)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config (epsilon, v_prediction, sample)")


def ddpm_losses(unet, scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item MSE (B,) against the training target. With ``mask`` (h, w) the error is averaged over the
    masked cells only."""
    xt = scheduler.add_noise(x0, noise, t)
    err = (unet(xt, t, context).sample - training_target(scheduler, x0, noise, t)).pow(2)
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    w = mask.to(err.dtype)[None, None]
    return (err * w).sum(dim=(1, 2, 3)) / (w.sum() * err.shape[1])


@torch.inference_mode()
def loss_table(unet, scheduler, latents: torch.Tensor, states: torch.Tensor, timesteps: list[int],
               noise_seed: int = 0, batch_size: int = 256, rows: torch.Tensor | None = None,
               progress=None, caption_image: torch.Tensor | None = None) -> torch.Tensor:
    """Losses (R, F, T) of caption rows x flips x timesteps. latents: (N, C, h, w) or (N, F, C, h, w);
    ``states`` row r captions image ``caption_image[r]`` (default: image r), whose noise it shares."""
    lat = latents if latents.dim() == 5 else latents[:, None]
    rows = torch.arange(len(states)) if rows is None else rows
    image = (lambda r: r) if caption_image is None else (lambda r: int(caption_image[r]))
    n_flip, n_t = lat.shape[1], len(timesteps)
    items = [(int(r), image(int(r)), f, k) for r in rows for f in range(n_flip) for k in range(n_t)]
    shape = tuple(lat.shape[2:])

    def batch(b: int) -> torch.Tensor:
        chunk = items[b * batch_size:(b + 1) * batch_size]
        r = torch.tensor([i[0] for i in chunk])
        im = torch.tensor([i[1] for i in chunk])
        f = torch.tensor([i[2] for i in chunk])
        t = torch.tensor([timesteps[i[3]] for i in chunk])
        noise = torch.stack([item_noise(noise_seed, i[1], i[2], timesteps[i[3]], shape) for i in chunk])
        return ddpm_losses(unet, scheduler, lat[im, f], t, noise, states[r])

    num = (len(items) + batch_size - 1) // batch_size
    out = torch.cat(distributed.run_batches(batch, num, progress))
    return out.view(len(rows), n_flip, n_t)


def reference_loss_table(unet, scheduler, latents, states, timesteps, noise_seed=0,
                         caption_image=None) -> torch.Tensor:
    """Obviously-correct loop: one forward pass per (caption row, flip, timestep). For parity tests."""
    lat = latents if latents.dim() == 5 else latents[:, None]
    out = torch.zeros(len(states), lat.shape[1], len(timesteps))
    with torch.inference_mode():
        for r in range(len(states)):
            i = r if caption_image is None else int(caption_image[r])
            for f in range(lat.shape[1]):
                for k, t in enumerate(timesteps):
                    noise = item_noise(noise_seed, i, f, t, tuple(lat.shape[2:]))
                    x0, tt = lat[i, f][None], torch.tensor([t])
                    pred = unet(scheduler.add_noise(x0, noise[None], tt), tt, states[r][None]).sample
                    out[r, f, k] = (pred - training_target(scheduler, x0, noise[None], tt)).pow(2).mean()
    return out
