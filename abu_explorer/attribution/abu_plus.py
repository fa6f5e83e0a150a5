"""AbU+: Attribution by Unlearning with an EK-FAC preconditioner (the variant of Wang et al. 2025, "Fast Data
Attribution for Text-to-Image Models", which reports it above AbU on every cell of the MSCOCO leave-K-out table).

Everything is AbU's (the query gradient, the fixed-timestep loss tables, the fast screen, the flip max) except
the unlearning step: the diagonal Fisher is replaced by the EK-FAC Gauss-Newton matrix that the influence
baseline fits on the same cross-attention K/V weights (``precomputed/if/``), so the step follows the
curvature's correlations within each layer instead of treating every weight alone.

# Notation (code -> paper)
#   H_l = (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T -> EK-FAC Fisher of layer l (influence.py fits it)
#   damping                                           -> lambda added to Lambda (default 0.1 x mean, per layer)
#   step: theta += alpha/N (H + lambda)^-1 grad        -> the Newton step of AbU with F := H
#   scores                                            -> tau(z^, z) = L(z, theta_hat) - L(z, theta_0), as AbU
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution.abu import AbU
from abu_explorer.attribution.abu_precompute import TABLE_FIELDS, AbUConfig, default_folder, load_tables
from abu_explorer.attribution.settings import method_settings

# alpha of AbU+: the step that raises the query's own loss as much as AbU's step at its alpha (the same unlearning
# strength, another direction), on AbU's 4 tuning rows of the shipped model: 0.0568 at 15 against AbU's 0.0577
# (python -m abu_explorer bench abu --method abuplus --alphas 1 5 10 15 20 30; docs/methods.md)
DEFAULT_ALPHA = 15.0


@dataclass(frozen=True)
class AbUPlusConfig(AbUConfig):
    """AbU's settings, with ``damping`` of the EK-FAC curvature in place of ``fisher_damping`` (unused here)."""

    alpha: float = DEFAULT_ALPHA
    damping: float | None = None  # None: 0.1 x mean eigenvalue per layer, as the influence baseline

    def __post_init__(self):
        super().__post_init__()
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"AbU+ setting: damping must be a finite number >= 0 (or unset), got {self.damping}")


class AbUPlus(AbU):
    """``AbUPlus.load(explorer).score(query, mode="fast"|"exact")``: AbU's tables plus the IF baseline's
    EK-FAC factors."""

    name = "abuplus"

    def __init__(self, explorer, tables, factors: dict[str, torch.Tensor], if_cfg):
        super().__init__(explorer, tables)
        from abu_explorer.attribution.influence import tracked_modules

        if if_cfg.selection != self.cfg.selection:
            raise artifacts.ArtifactError(f"the EK-FAC factors cover {if_cfg.selection!r}, AbU's tables "
                                          f"{self.cfg.selection!r}; rebuild both with the same --selection")
        self.factors = {k: v.double() for k, v in factors.items()}
        self.modules = tracked_modules(self.unet, self.cfg.selection)
        self.shapes = [tuple(self.selected[f"{m}.weight"].shape) for m in self.modules]

    @classmethod
    def load(cls, explorer, folder=None, if_folder=None, **overrides):
        from abu_explorer.attribution import influence

        fixed = sorted(set(overrides) & set(TABLE_FIELDS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} are fixed by the precomputed tables; rerun precompute to change them")
        tables = load_tables(explorer, folder)
        base = {k: v for k, v in tables.config.to_dict().items() if k not in ("alpha", "fisher_damping")}
        cfg = AbUPlusConfig(**{**base, **overrides})
        ekfac = influence.InfluenceFunctions.load(explorer, if_folder)  # checks the factors against the model
        method = cls(explorer, dataclasses.replace(tables, config=cfg), ekfac.factors, ekfac.cfg)
        method.folder = Path(folder or default_folder(explorer))
        method.if_folder = ekfac.folder
        return method

    def settings(self) -> dict:
        """Its settings and a hash of both tables it reads (AbU's losses, the EK-FAC factors)."""
        own = method_settings(self.cfg, self.folder)
        own["config"].pop("fisher_damping")
        own["tables"] = f"{own['tables']}+{artifacts.folder_hash(self.if_folder)}"
        return own

    def unlearn(self, query) -> torch.Tensor:
        """dtheta after ``unlearn_steps`` steps of alpha/N (H + damping)^-1 grad."""
        from abu_explorer.attribution.influence import precondition

        cfg, n_train = self.cfg, self.cache.num_images
        delta = torch.zeros(sum(p.numel() for p in self.selected.values()))
        for step in range(cfg.unlearn_steps):
            with self.applied(delta):
                grad = self.query_gradient(query, step)
            step = precondition(grad[None], self.factors, self.modules, self.shapes, -1.0, cfg.damping)[0]
            delta = delta + (cfg.alpha / n_train) * step
        return delta
