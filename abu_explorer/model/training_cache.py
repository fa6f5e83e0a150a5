"""The training set as the denoiser sees it: the latents of the N images and the text states of their R caption
rows, computed once per (autoencoder, text encoder, data) and read by every method's scan.

Both tables grow with N, so they are built block by block from the dataset's batches, never from the whole
set at once. ``build`` keeps them in RAM (the embedded model: 2,015 x 2 KB of latents) or, with ``store``,
writes them as ``latents.npy`` / ``text_states.npy`` there and memory-maps them (a user's model: an SD latent
is 64 KB and an SD text state 236 KB, so 100k images need tens of GB). ``cache.json`` records what they were
computed from; a mismatch rebuilds them. Blocks split the data where the backend's own batching does, so a
block's arithmetic is the same as in one pass: built in blocks == built at once, bit for bit (tested).

Sizes (float32): latents N x F x C x h x w x 4 bytes (F = 2 with flips), text states R x L x D x 4 bytes.
Latents without flips are stored channels-last (N, h, w, C) and seen as (N, C, h, w) through a permuted view:
the layout the encoder's convolutions hand over, and the one the denoiser's convolutions run fastest on here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts


@dataclass
class TrainingCache:
    """Latents of the N training images and the states of their R captions (R = N: one caption each).

    With caption lists (``caption_image`` set), row r of ``text_states`` captions image ``caption_image[r]``,
    and an image's loss is the mean over its captions: every method measures per caption row and then
    averages each image's rows (``per_image``), which is exact for losses, gradients and their projections.
    The two tables may be memory-mapped: index them by rows, never copy them whole.
    """

    latents: torch.Tensor  # (N, C, h, w), or (N, 2, C, h, w) with flips (slot 1 = flipped image)
    text_states: torch.Tensor  # (R, L, D)
    null_state: torch.Tensor  # (1, L, D): the empty caption, for classifier-free guidance
    caption_image: torch.Tensor | None = None  # (R,) long, non-decreasing; None: row r captions image r

    @property
    def num_images(self) -> int:
        return len(self.latents)

    def _counts(self) -> torch.Tensor:
        return torch.bincount(self.caption_image, minlength=self.num_images)

    def caption_rows(self, images: torch.Tensor) -> torch.Tensor:
        """The caption rows of ``images``, image by image in the given order."""
        if self.caption_image is None:
            return images
        counts = self._counts()
        starts = torch.cumsum(counts, 0) - counts
        return torch.cat([torch.arange(int(starts[i]), int(starts[i] + counts[i])) for i in images.tolist()])

    def per_image(self, values: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over each image's caption rows: ``values`` (len(caption_rows(images)), ...) ->
        (len(images), ...); ``images`` defaults to all of them."""
        if self.caption_image is None:
            return values
        images = torch.arange(self.num_images) if images is None else images
        counts = self._counts()[images]
        slot = torch.repeat_interleave(torch.arange(len(images)), counts)
        sums = torch.zeros((len(images), *values.shape[1:]), dtype=values.dtype).index_add_(0, slot, values)
        return sums / counts.to(values.dtype).view(-1, *[1] * (values.dim() - 1))


def build(backend, image_block: int, text_block: int, store: Path | None = None, key: dict | None = None,
          progress: bool = False, first_caption_only: bool = False) -> TrainingCache:
    """The training cache of ``backend`` (``encode_images``, ``encode_text``, ``dataset``, ``null_state``).

    ``image_block`` / ``text_block``: rows per block, multiples of the backend's own batch sizes. With
    ``store``, the tables are memory-mapped files there, rebuilt only when ``key`` (what they depend on) changes.
    ``first_caption_only``: one row per image, its first caption (the embedded model trains on those).
    """
    ds = backend.dataset
    lists = [[c] for c in ds.captions] if first_caption_only else ds.all_captions()
    owner = None if len(lists) == sum(len(c) for c in lists) else \
        torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(c) for c in lists]))
    captions = [c for cs in lists for c in cs]  # image by image: the cache's caption rows
    if store is not None and _fresh(Path(store), key):
        lat = artifacts.load_npy(Path(store) / "latents.npy", mmap=True)
        states = artifacts.load_npy(Path(store) / "text_states.npy", mmap=True)
        return TrainingCache(_from_stored(lat), torch.from_numpy(states), backend.null_state.clone(), owner)

    def latents(x: torch.Tensor) -> torch.Tensor:
        lat = backend.encode_images(x)
        return torch.stack([lat, backend.encode_images(x.flip(-1))], dim=1) if ds.config.flip else lat

    probe_lat, probe_txt = _to_stored(latents(ds.tensor(slice(0, 1)))), backend.encode_text(captions[:1])
    lat_shape = (len(ds), *probe_lat.shape[1:])
    txt_shape = (len(captions), *probe_txt.shape[1:])
    lat_out, txt_out = _sink(store, "latents.npy", lat_shape), _sink(store, "text_states.npy", txt_shape)
    try:
        from tqdm.auto import tqdm

        for start, x in tqdm(ds.batches(image_block), total=-(-len(ds) // image_block), desc="encode images",
                             disable=not progress):
            lat_out[start:start + len(x)] = _np(_to_stored(latents(x)))
        for start in tqdm(range(0, len(captions), text_block), desc="encode captions", disable=not progress):
            block = captions[start:start + text_block]
            txt_out[start:start + len(block)] = _np(backend.encode_text(block))
    except BaseException:
        for out in (lat_out, txt_out):
            if isinstance(out, artifacts.NpyWriter):
                out.abort()
        raise
    if store is None:
        return TrainingCache(_from_stored(lat_out), torch.from_numpy(txt_out), backend.null_state.clone(), owner)
    lat_out.commit()
    txt_out.commit()
    artifacts.save_json(Path(store) / "cache.json", {"key": key, "latents_stored": list(lat_shape),
                                                     "text_states": list(txt_shape)})
    return build(backend, image_block, text_block, store, key, first_caption_only=first_caption_only)


def _to_stored(lat: torch.Tensor) -> torch.Tensor:
    return lat.permute(0, 2, 3, 1) if lat.dim() == 4 else lat  # (B, C, h, w) -> (B, h, w, C)


def _from_stored(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t  # a channels-last view, no copy


def _fresh(store: Path, key: dict | None) -> bool:
    meta = store / "cache.json"
    if not (meta.exists() and (store / "latents.npy").exists() and (store / "text_states.npy").exists()):
        return False
    return artifacts.load_json(meta).get("key") == key


def _sink(store: Path | None, name: str, shape: tuple[int, ...]):
    if store is None:
        return np.empty(shape, dtype=np.float32)
    return artifacts.NpyWriter(Path(store) / name, shape, np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()
