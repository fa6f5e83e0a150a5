"""The one list of attribution methods. The CLI, the app, the evaluations, the benchmarks and the docs all
iterate over ``METHODS``; a method's order, label, description and settings live here and nowhere else.

A method is a class with ``load(explorer, **options)`` and ``score(query, mode, progress) -> Ranking``.
Adding one: write its file in this folder, then add its ``MethodSpec`` below.

``ALL_METHODS`` is every method; ``METHODS`` those offered here: a method that needs something the project does
not ship (``needs_env``, e.g. a DINO checkpoint) is offered once that variable names it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import import_module


@dataclass(frozen=True)
class MethodSpec:
    name: str  # CLI / API name
    label: str  # what the app and the tables call it
    module: str  # where its class lives (imported on first use)
    cls: str
    description: str  # one line: what it measures
    score: str  # how to read its score (comparable within one ranking only)
    modes: tuple[str, ...] = ()  # ("fast", "exact") where a screen can stand in for the full scan
    uses_unet: bool = False  # scoring runs (and may move) the shared UNet: the app serialises these
    serving: dict = field(default_factory=dict)  # load options of the serving configuration
    tables: str = ""  # "module:function" that precomputes its tables into MODEL/<name>/ ("" = none needed)
    control: bool = False  # a control, not an attribution (never offered for removal on its own)
    reuses: tuple[str, ...] = ()  # other methods whose precomputed tables this one reads
    needs_env: str = ""  # offered only when this environment variable is set (what it needs, e.g. a checkpoint)
    generated_only: bool = False  # needs a generated query (its sampling trajectory); uploads are refused

    def load_class(self) -> type:
        return getattr(import_module(self.module), self.cls)

    @property
    def precompute_command(self) -> str:
        return f"python -m abu_explorer precompute --method {self.name}" if self.tables else ""

    def precompute(self, explorer, cfg=None, folder=None, progress: bool = True):
        """Build this method's tables (``cfg``: its config dataclass, default settings when None)."""
        module, fn = self.tables.split(":")
        build = getattr(import_module(module), fn)
        settings = {} if cfg is None else {"cfg": cfg}
        return build(explorer, folder=folder, progress=progress, **settings)

    def load(self, explorer, **options):
        """The method with its serving options, ``options`` on top."""
        return self.load_class().load(explorer, **{**self.serving, **options})


_HERE = "abu_explorer.attribution"
ALL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("abu", "AbU (unlearning)", f"{_HERE}.abu", "AbU",
               "Attribution by Unlearning: one Fisher-preconditioned ascent step on the query's DDPM loss "
               "(cross-attention K/V), then every training image's loss change",
               "loss increase after unlearning the query", modes=("fast", "exact"), uses_unet=True,
               # a loss batch of 64 keeps the app's peak memory near 1.2 GB at the speed of 256 (scores do not
               # depend on the batch size)
               serving={"batch_size": 64}, tables=f"{_HERE}.abu_precompute:precompute"),
    MethodSpec("abuplus", "AbU+ (EK-FAC)", f"{_HERE}.abu_plus", "AbUPlus",
               "AbU with the unlearning step preconditioned by the EK-FAC curvature of the same K/V weights "
               "instead of the diagonal Fisher", "loss increase after unlearning the query",
               modes=("fast", "exact"), uses_unet=True, serving={"batch_size": 64}, reuses=("abu", "if")),
    MethodSpec("if", "Influence (EK-FAC)", f"{_HERE}.influence", "InfluenceFunctions",
               "influence functions with kronfluence's EK-FAC Hessian on the same K/V weights",
               "first-order change of the query loss", modes=("fast", "exact"), uses_unet=True,
               tables=f"{_HERE}.influence:precompute"),
    MethodSpec("dtrak", "D-TRAK", f"{_HERE}.dtrak", "DTrak",
               "D-TRAK: projected K/V gradients of a squared-norm output, TRAK kernel",
               "TRAK score", uses_unet=True, tables=f"{_HERE}.dtrak:precompute"),
    MethodSpec("trak", "TRAK", f"{_HERE}.trak", "Trak",
               "TRAK as first applied to diffusion: projected K/V gradients of the DDPM loss itself, TRAK kernel",
               "TRAK score", uses_unet=True, tables=f"{_HERE}.trak:precompute"),
    MethodSpec("journey", "Journey-TRAK", f"{_HERE}.journey_trak", "JourneyTrak",
               "TRAK along the generated image's own sampling trajectory: the query's loss gradients at each "
               "step's predicted clean latent, averaged over the steps (generated queries only)",
               "TRAK score", uses_unet=True, reuses=("trak",), generated_only=True),
    MethodSpec("clip", "CLIP NN", f"{_HERE}.nearest", "ClipNN",
               "nearest neighbours of CLIP image embeddings (faiss, cosine)", "cosine similarity"),
    MethodSpec("pixel", "Pixel NN", f"{_HERE}.nearest", "PixelNN",
               "nearest neighbours in pixel space (faiss, cosine)", "cosine similarity"),
    MethodSpec("dino", "DINO NN", f"{_HERE}.nearest", "DinoNN",
               "nearest neighbours of DINO / DINOv2 image embeddings (transformers, faiss, cosine); needs a "
               "checkpoint: ABU_DINO_MODEL=PATH_OR_HUB_ID", "cosine similarity", needs_env="ABU_DINO_MODEL"),
    MethodSpec("random", "Random", f"{_HERE}.random_baseline", "RandomRanking",
               "a uniformly random ranking seeded by the query: the control", "none (a control)", control=True),
)


def offered(environ=os.environ) -> tuple[MethodSpec, ...]:
    """The methods this environment can run: all but those whose ``needs_env`` is unset."""
    return tuple(m for m in ALL_METHODS if not m.needs_env or environ.get(m.needs_env))


METHODS = offered()


def names() -> list[str]:
    return [m.name for m in METHODS]


def spec(name: str) -> MethodSpec:
    for m in ALL_METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; available: {', '.join(m.name for m in ALL_METHODS)}")


def get_method(name: str) -> type:
    return spec(name).load_class()


def markdown_table() -> str:
    """The registry as the docs show it (``python -m abu_explorer methods --markdown``)."""
    rows = ["| name | label | what it measures | score | modes | tables |", "|---|---|---|---|---|---|"]
    for m in ALL_METHODS:
        tables = (f"`{m.precompute_command}`" if m.tables else
                  f"those of {', '.join(f'`{r}`' for r in m.reuses)}" if m.reuses else "none")
        rows.append(f"| `{m.name}` | {m.label} | {m.description} | {m.score} | {', '.join(m.modes) or 'one'} "
                    f"| {tables} |")
    return "\n".join(rows)
