"""AbU's tables, computed once per model + dataset: ``python -m abu_explorer precompute``.

1. ``fisher.safetensors``     - diagonal Fisher F over the selected weights (``fisher_passes`` draws per row);
2. ``base_losses.npy``        - L(z, theta_0) for rows x flips x fixed timesteps, fixed noise.
``meta.json`` records the settings and the hashes of the UNet, autoencoder, CLIP and dataset; a stage
whose file exists with matching settings is skipped (resume), a mismatched table fails loudly on load.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution import distributed
from abu_explorer.attribution.ddpm_loss import eval_timesteps, loss_table
from abu_explorer.attribution.gradients import diagonal_fisher
from abu_explorer.attribution.params import select
from abu_explorer.model.backend import provenance

HINT = "python -m abu_explorer precompute"
# Settings that change the tables; the others are query-time options and may differ freely.
TABLE_FIELDS = ("selection", "fisher_passes", "fisher_seed", "num_timesteps", "noise_seed")


@dataclass(frozen=True)
class AbUConfig:
    selection: str = "cross-attn"
    fisher_passes: int = 5  # paper: 5 passes over the data
    fisher_seed: int = 0
    fisher_damping: float = 0.0  # 0 reproduces the paper; > 0 adds lambda to F before inverting
    num_timesteps: int = 10  # paper: 10 at stride 100 for its customized models
    noise_seed: int = 0
    alpha: float = 0.003  # unlearning step size, chosen by LDS on the tuning split (docs/evaluation.md)
    unlearn_steps: int = 1
    unlearn_samples: int = 512  # (noise, timestep) draws averaged per step
    unlearn_seed: int = 0
    screen_candidates: int = 200  # M rows rescored exactly in fast mode
    batch_size: int = 256
    box_contrast: bool = False  # box queries: tau(box) - tau(the rest of the image), see abu.py
    box_contrast_scaled: bool = False  # ... each side over its median |tau| first (exact mode only), see abu.py

    def __post_init__(self):
        from abu_explorer.attribution.params import SELECTIONS

        checks = [(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}"),
                  (math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be a finite number > 0, got {self.alpha}"),
                  (math.isfinite(self.fisher_damping) and self.fisher_damping >= 0,
                   f"damping must be a finite number >= 0, got {self.fisher_damping}"),
                  (self.unlearn_steps >= 1, "unlearn_steps must be >= 1"),
                  (self.unlearn_samples >= 1, "unlearn_samples must be >= 1"),
                  (self.fisher_passes >= 1, "fisher_passes must be >= 1"),
                  (self.screen_candidates >= 1, "screen_candidates must be >= 1"),
                  (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.box_contrast or not self.box_contrast_scaled, "box_contrast_scaled needs box_contrast")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"AbU setting: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table_settings(self) -> dict:
        return {k: getattr(self, k) for k in TABLE_FIELDS}


@dataclass
class AbUTables:
    config: AbUConfig
    fisher: torch.Tensor  # (P,)
    base_losses: torch.Tensor  # (N, F, T)
    timesteps: list[int]


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
    meta = {"settings": cfg.table_settings(), "config": cfg.table_settings(), "timesteps": timesteps,
            **provenance(explorer), "num_train": cache.num_images, "flips": cache.latents.dim() == 5,
            "num_params": sum(p.numel() for p in select(unet, cfg.selection).values())}
    if cache.caption_image is not None:  # caption lists: one base-loss row per caption
        meta["num_captions"] = len(cache.text_states)
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
                            cfg.fisher_seed, batch_size=64, progress=bar("fisher"), caption_image=cache.caption_image)
        if rank == 0:
            artifacts.save_safetensors(folder / "fisher.safetensors", {"fisher": f}, meta["settings"])
        finish("fisher")
    if "base_losses" not in done:
        table = loss_table(unet, sched, cache.latents, cache.text_states, timesteps, cfg.noise_seed,
                           cfg.batch_size, progress=bar("base losses"), caption_image=cache.caption_image)
        if rank == 0:
            artifacts.save_npy(folder / "base_losses.npy", table.numpy())
        finish("base_losses")
    return folder


def load_tables(explorer, folder: Path | None = None, cfg: AbUConfig | None = None) -> AbUTables:
    folder = Path(folder or default_folder(explorer))
    meta = artifacts.load_json(folder / "meta.json", HINT)
    missing = {"fisher", "base_losses"} - set(meta.get("done", []))
    if missing:
        raise artifacts.ArtifactError(f"{folder}: unfinished precompute (missing {', '.join(sorted(missing))}); "
                                      f"resume it with: {HINT}")
    for key, value in provenance(explorer).items():
        if meta[key] != value:
            raise artifacts.ArtifactError(f"{folder / 'meta.json'}: {key} {meta[key]} does not match the loaded "
                                          f"model ({value}); rebuild with: {HINT}")
    # the tables fix their own settings; the query-time ones (alpha, steps, draws) are the code's defaults
    stored = dataclasses.replace(AbUConfig(), **meta["settings"])
    if cfg is not None and cfg.table_settings() != stored.table_settings():
        raise artifacts.ArtifactError(f"{folder}: tables built with {stored.table_settings()}, "
                                      f"asked for {cfg.table_settings()}; rebuild with: {HINT}")
    fisher = artifacts.load_safetensors(folder / "fisher.safetensors", HINT)["fisher"]
    base = torch.from_numpy(artifacts.load_npy(folder / "base_losses.npy", HINT))
    n = meta.get("num_captions", meta["num_train"])
    if base.shape[0] != n:
        raise artifacts.ArtifactError(f"{folder}: base losses have {base.shape[0]} rows, expected {n}; rebuild: {HINT}")
    if fisher.numel() != meta["num_params"]:
        raise artifacts.ArtifactError(f"{folder}: Fisher has {fisher.numel()} entries, expected {meta['num_params']}")
    return AbUTables(cfg or stored, fisher, base, meta["timesteps"])
