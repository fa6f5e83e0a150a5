"""The training set as every later artifact sees it: images (N, H, W, 3) uint8 on white and captions.

``index`` i is row i: the key that latents, losses, Fisher tables and rankings share. ``content_hash``
covers pixels and captions and is recorded beside every artifact computed from the data.

The images may be a memory-mapped ``.npy`` (image folders, the rendered OpenMoji set): every consumer reads
them in batches (``Dataset.batches``) so that nothing proportional to N x image size is held in RAM.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from abu_explorer import artifacts


@dataclass(frozen=True)
class DataConfig:
    """How the dataset is built. Saved next to every artifact computed from it."""

    source: str = "openmoji"
    image_size: int = 32
    render_size: int = 128
    skin_tones: bool = False  # 2,035 of ~4,050 named glyphs are skin-tone variants of another glyph
    flip: bool = False  # horizontal flips contradict names like "left arrow"; shared by training and scoring

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Dataset:
    """Images (N, H, W, 3) uint8 on white and their captions; ``index`` i is row i.

    ``captions[i]`` is the caption shown for image i; where a folder gives several per image, ``caption_lists[i]``
    holds them all (``captions[i]`` is the first) and every loss averages over them.
    """

    images: np.ndarray
    captions: list[str]
    codes: list[str]
    config: DataConfig
    content_hash: str
    caption_lists: list[list[str]] | None = None

    def all_captions(self) -> list[list[str]]:
        return self.caption_lists if self.caption_lists is not None else [[c] for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"training index {index} out of range [0, {len(self)})")
        return Image.fromarray(self.images[index])

    def as_tensor(self):
        """Float tensor (N, 3, H, W) in [-1, 1] of every image: 12 bytes per pixel; for small sets only
        (training the embedded model, tests). Everything that must scale uses ``batches``."""
        return self.tensor(slice(None))

    def tensor(self, rows) -> "torch.Tensor":  # noqa: F821
        """Float tensor (B, 3, H, W) in [-1, 1] of ``rows`` (a slice, a list or an index array)."""
        return to_tensor(np.asarray(self.images[rows]))

    def batches(self, size: int):
        """``(start, tensor)`` for consecutive row blocks of ``size``: bounded memory over any N."""
        for start in range(0, len(self), size):
            yield start, self.tensor(slice(start, min(start + size, len(self))))


def to_tensor(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def model_image(image: Image.Image, size: int) -> Image.Image:
    """The one policy for every image that enters the model (a training folder, an upload, its preview):
    alpha composited on white (the training glyphs' background), the shorter side area-resized to ``size``,
    then the centre ``size`` x ``size`` square cropped (a square image is only resized)."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    if w == h:
        return rgb.resize((size, size), Image.Resampling.BOX)
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) // 2, (rh - size) // 2
    return rgb.resize((rw, rh), Image.Resampling.BOX).crop((left, top, left + size, top + size))


def content_hash(images: np.ndarray, captions: list[str], caption_lists: list[list[str]] | None = None,
                 chunk: int = 4096) -> str:
    """sha256 of shape, pixels (read ``chunk`` rows at a time, so a memory-mapped array stays on disk) and
    captions; the first 16 hex digits."""
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start:start + chunk]).tobytes())
    h.update("\n".join(captions).encode("utf-8"))
    if caption_lists is not None:
        h.update(("\x1e" + "\n".join("\x1f".join(c) for c in caption_lists)).encode("utf-8"))
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("ABU_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "abu_explorer"
    )
    return Path(root)


def load_dataset_dir(path: Path, config: DataConfig | None = None) -> Dataset:
    meta = artifacts.load_json(Path(path) / "meta.json")
    stored = DataConfig(**meta["config"])
    if config is not None and stored != config:
        raise artifacts.ArtifactError(f"{path}: dataset built with {stored}, expected {config}")
    images = artifacts.load_npy(Path(path) / "images.npy", mmap=True)
    digest = content_hash(images, meta["captions"])
    if digest != meta["content_hash"]:
        raise artifacts.ArtifactError(f"{path}: content hash {digest} != recorded {meta['content_hash']}")
    return Dataset(images, meta["captions"], meta["codes"], stored, digest)
