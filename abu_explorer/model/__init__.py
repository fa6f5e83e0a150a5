"""The model backend: what every method, evaluation and the app ask of a text-to-image model.

``backend.ModelBackend`` is the interface; ``embedded.Explorer`` implements it for the embedded
latent-diffusion model built from the JSON configs in ``configs/`` by ``components``.
"""
from abu_explorer.model.embedded import (
    DEFAULT_GUIDANCE,
    Explorer,
    Generation,
    TrainingCache,
    provenance,
)

__all__ = ["DEFAULT_GUIDANCE", "Explorer", "Generation", "TrainingCache", "provenance"]
