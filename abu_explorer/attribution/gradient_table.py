"""Per-row training-loss gradients as one table, so that IF's exact scan is a matrix-vector product.

# Notation (code -> paper)
#   theta      = the selected bias-free Linear weights (cross-attention K/V by default), flattened in selection order
#   L(z_r,f)   = mean over the fixed timesteps of the DDPM loss of caption row r, flip f, fixed noise -> IF's L(z)
#   G[r, f]    = grad_theta L(z_r,f)                                                                -> grad L(z)
#   G[r, f].v  = the directional derivative that ``influence.directional_derivatives`` approximates by a
#                central difference; here it is exact up to float rounding, and a query costs one pass over G.
# A Linear layer y = x W^T used at positions p (the caption's tokens for K/V) has the per-item weight gradient
# sum_p dy_p^T x_p, so one backward pass of a batch gives every item's gradient from each layer's input and
# output gradient (per-example gradients as in Goodfellow 2015 and Opacus); no per-item copy of the network.
# The table has R x F x P float32 values (2,015 x 1 x 180,224 = 1.45 GB for the embedded model), written once as
# a memory-mapped .npy under the user cache (``ABU_CACHE_DIR``/if_gradients, or ``ABU_GRADIENT_TABLES``), keyed by
# everything that changes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from abu_explorer.attribution import params
from abu_explorer.attribution.ddpm_loss import ddpm_losses, eval_timesteps, item_noise

VERSION = 1
FOLDER_ENV = "ABU_GRADIENT_TABLES"  # where tables live; default: the user cache's if_gradients/
ROWS_PER_BATCH = 16  # (caption row, flip) groups per backward pass; x num_timesteps items
_LOCKS: dict[str, threading.Lock] = {}


def item_gradients(unet, scheduler, x0, t, noise, context, modules: list[str]) -> torch.Tensor:
    """(B, P) gradients of each item's DDPM loss w.r.t. the weights of ``modules`` (bias-free Linear layers),
    flattened per layer (out, in) row-major and concatenated in ``modules`` order."""
    named = dict(unet.named_modules())
    calls: dict[str, list] = {m: [] for m in modules}
    hooks = [named[m].register_forward_hook(lambda mod, inp, out, m=m: calls[m].append((inp[0].detach(), out)))
             for m in modules]
    try:
        with torch.enable_grad():
            losses = ddpm_losses(unet, scheduler, x0, t, noise, context)
            outs = [out for m in modules for _, out in calls[m]]
            grads = iter(torch.autograd.grad(losses.sum(), outs))
    finally:
        for h in hooks:
            h.remove()
    b, parts = len(x0), []
    for m in modules:
        if not calls[m]:
            raise ValueError(f"layer {m} was not used by the forward pass")
        total = 0
        for x, _ in calls[m]:
            dy = next(grads)
            if x.shape[0] != b:
                raise ValueError(f"layer {m} saw a batch of {x.shape[0]} items, expected {b}")
            total = total + torch.bmm(dy.reshape(b, -1, dy.shape[-1]).transpose(1, 2), x.reshape(b, -1, x.shape[-1]))
        parts.append(total.reshape(b, -1))
    return torch.cat(parts, dim=1)


def table_key(explorer, cfg) -> str:
    from abu_explorer.machine import kind
    from abu_explorer.model.backend import provenance

    cache = explorer.training_cache()
    device = str(getattr(explorer, "device", "cpu"))
    # the machine kind too: a table computed with other float rounding must not serve another kind's results
    doc = {"version": VERSION, "machine_kind": kind(device), **provenance(explorer),
           "selection": cfg.selection, "num_timesteps": cfg.num_timesteps, "noise_seed": cfg.noise_seed,
           "rows": len(cache.text_states), "latents": list(cache.latents.shape)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def table_bytes(explorer, cfg) -> int:
    cache = explorer.training_cache()
    flips = cache.latents.shape[1] if cache.latents.dim() == 5 else 1
    size = sum(p.numel() for p in params.select(explorer.unet, cfg.selection).values())
    return len(cache.text_states) * flips * size * 4


def table_path(explorer, cfg) -> Path:
    from abu_explorer.data.dataset import cache_dir

    folder = Path(os.environ.get(FOLDER_ENV) or cache_dir() / "if_gradients")
    return folder / f"{table_key(explorer, cfg)}.npy"


@contextlib.contextmanager
def tables_in(folder: Path):
    """Tables are read and built in ``folder`` inside the block (e.g. a benchmark's throwaway folder);
    the previous setting is restored on exit."""
    before = os.environ.get(FOLDER_ENV)
    os.environ[FOLDER_ENV] = str(folder)
    try:
        yield Path(folder)
    finally:
        if before is None:
            os.environ.pop(FOLDER_ENV, None)
        else:
            os.environ[FOLDER_ENV] = before


def discard(explorer, cfg) -> None:
    """Delete the model's table (for throwaway models, e.g. one customized model per concept)."""
    table_path(explorer, cfg).unlink(missing_ok=True)


def load_or_build(explorer, cfg, modules: list[str], progress=None) -> np.ndarray:
    """The (R, F, P) table, memory-mapped read-only; built on first use (atomic: temp file + rename)."""
    path = table_path(explorer, cfg)
    folder = path.parent
    with _LOCKS.setdefault(str(path), threading.Lock()):  # concurrent requests of one process build it once
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            try:
                _build(explorer, cfg, modules, tmp, progress)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _build(explorer, cfg, modules: list[str], path: Path, progress) -> None:
    unet, sched, cache = explorer.unet, explorer.scheduler, explorer.training_cache()
    lat = cache.latents if cache.latents.dim() == 5 else cache.latents[:, None]
    rows, flips = len(cache.text_states), lat.shape[1]
    ts = eval_timesteps(cfg.num_timesteps, sched.config.num_train_timesteps)
    sel = params.select(unet, cfg.selection)
    size = sum(p.numel() for p in sel.values())
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, flips, size))
    groups = [(r, f) for r in range(rows) for f in range(flips)]
    shape = tuple(lat.shape[2:])
    num = (len(groups) + ROWS_PER_BATCH - 1) // ROWS_PER_BATCH
    with params.only_grad_for(unet, sel):
        for b in range(num):
            chunk = groups[b * ROWS_PER_BATCH:(b + 1) * ROWS_PER_BATCH]
            image = [r if cache.caption_image is None else int(cache.caption_image[r]) for r, _ in chunk]
            items = [(i, f, t) for (_, f), i in zip(chunk, image) for t in ts]
            x0 = torch.stack([lat[i, f] for i, f, _ in items])
            noise = torch.stack([item_noise(cfg.noise_seed, i, f, t, shape) for i, f, t in items])
            ctx = torch.stack([cache.text_states[r] for r, _ in chunk for _ in ts])
            g = item_gradients(unet, sched, x0, torch.tensor([t for *_, t in items]), noise, ctx, modules)
            g = g.view(len(chunk), len(ts), -1).mean(dim=1)
            for (r, f), row in zip(chunk, g):
                out[r, f] = row.numpy()
            if progress is not None:
                progress(b + 1, num)
    out.flush()
    del out


def directional_derivatives(table: np.ndarray, v: torch.Tensor, caption_rows: torch.Tensor,
                            block: int = 256) -> torch.Tensor:
    """(len(caption_rows), F) values G[r, f] . v, in float64 block by block, returned as float32.
    A run of consecutive rows (the whole-table scan) is read as a slice of the memory map, so the block is
    copied once (to float64), not gathered first."""
    vd = v.double()
    rows = caption_rows.numpy()
    out = []
    for s in range(0, len(rows), block):
        idx = rows[s:s + block]
        consecutive = idx[-1] - idx[0] == len(idx) - 1 and bool((np.diff(idx) == 1).all())
        part = table[idx[0]:idx[-1] + 1] if consecutive else table[idx]
        out.append((torch.from_numpy(np.asarray(part, dtype=np.float64)) @ vd).float())
    return torch.cat(out) if out else torch.zeros((0, table.shape[1]))
