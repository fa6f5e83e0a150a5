"""Attribution queries: a latent to unlearn, its prompt, and optionally a box (local attribution).

Three sources: a generated image (the sampler's latent is reused, never re-encoded), an uploaded
image + caption (encoded by the autoencoder), and a training image by index (a sanity query).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

Box = tuple[float, float, float, float]


class QueryError(ValueError):
    """A query the engine cannot take: bad box, unreadable image, bad index."""


@dataclass
class Query:
    latent: torch.Tensor  # (C, h, w), scaled latent space of the UNet
    prompt: str
    source: dict  # how the query was made, for JSON output and caching
    image_size: int  # pixels of the decoded image (the box is given in these units)
    box: Box | None = None
    mask: torch.Tensor | None = field(default=None, repr=False)  # (h, w) coverage weights in [0, 1]

    def describe(self) -> dict:
        return {**self.source, "prompt": self.prompt, "box": list(self.box) if self.box else None}


def box_mask(box: Box, image_size: int, latent_size: int) -> torch.Tensor:
    """Map a pixel box (x0, y0, x1, y1) to latent cells, each weighted by the fraction it covers."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        if x1 <= x0 or y1 <= y0:
            raise QueryError(f"box {box} has zero or negative area (need x0 < x1 and y0 < y1)")
        raise QueryError(f"box {box} is outside the {image_size}x{image_size} image")
    cell = image_size / latent_size
    edges = torch.arange(latent_size + 1, dtype=torch.float64) * cell

    def coverage(lo, hi):
        return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
                .clamp(min=0) / cell)

    return (coverage(y0, y1)[:, None] * coverage(x0, x1)[None, :]).float()


def with_box(query: Query, box: Box | None) -> Query:
    if box is None:
        return query
    mask = box_mask(box, query.image_size, query.latent.shape[-1])
    return Query(query.latent, query.prompt, query.source, query.image_size, tuple(float(v) for v in box), mask)


def from_generation(explorer, prompt: str, seed: int, steps: int = 50, guidance: float | None = None,
                    box: Box | None = None) -> Query:
    g = explorer.generate(prompt, seed, steps, guidance)
    src = {"type": "generated", "seed": seed, "steps": steps, "guidance": g.guidance}
    return with_box(Query(g.latent, prompt, src, g.image.width), box)


def from_image(explorer, image: Image.Image | str, caption: str, box: Box | None = None) -> Query:
    from abu_explorer.model.embedded import image_to_tensor

    if isinstance(image, str):
        try:
            with Image.open(image) as im:
                image = im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise QueryError(f"cannot read image {image}: {e}") from None
    explorer.check_prompt(caption)
    size = explorer.image_size
    pixels = image_to_tensor(image, size)
    latent = explorer.encode_images(pixels)[0]
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16]  # two uploads never share a cache key
    return with_box(Query(latent, caption, {"type": "upload", "image_hash": digest}, size), box)


def from_training_image(explorer, index: int, box: Box | None = None) -> Query:
    n = len(explorer.dataset)
    if not 0 <= index < n:
        raise QueryError(f"training index {index} out of range [0, {n})")
    x = explorer.dataset.tensor(slice(index, index + 1))
    latent = explorer.encode_images(x)[0]
    size = explorer.image_size
    return with_box(Query(latent, explorer.dataset.captions[index], {"type": "train", "index": index}, size), box)
