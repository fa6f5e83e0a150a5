"""The model backend: what every method, evaluation and the app ask of a text-to-image model.

``backend.ModelBackend`` is the interface; ``embedded.Explorer`` implements it for the embedded
latent-diffusion model built from the JSON configs in ``configs/`` by ``components``, and
``diffusers_backend.PipelineBackend`` for a diffusers model with an image folder, and
``customized.CustomizedExplorer`` for a base plus a Custom Diffusion delta. ``load`` is the one factory: a
precomputed folder with ``backend.json`` holds a diffusers model's tables, one with ``customized.json`` a
customized model, any other the embedded model.
"""
from pathlib import Path

from abu_explorer.model.embedded import (
    DEFAULT_GUIDANCE,
    Explorer,
    Generation,
    TrainingCache,
    provenance,
)


def load(precomputed: str | Path = "precomputed", **options):
    """The backend whose tables live in ``precomputed`` (``options`` go to ``Explorer.load``)."""
    from abu_explorer.model import customized
    from abu_explorer.model.diffusers_backend import BACKEND_FILE, PipelineBackend

    if (Path(precomputed) / BACKEND_FILE).exists():
        return PipelineBackend.from_precomputed(precomputed)
    if (Path(precomputed) / customized.SPEC).exists():
        return customized.CustomizedExplorer.load(precomputed)
    return Explorer.load(precomputed, **options)


__all__ = ["DEFAULT_GUIDANCE", "Explorer", "Generation", "TrainingCache", "load", "provenance"]
