"""The model backend: what attribution methods, evaluations and the app use of a text-to-image model.

Everything above ``model/`` talks to a model through these members only, so another backend (a diffusers
pipeline, say) fits beside ``embedded.Explorer`` by implementing them.

# Notation (code -> paper)
#   encode_images(x) -> z       the VAE latent of image x (scaled/shifted as the denoiser was trained)
#   encode_text(prompts) -> c   per-token caption states that condition the denoiser (cross-attention input)
#   unet(z_t, t, c) -> eps_hat  the denoiser epsilon_theta; ``scheduler`` holds alpha_bar_t of the DDPM loss
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelBackend(Protocol):
    root: Path  # folder of the model and of its methods' tables (MODEL/abu, MODEL/if, ...)
    unet: torch.nn.Module  # the denoiser; AbU unlearns its cross-attention K/V (``attn2.to_k`` / ``attn2.to_v``)
    scheduler: object  # the training noise schedule (diffusers DDPMScheduler): the DDPM loss every method measures
    meta: dict  # provenance of each component ({"unet": {"weights_hash": ...}, "dataset": {...}})

    @property
    def dataset(self):
        """The training set (``abu_explorer.data.Dataset``): row i is training image i everywhere."""

    def component_hash(self, part: str) -> str:
        """Weights hash of a component; every artifact records the hashes it was computed from."""

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> (B, L, D) per-token states for cross-attention."""

    @property
    def null_state(self) -> torch.Tensor:
        """(1, L, D) states of the empty caption (classifier-free guidance)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) latents in the denoiser's space."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) images in [-1, 1]."""

    def training_cache(self):
        """Latents and caption states of every training row (``TrainingCache``), computed once."""

    def training_example(self, index: int):
        """(PIL image, caption) of training row ``index``."""

    def generate(self, prompt: str, seed: int = 0, steps: int = 50, guidance: float | None = None,
                 callback=None, record: list | None = None):
        """A ``Generation``: same prompt + seed + settings -> the same image, byte for byte. ``record`` receives
        each sampling step's (timestep, predicted clean latent) (Journey-TRAK attributes along them)."""

    @property
    def image_size(self) -> int:
        """Pixels per side of the model's images (training rows, uploads and boxes are in these units)."""

    default_guidance: float  # classifier-free guidance scale when none is given

    def check_prompt(self, prompt: str) -> None:
        """Raise ``PromptError`` (one readable line) for a prompt the text encoder cannot take."""

    def unknown_words(self, prompt: str) -> list[str]:
        """Words the text encoder reads as unknown (a word-level vocabulary); [] for subword tokenizers."""

    def provenance(self) -> dict:
        """Every component's weights hash and the data hash: recorded beside (and checked against) every table."""

    def image_embedder(self):
        """(images in [-1, 1] -> unit embeddings) of the CLIP that the CLIP nearest-neighbour baseline uses,
        or None when the model has none (the baseline then needs an open_clip model named by the user)."""

    retrain_note: str  # "" when remove-and-regenerate can retrain this model, else one line saying why not


def provenance(backend: ModelBackend) -> dict:
    """What an artifact was computed from (``backend.provenance()``)."""
    return backend.provenance()
