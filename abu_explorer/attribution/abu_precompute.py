"""AbU's tables, computed once per model + dataset: ``python -m abu_explorer precompute``.

1. ``fisher.safetensors``     - diagonal Fisher F over the selected weights (``fisher_passes`` draws per row);
2. ``base_losses.npy``        - L(z, theta_0) for rows x flips x fixed timesteps, fixed noise;
3. ``screen_features.npy``    - P^T g_z (fp16) for the fast mode's first-order screen.
``meta.json`` records the settings and the hashes of the UNet, autoencoder, CLIP and dataset; a stage
whose file exists with matching settings is skipped (resume), a mismatched table fails loudly on load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import artifacts
from . import distributed
from .ddpm_loss import eval_timesteps, item_noise, ddpm_losses, loss_table
from .gradients import PerExampleGradients, diagonal_fisher

HINT = "python -m abu_explorer precompute"
# Settings that change the tables; the others are query-time options and may differ freely.
TABLE_FIELDS = ("selection", "fisher_passes", "fisher_seed", "num_timesteps", "noise_seed", "screen_dim",
                "projection_seed")


@dataclass(frozen=True)
class AbUConfig:
    selection: str = "cross-attn"
    fisher_passes: int = 5  # paper: 5 passes over the data
    fisher_seed: int = 0
    fisher_damping: float = 0.0  # 0 reproduces the paper; > 0 adds lambda to F before inverting
    num_timesteps: int = 10  # paper: 10 at stride 100 for its customized models
    noise_seed: int = 0
    alpha: float = 0.01  # unlearning step size (tuned; see README)
    unlearn_steps: int = 1
    unlearn_samples: int = 512  # (noise, timestep) draws averaged per step
    unlearn_seed: int = 0
    screen_dim: int = 1024
    screen_candidates: int = 200  # M rows rescored exactly in fast mode
    projection_seed: int = 0
    batch_size: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table_settings(self) -> dict:
        return {k: getattr(self, k) for k in TABLE_FIELDS}


@dataclass
class AbUTables:
    config: AbUConfig
    fisher: torch.Tensor  # (P,)
    base_losses: torch.Tensor  # (N, F, T)
    screen_features: torch.Tensor  # (N, F, d) fp16
    timesteps: list[int]


def project(vectors: torch.Tensor, dim: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """(B, P) -> (B, dim) through a fixed Gaussian matrix (entries N(0, 1/dim)), generated in chunks."""
    out = torch.zeros(len(vectors), dim)
    for c, start in enumerate(range(0, vectors.shape[1], chunk)):
        stop = min(start + chunk, vectors.shape[1])
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        out += vectors[:, start:stop].float() @ torch.randn(stop - start, dim, generator=g)
    return out / dim ** 0.5


def screen_features(unet, scheduler, latents, states, timesteps, cfg: AbUConfig, rows_per_group: int = 128,
                    progress=None) -> torch.Tensor:
    """(N, F, d): projected gradients of each row's fixed-timestep, fixed-noise loss (mean over T)."""
    lat = latents if latents.dim() == 5 else latents[:, None]
    n, n_flip, n_t = len(lat), lat.shape[1], len(timesteps)
    pex = PerExampleGradients(unet, cfg.selection)
    shape = tuple(lat.shape[2:])
    per_micro = max(1, cfg.batch_size // (n_flip * n_t))

    def group(b: int) -> torch.Tensor:
        rows = list(range(b * rows_per_group, min((b + 1) * rows_per_group, n)))
        grads = []
        for i in range(0, len(rows), per_micro):
            chunk = rows[i:i + per_micro]
            items = [(r, f, k) for r in chunk for f in range(n_flip) for k in range(n_t)]
            r = torch.tensor([it[0] for it in items])
            f = torch.tensor([it[1] for it in items])
            t = torch.tensor([timesteps[it[2]] for it in items])
            noise = torch.stack([item_noise(cfg.noise_seed, it[0], it[1], timesteps[it[2]], shape) for it in items])
            g = pex(lambda: ddpm_losses(unet, scheduler, lat[r, f], t, noise, states[r]), len(items))
            grads.append(g.view(len(chunk) * n_flip, n_t, -1).mean(dim=1))
        feats = project(torch.cat(grads), cfg.screen_dim, cfg.projection_seed)
        return feats.view(len(rows), n_flip, cfg.screen_dim).half()

    num = (n + rows_per_group - 1) // rows_per_group
    return torch.cat(distributed.run_batches(group, num, progress))


def _provenance(explorer) -> dict:
    return {"unet_hash": explorer.component_hash("unet"), "autoencoder_hash": explorer.component_hash("autoencoder"),
            "clip_hash": explorer.component_hash("clip"), "data_hash": explorer.meta["dataset"]["content_hash"]}


def default_folder(explorer) -> Path:
    return Path(explorer.root) / "abu"


def precompute(explorer, cfg: AbUConfig = AbUConfig(), folder: Path | None = None, progress: bool = True) -> Path:
    """Build (or resume) the three tables. Every rank computes its share; rank 0 writes."""
    from tqdm.auto import tqdm

    folder = Path(folder or default_folder(explorer))
    rank, _ = distributed.rank_world()
    cache = explorer.training_cache()
    unet, sched = explorer.unet, explorer.scheduler
    timesteps = eval_timesteps(cfg.num_timesteps, sched.config.num_train_timesteps)
    meta = {"settings": cfg.table_settings(), "config": cfg.to_dict(), "timesteps": timesteps,
            **_provenance(explorer), "num_train": len(cache.text_states), "flips": cache.latents.dim() == 5}
    old = artifacts.load_json(folder / "meta.json") if (folder / "meta.json").exists() else None
    same = old is not None and all(old.get(k) == v for k, v in meta.items() if k != "config")
    done = set(old.get("done", [])) if same else set()

    def bar(desc):
        b = tqdm(desc=desc, disable=not progress or rank != 0)
        return lambda i, n: (setattr(b, "total", n), b.update(i - b.n))

    def finish(stage):
        done.add(stage)
        if rank == 0:
            artifacts.save_json(folder / "meta.json", {**meta, "done": sorted(done)})

    if "fisher" not in done:
        f = diagonal_fisher(unet, sched, cache.latents, cache.text_states, cfg.selection, cfg.fisher_passes,
                            cfg.fisher_seed, batch_size=64, progress=bar("fisher"))
        if rank == 0:
            artifacts.save_safetensors(folder / "fisher.safetensors", {"fisher": f}, meta["settings"])
        finish("fisher")
    if "base_losses" not in done:
        table = loss_table(unet, sched, cache.latents, cache.text_states, timesteps, cfg.noise_seed,
                           cfg.batch_size, progress=bar("base losses"))
        if rank == 0:
            artifacts.save_npy(folder / "base_losses.npy", table.numpy())
        finish("base_losses")
    if "screen_features" not in done:
        feats = screen_features(unet, sched, cache.latents, cache.text_states, timesteps, cfg,
                                progress=bar("screen features"))
        if rank == 0:
            artifacts.save_npy(folder / "screen_features.npy", feats.numpy())
        finish("screen_features")
    return folder


def load_tables(explorer, folder: Path | None = None, cfg: AbUConfig | None = None) -> AbUTables:
    folder = Path(folder or default_folder(explorer))
    meta = artifacts.load_json(folder / "meta.json", HINT)
    missing = {"fisher", "base_losses", "screen_features"} - set(meta.get("done", []))
    if missing:
        raise artifacts.ArtifactError(f"{folder}: unfinished precompute (missing {', '.join(sorted(missing))}); "
                                      f"resume it with: {HINT}")
    for key, value in _provenance(explorer).items():
        if meta[key] != value:
            raise artifacts.ArtifactError(f"{folder / 'meta.json'}: {key} {meta[key]} does not match the loaded "
                                          f"model ({value}); rebuild with: {HINT}")
    stored = AbUConfig(**meta["config"])
    if cfg is not None and cfg.table_settings() != stored.table_settings():
        raise artifacts.ArtifactError(f"{folder}: tables built with {stored.table_settings()}, "
                                      f"asked for {cfg.table_settings()}; rebuild with: {HINT}")
    fisher = artifacts.load_safetensors(folder / "fisher.safetensors", HINT)["fisher"]
    base = torch.from_numpy(artifacts.load_npy(folder / "base_losses.npy", HINT))
    feats = torch.from_numpy(artifacts.load_npy(folder / "screen_features.npy", HINT))
    n = meta["num_train"]
    if base.shape[0] != n or feats.shape[0] != n:
        raise artifacts.ArtifactError(f"{folder}: tables have {base.shape[0]}/{feats.shape[0]} rows, expected {n}")
    return AbUTables(cfg or stored, fisher, base, feats, meta["timesteps"])
