"""D-TRAK (Zheng, Pang, Du, Lin; ICLR 2024): TRAK for diffusion models with a squared-norm output.

# Notation (code -> paper)
#   f(z) = mean_t ||eps_theta(x_t, t)||^2  -> the model output function (D-TRAK's "Square" choice), at fixed
#                                            timesteps and fixed noise, masked to the box for local queries
#   phi(z) = P^T grad_theta f(z)            -> projected gradient features, P fixed Gaussian (d columns)
#   Phi                                     -> (N, d) training features, stored fp16 in ``precomputed/dtrak``
#   scores = Phi (Phi^T Phi + lambda I)^-1 phi(query)
# theta is the same selection as AbU (cross-attention K/V by default). With d >= N and lambda = 0 the
# kernel is singular: loading refuses that combination.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution import Ranking, distributed
from abu_explorer.attribution.ddpm_loss import ddpm_losses, eval_timesteps, item_noise
from abu_explorer.attribution.gradients import PerExampleGradients
from abu_explorer.attribution.settings import method_settings

HINT = "python -m abu_explorer precompute --method dtrak"
QUERY_ROW = 2**40  # noise key of a query (no training row has it)


@dataclass(frozen=True)
class DTrakConfig:
    selection: str = "cross-attn"
    num_timesteps: int = 10
    noise_seed: int = 0
    proj_dim: int = 1024
    projection_seed: int = 0
    lam: float = 0.0  # ridge term; must be > 0 when proj_dim >= N
    batch_size: int = 160
    output: str = "square"  # model output function: "square" (D-TRAK) or "loss" (TRAK as published, trak.py)

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {sorted(OUTPUTS)}, got {self.output!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def project(vectors: torch.Tensor, dim: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """(B, P) -> (B, dim) through a fixed Gaussian matrix (entries N(0, 1/dim)), drawn in chunks of rows from
    seeded generators. The chunks are kept (``projection_chunks``) when the matrix fits the cache budget, so a
    query does not draw P x dim normals again; the products are the same either way, bit for bit."""
    out = torch.zeros(len(vectors), dim)
    for start, matrix in projection_chunks(vectors.shape[1], dim, seed, chunk):
        out += vectors[:, start:start + len(matrix)].float() @ matrix
    return out / dim ** 0.5


_PROJECTION_LOCK = threading.Lock()
_PROJECTION: dict = {}  # (P, dim, seed, chunk) -> [(start, chunk matrix)]: the last matrix that fitted the budget


def projection_cache_bytes() -> int:
    """``ABU_PROJECTION_CACHE_MB`` (default 1024): the largest projection matrix kept in memory between calls
    (the embedded model's D-TRAK / TRAK matrix is ~740 MB; a Stable Diffusion one would be far larger and is
    drawn chunk by chunk instead)."""
    return int(float(os.environ.get("ABU_PROJECTION_CACHE_MB", "1024")) * 2**20)


def _draw(rows: int, dim: int, seed: int, chunk: int):
    for c, start in enumerate(range(0, rows, chunk)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        yield start, torch.randn(min(start + chunk, rows) - start, dim, generator=g)


def projection_chunks(rows: int, dim: int, seed: int, chunk: int = 8192):
    """The projection matrix's row chunks [(start, (rows_c, dim))], from the cache when it fits, else drawn."""
    key = (rows, dim, seed, chunk)
    if rows * dim * 4 > projection_cache_bytes():
        yield from _draw(rows, dim, seed, chunk)
        return
    with _PROJECTION_LOCK:  # built once; later calls (any thread) read the same tensors
        if key not in _PROJECTION:
            _PROJECTION.clear()
            _PROJECTION[key] = list(_draw(rows, dim, seed, chunk))
        chunks = _PROJECTION[key]
    yield from chunks


def _square(unet, scheduler, x0, t, noise, context, mask=None) -> torch.Tensor:
    """Per-item ||eps_theta(x_t, t)||^2 (mean over elements; masked cells only with a box)."""
    pred = unet(scheduler.add_noise(x0, noise, t), t, context).sample.pow(2)
    if mask is None:
        return pred.mean(dim=(1, 2, 3))
    w = mask.to(pred.dtype)[None, None]
    return (pred * w).sum(dim=(1, 2, 3)) / (w.sum() * pred.shape[1])


OUTPUTS = {"square": _square, "loss": ddpm_losses}  # D-TRAK's output / the DDPM loss (TRAK)


