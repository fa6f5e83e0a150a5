"""Influence functions with EK-FAC (George et al. 2018; Grosse et al. 2023) on the AbU parameter selection.

# Notation (code -> paper)
#   L(z)     = mean_t ||eps_theta(x_t, t) - eps||^2 at fixed timesteps and fixed noise  -> training loss of z
#   m(q)     = the query's DDPM loss at the same timesteps, box-masked for local queries -> measurement f(theta)
#   H_l      = (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T, one per Linear layer l      -> EK-FAC Gauss-Newton
#              (Q_A, Q_S: eigenbases of the activation / output-gradient covariances; Lambda: the corrected
#              eigenvalues; fitted once by kronfluence with the true Fisher, i.e. sampled targets)
#   delta    = damping, 0.1 x mean(Lambda) per layer (kronfluence's heuristic) unless set
#   v        = (H + delta)^-1 grad m(q)                                                -> inverse-HVP
#   score(z) = grad L(z) . v   -> removing z raises m(q) by about score / N: higher = more influential,
#              in the same sense as AbU
# grad L(z) . v is a directional derivative. Exact mode reads it from a table of every row's gradient
# (``gradient_table``: built once per model, then one matrix-vector product per query) when the table fits
# (``exact_scan="auto"``: at most GRADIENT_TABLE_MAX_BYTES), otherwise measures it by a central difference of
# L(z) along v (two loss passes, nothing stored per row; ``exact_scan="difference"``). A d = 1024 random projection of
# the preconditioned gradients (TRAK-style storage) was tried first and failed: Spearman 0.02-0.16 against
# these exact scores (see docs/methods.md). Fast mode rescores only the rows that AbU's value-shift screen picks
# for the direction v, always by the central difference (cheaper than building the table); exact mode measures
# every row.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution import Ranking, distributed, gradient_table, params
from abu_explorer.attribution.ddpm_loss import (
    ddpm_losses,
    eval_timesteps,
    item_noise,
    loss_table,
    training_target,
)
from abu_explorer.attribution.dtrak import QUERY_ROW
from abu_explorer.attribution.gradients import random_draw
from abu_explorer.attribution.settings import method_settings

HINT = "python -m abu_explorer precompute --method if"
GRADIENT_TABLE_MAX_BYTES = 4 * 2**30  # exact_scan="auto" builds the gradient table up to this size
SCANS = ("auto", "gradients", "difference")


@dataclass(frozen=True)
class IFConfig:
    selection: str = "cross-attn"
    num_timesteps: int = 10  # fixed timesteps of L(z) and m(q)
    noise_seed: int = 0
    fit_draws: int = 2  # (timestep, noise) draws per training row for fitting the factors
    fit_seed: int = 0
    damping: float | None = None  # None: 0.1 x mean eigenvalue per layer
    fd_step: float = 1e-2  # central-difference step, as ||h v|| / ||theta||
    screen_candidates: int = 200  # fast mode: rows measured exactly
    batch_size: int = 160
    exact_scan: str = "auto"  # exact mode: "gradients" (a per-row gradient table), "difference", or "auto"

    QUERY_TIME = ("damping", "fd_step", "screen_candidates", "exact_scan")  # settings a query may change

    def __post_init__(self):
        checks = [(self.damping is None or (math.isfinite(self.damping) and self.damping >= 0),
                   f"damping must be a finite number >= 0 (or unset), got {self.damping}"),
                  (math.isfinite(self.fd_step) and self.fd_step > 0, f"fd_step must be a finite number > 0, got {self.fd_step}"),
                  (self.screen_candidates >= 1, "screen_candidates must be >= 1"),
                  (self.exact_scan in SCANS, f"exact_scan must be one of {', '.join(SCANS)}, got {self.exact_scan!r}"),
                  (self.num_timesteps >= 1 and self.fit_draws >= 1 and self.batch_size >= 1,
                   "num_timesteps, fit_draws and batch_size must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"IF setting: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- 1. fitting the EK-FAC factors with kronfluence -----------------------------------------------------


def _task(scheduler, modules: list[str]):
    from kronfluence.task import Task

    class DDPMTask(Task):
        """A batch is (x0, t, noise, context); the loss is summed over items, as kronfluence expects."""

        def compute_train_loss(self, batch, model, sample=False):
            x0, t, noise, ctx = batch
            pred = model(scheduler.add_noise(x0, noise, t), t, ctx).sample
            if sample:  # true Fisher: a target drawn from the model's Gaussian. The loss is the *mean* of D
                # squared errors, i.e. -log N(y; pred, (D/2) I) up to a constant, so y ~ N(pred, D/2): then
                # E[grad grad^T] equals the Gauss-Newton matrix of this loss, not a D-times smaller one
                with torch.no_grad():
                    target = pred + torch.randn_like(pred) * (pred[0].numel() / 2) ** 0.5
            else:
                target = training_target(scheduler, x0, noise, t)
            return (pred - target).pow(2).mean(dim=(1, 2, 3)).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return modules

    return DDPMTask()


class _Items(torch.utils.data.Dataset):
    def __init__(self, latents, states, t, noise):
        self.latents, self.states, self.t, self.noise = latents, states, t, noise

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        return self.latents[i], self.t[i], self.noise[i], self.states[i]


def tracked_modules(unet, selection: str) -> list[str]:
    selected = params.select(unet, selection)
    names = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in selected))
    modules = dict(unet.named_modules())
    for n in names:
        if not isinstance(modules[n], torch.nn.Linear) or modules[n].bias is not None or f"{n}.weight" not in selected:
            raise ValueError(f"EK-FAC here needs bias-free Linear layers; {n} is not one")
    return names


def fit_factors(unet, scheduler, latents, states, cfg: IFConfig, work_dir: Path | None = None,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Per layer: ``{layer}.qa`` (in, in), ``{layer}.qs`` (out, out), ``{layer}.lam`` (out, in)."""
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    modules = tracked_modules(unet, cfg.selection)
    shape, T = tuple(latents.shape[1:]), scheduler.config.num_train_timesteps
    items = [(d, r) for d in range(cfg.fit_draws) for r in range(len(latents))]
    draws = [random_draw(cfg.fit_seed, d, r, shape, T) for d, r in items]
    rows = torch.tensor([r for _, r in items])
    data = _Items(latents[rows], states[rows], torch.tensor([t for t, _ in draws]), torch.stack([n for _, n in draws]))
    task = _task(scheduler, modules)
    model = prepare_model(copy.deepcopy(unet), task)  # prepare_model wraps modules in place
    own_dir = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="abu-kronfluence-")) if own_dir else Path(work_dir)
    try:
        torch.manual_seed(cfg.fit_seed)  # the sampled targets of the true Fisher
        analyzer = Analyzer("abu", model, task, cpu=True, output_dir=str(work_dir), disable_tqdm=not progress,
                            log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", data, per_device_batch_size=cfg.batch_size,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        loaded = analyzer.load_all_factors("ekfac")
    finally:
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return from_kronfluence(loaded, modules)


def from_kronfluence(loaded: dict, modules: list[str]) -> dict[str, torch.Tensor]:
    """kronfluence's EK-FAC factors -> ours: eigenbases and the mean corrected eigenvalues, per layer."""
    out = {}
    for m in modules:
        lam = loaded["lambda_matrix"][m].double() / loaded["num_lambda_processed"][m].double()
        out[f"{m}.qa"] = loaded["activation_eigenvectors"][m].double().contiguous()
        out[f"{m}.qs"] = loaded["gradient_eigenvectors"][m].double().contiguous()
        out[f"{m}.lam"] = lam.contiguous()
    return out


# --- 2. preconditioning and measuring --------------------------------------------------------------------


def precondition(flat: torch.Tensor, factors: dict[str, torch.Tensor], modules: list[str], shapes: list[tuple],
                 power: float, damping: float | None) -> torch.Tensor:
    """(B, D) flat gradients (weights in ``modules`` order) -> (H + delta)^power applied per layer."""
    parts, i = [], 0
    for m, (o, n) in zip(modules, shapes):
        g = flat[:, i:i + o * n].double().view(-1, o, n)
        i += o * n
        qa, qs, lam = factors[f"{m}.qa"], factors[f"{m}.qs"], factors[f"{m}.lam"]
        delta = 0.1 * lam.mean() if damping is None else damping
        rot = qs.T @ g @ qa
        parts.append((qs @ (rot * (lam + delta).pow(power)) @ qa.T).reshape(len(flat), -1))
    if i != flat.shape[1]:
        raise ValueError(f"gradient has {flat.shape[1]} values, the layers {i}")
    return torch.cat(parts, dim=1).float()


def inverse_hvp(grad: torch.Tensor, factors: dict[str, torch.Tensor], unet, cfg: IFConfig) -> torch.Tensor:
    modules = tracked_modules(unet, cfg.selection)
    sel = params.select(unet, cfg.selection)
    shapes = [tuple(sel[f"{m}.weight"].shape) for m in modules]
    return precondition(grad[None], factors, modules, shapes, -1.0, cfg.damping)[0]


def query_gradient(explorer, query, cfg: IFConfig) -> torch.Tensor:
    """grad_theta m(q): the query's loss at the fixed timesteps, noise keyed by QUERY_ROW."""
    unet, sched = explorer.unet, explorer.scheduler
    ts = eval_timesteps(cfg.num_timesteps, sched.config.num_train_timesteps)
    shape = tuple(query.latent.shape)
    noise = torch.stack([item_noise(cfg.noise_seed, QUERY_ROW, 0, t, shape) for t in ts])
    ctx = explorer.encode_text([query.prompt]).expand(len(ts), -1, -1)
    x0 = query.latent[None].expand(len(ts), -1, -1, -1)
    sel = params.select(unet, cfg.selection)
    with params.only_grad_for(unet, sel):
        loss = ddpm_losses(unet, sched, x0, torch.tensor(ts), noise, ctx, query.mask).mean()
        grads = torch.autograd.grad(loss, list(sel.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def directional_derivatives(explorer, cache, v: torch.Tensor, rows: torch.Tensor, cfg: IFConfig,
                            progress=None) -> torch.Tensor:
    """grad L(z) . v for ``rows`` by a central difference at the fixed timesteps and noise; max over flips."""
    from abu_explorer.attribution.abu import _Applied

    sel = params.select(explorer.unet, cfg.selection)
    theta = torch.cat([p.detach().reshape(-1) for p in sel.values()])
    h = cfg.fd_step * float(theta.norm()) / max(float(v.norm()), 1e-30)
    ts = eval_timesteps(cfg.num_timesteps, explorer.scheduler.config.num_train_timesteps)
    tables = []
    for sign in (1.0, -1.0):
        with _Applied(sel, sign * h * v):
            tables.append(loss_table(explorer.unet, explorer.scheduler, cache.latents, cache.text_states, ts,
                                     cfg.noise_seed, cfg.batch_size, cache.caption_rows(rows), progress,
                                     cache.caption_image))
    return cache.per_image((tables[0] - tables[1]).mean(dim=2) / (2 * h), rows).max(dim=1).values


# --- 3. precompute and score ----------------------------------------------------------------------------


def precompute(explorer, cfg: IFConfig = IFConfig(), folder: Path | None = None, progress=True) -> Path:
    from abu_explorer.model.backend import provenance

    folder = Path(folder or Path(explorer.root) / "if")
    cache = explorer.training_cache()
    lat = cache.latents[:, 0] if cache.latents.dim() == 5 else cache.latents  # factors: unflipped images
    if cache.caption_image is not None:
        lat = lat[cache.caption_image]  # one fitting example per (image, caption)
    t0 = time.perf_counter()
    factors = fit_factors(explorer.unet, explorer.scheduler, lat, cache.text_states, cfg, progress=progress)
    if distributed.rank_world()[0] == 0:
        artifacts.save_safetensors(folder / "factors.safetensors", {k: v.float() for k, v in factors.items()})
        artifacts.save_json(folder / "meta.json", {
            "config": cfg.to_dict(), **provenance(explorer), "num_train": cache.num_images,
            "seconds": {"fit_factors": round(time.perf_counter() - t0, 1)}})
    return folder


class InfluenceFunctions:
    """``InfluenceFunctions.load(explorer).score(query, mode="fast"|"exact")``."""

    name = "if"

    def __init__(self, explorer, cfg: IFConfig, factors: dict[str, torch.Tensor]):
        if cfg.exact_scan == "auto":  # resolved here, so the settings (and every cache key) name the scan used
            fits = gradient_table.table_bytes(explorer, cfg) <= GRADIENT_TABLE_MAX_BYTES
            cfg = dataclasses.replace(cfg, exact_scan="gradients" if fits else "difference")
        self.explorer, self.cfg = explorer, cfg
        self._table = None
        self.factors = {k: v.double() for k, v in factors.items()}
        self.cache = explorer.training_cache()
        self.selected = params.select(explorer.unet, cfg.selection)

    @classmethod
    def load(cls, explorer, folder=None, **overrides):
        from abu_explorer.model.backend import provenance

        folder = Path(folder or Path(explorer.root) / "if")
        meta = artifacts.load_json(folder / "meta.json", HINT)
        for key, value in provenance(explorer).items():
            if meta.get(key) != value:
                raise artifacts.ArtifactError(f"{folder / 'meta.json'}: {key} does not match the model; rebuild: {HINT}")
        fixed = sorted(set(overrides) - set(IFConfig.QUERY_TIME))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} are fixed by the precomputed factors; rebuild: {HINT}")
        cfg = dataclasses.replace(IFConfig(**meta["config"]), **overrides)
        factors = artifacts.load_safetensors(folder / "factors.safetensors", HINT)
        for m in tracked_modules(explorer.unet, cfg.selection):
            if f"{m}.lam" not in factors:
                raise artifacts.ArtifactError(f"{folder / 'factors.safetensors'} lacks layer {m}; rebuild: {HINT}")
        method = cls(explorer, cfg, factors)
        method.folder = folder
        return method

    def settings(self) -> dict:
        """What changes this method's ranking: its settings and a hash of its precomputed tables."""
        return method_settings(self.cfg, self.folder)

    def prepare_exact(self, progress=None) -> None:
        """Open what exact mode reads, building it on first use: the gradient table (nothing for the difference)."""
        if self.cfg.exact_scan == "gradients" and self._table is None:
            modules = tracked_modules(self.explorer.unet, self.cfg.selection)
            self._table = gradient_table.load_or_build(self.explorer, self.cfg, modules, progress)

    def discard_exact(self) -> None:
        """Delete this model's gradient table (rebuilt on the next exact query)."""
        self._table = None
        if self.cfg.exact_scan == "gradients":
            gradient_table.discard(self.explorer, self.cfg)

    def exact_derivatives(self, v: torch.Tensor, progress=None) -> torch.Tensor:
        """grad L(z) . v for every image: from the gradient table (built on first use) or by the difference."""
        n = self.cache.num_images
        if self.cfg.exact_scan == "difference":
            return directional_derivatives(self.explorer, self.cache, v, torch.arange(n), self.cfg, progress)
        self.prepare_exact(progress)
        values = gradient_table.directional_derivatives(self._table, v, self.cache.caption_rows(torch.arange(n)))
        return self.cache.per_image(values).max(dim=1).values

    def score(self, query, mode: str = "fast", progress=None) -> Ranking:
        if mode not in ("fast", "exact", ""):
            raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
        mode = mode or "fast"
        t0 = time.perf_counter()
        # 1. v = (H + delta)^-1 grad m(q)
        v = inverse_hvp(query_gradient(self.explorer, query, self.cfg), self.factors, self.explorer.unet, self.cfg)
        phases = {"inverse_hvp": time.perf_counter() - t0}
        n = self.cache.num_images
        notes = "gradient of the box-masked query loss; " if query.box is not None else ""
        t1 = time.perf_counter()
        if mode == "exact":
            # 2. every row's directional derivative along v
            scores = self.exact_derivatives(v, progress)
            phases["scan"] = time.perf_counter() - t1
            return Ranking("if", scores, time.perf_counter() - t0, "exact", phases, notes=notes.rstrip("; "))
        # 2. screen every row by how far v moves its caption's values; 3. measure the top-M exactly
        from abu_explorer.attribution.abu import fill_below, value_shift

        predicted = self.cache.per_image(value_shift(self.selected, v, self.cache.text_states, self.cfg.selection))
        rows = torch.sort(-predicted, stable=True).indices[:min(self.cfg.screen_candidates, n)]
        phases["screen"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        exact = directional_derivatives(self.explorer, self.cache, v, rows, self.cfg, progress)
        phases["rescore"] = time.perf_counter() - t2
        notes += (f"all {n} rows measured exactly (fewer rows than screen candidates)" if len(rows) >= n else
                  f"the {len(rows)} of {n} rows with the largest value shift measured exactly; the others ranked "
                  "below them by the screen (placeholder scores)")
        return Ranking("if", fill_below(n, rows, exact, predicted), time.perf_counter() - t0, "fast", phases,
                       exact_rows=rows, notes=notes)