def features(unet, scheduler, latents, states, rows_keys, cfg: DTrakConfig, mask=None, progress=None,
             latent_of: torch.Tensor | None = None):
    """(R, d) projected gradients of f for the R rows of ``states``, with noise keyed by ``rows_keys``; row r's
    latent is ``latents[latent_of[r]]`` (default ``latents[r]``), read batch by batch (never gathered whole)."""
    timesteps = eval_timesteps(cfg.num_timesteps, scheduler.config.num_train_timesteps)
    pex = PerExampleGradients(unet, cfg.selection)
    per = max(1, cfg.batch_size // len(timesteps))
    shape = tuple(latents.shape[1:])
    output = OUTPUTS[cfg.output]
    n = len(states)
    latent_of = torch.arange(n) if latent_of is None else latent_of

    def batch(b: int) -> torch.Tensor:
        idx = list(range(b * per, min((b + 1) * per, n)))
        items = [(i, t) for i in idx for t in timesteps]
        r = torch.tensor([i for i, _ in items])
        t = torch.tensor([t for _, t in items])
        noise = torch.stack([item_noise(cfg.noise_seed, int(rows_keys[i]), 0, t, shape) for i, t in items])
        x0 = latents[latent_of[r]]
        g = pex(lambda: output(unet, scheduler, x0, t, noise, states[r], mask), len(items))
        return project(g.view(len(idx), len(timesteps), -1).mean(dim=1), cfg.proj_dim, cfg.projection_seed)

    num = (n + per - 1) // per
    return torch.cat(distributed.run_batches(batch, num, progress))


def precompute(explorer, cfg: DTrakConfig = DTrakConfig(), folder: Path | None = None, progress=True,
               name: str = "dtrak") -> Path:
    from tqdm.auto import tqdm

    from abu_explorer.model.backend import provenance

    folder = Path(folder or Path(explorer.root) / name)
    cache = explorer.training_cache()
    if cache.latents.dim() == 5:
        raise ValueError("D-TRAK here supports models trained without flips")
    if cfg.proj_dim >= len(cache.latents) and cfg.lam <= 0:  # refused now, not after the whole scan
        raise ValueError(f"D-TRAK proj_dim {cfg.proj_dim} >= N {len(cache.latents)} with lambda 0: the kernel is "
                         "singular; choose a smaller projection (precompute --proj-dim)")
    bar = tqdm(desc=f"{name} features", disable=not progress or distributed.rank_world()[0] != 0)
    image = torch.arange(cache.num_images) if cache.caption_image is None else cache.caption_image
    # one feature per caption row (its image's latent and noise key), then each image's mean: the projection is
    # linear, so that is the projected gradient of the image's caption-averaged output
    phi = cache.per_image(features(explorer.unet, explorer.scheduler, cache.latents, cache.text_states, image, cfg,
                                   progress=lambda i, n: (setattr(bar, "total", n), bar.update(i - bar.n)),
                                   latent_of=image))
    if distributed.rank_world()[0] == 0:
        artifacts.save_npy(folder / "features.npy", phi.half().numpy())
        artifacts.save_json(folder / "meta.json", {"config": cfg.to_dict(), **provenance(explorer),
                                                   "num_train": len(phi)})
    return folder


class DTrak:
    name = "dtrak"
    hint = HINT
    tables = "dtrak"  # the folder of its training features

    def __init__(self, explorer, cfg: DTrakConfig, phi: torch.Tensor):
        self.explorer, self.cfg = explorer, cfg
        n, d = phi.shape
        if d >= n and cfg.lam <= 0:
            raise ValueError(f"proj_dim {d} >= N {n} with lambda 0: the kernel is singular; set lam > 0")
        self.phi = phi  # (N, d), float16 and memory-mapped when loaded: used BLOCK rows at a time
        gram = sum(b.T @ b for b in self.phi_blocks()) + cfg.lam * torch.eye(d)
        self.chol = torch.linalg.cholesky(gram.double())

    BLOCK = 65536  # rows of phi in float32 at a time (256 MB at d = 1,024); one block up to N = 65,536

    def phi_blocks(self):
        for start in range(0, len(self.phi), self.BLOCK):
            yield self.phi[start:start + self.BLOCK].float()

    @classmethod
    def load(cls, explorer, folder=None, **overrides):
        from abu_explorer.model.backend import provenance

        folder = Path(folder or Path(explorer.root) / cls.tables)
        meta = artifacts.load_json(folder / "meta.json", cls.hint)
        for key, value in provenance(explorer).items():
            if meta[key] != value:
                raise artifacts.ArtifactError(f"{folder / 'meta.json'}: {key} does not match the model; rebuild: {cls.hint}")
        cfg = dataclasses.replace(DTrakConfig(**meta["config"]), **overrides)
        phi = torch.from_numpy(artifacts.load_npy(folder / "features.npy", cls.hint, mmap=True))
        if phi.shape != (meta["num_train"], cfg.proj_dim):
            raise artifacts.ArtifactError(f"{folder / 'features.npy'} has shape {tuple(phi.shape)}; rebuild: {cls.hint}")
        method = cls(explorer, cfg, phi)
        method.folder = folder
        return method

    def settings(self) -> dict:
        """What changes this method's ranking: its settings and a hash of its precomputed tables."""
        return method_settings(self.cfg, self.folder)

    box_note = "gradient of the box-masked output"

    def query_feature(self, query) -> torch.Tensor:
        """phi(query): the projected gradient of the output at fresh noise on the query's latent."""
        ctx = self.explorer.encode_text([query.prompt])
        return features(self.explorer.unet, self.explorer.scheduler, query.latent[None], ctx,
                        torch.tensor([QUERY_ROW]), self.cfg, query.mask)[0]

    def score(self, query, mode: str = "", progress=None) -> Ranking:
        t0 = time.perf_counter()
        phi_q = self.query_feature(query)
        t1 = time.perf_counter()
        weights = torch.cholesky_solve(phi_q.double()[:, None], self.chol)[:, 0].float()
        scores = torch.cat([b @ weights for b in self.phi_blocks()])
        notes = self.box_note if query.box is not None else ""
        return Ranking(self.name, scores, time.perf_counter() - t0, "trak",
                       {"query_gradient": t1 - t0, "kernel": time.perf_counter() - t1}, notes=notes)
