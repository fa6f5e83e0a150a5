"""Nearest-neighbour baselines: pixel space and CLIP image embeddings (faiss), cosine similarity.

The query image is the decoded query latent (for a generated query: exactly the image shown). With a
box, the crop is resized (area filter) to the model's input size and embedded instead. As the paper does
for every method, a training image scores the max over itself and its horizontal flip when the model was
trained with flips.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from abu_explorer.attribution import Ranking


def query_pixels(explorer, query) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: the decoded query, cropped to its box and resized back when it has one."""
    x = explorer.decode(query.latent[None])
    if query.box is None:
        return x
    x0, y0, x1, y1 = query.box
    size = x.shape[-1]
    crop = x[:, :, int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))]
    return F.interpolate(crop, size=(size, size), mode="area" if crop.shape[-1] >= size else "bilinear",
                         align_corners=None if crop.shape[-1] >= size else False)


def featurize(embed, dataset, block: int = 256, progress=None) -> np.ndarray:
    """``embed`` of every image (and its mirror image when the data uses flips): float32 (N * V, D), row
    i * V + v. Images are read ``block`` at a time from the (possibly memory-mapped) dataset, and the blocks
    are sharded over torch.distributed ranks when launched by torchrun (each block as in one process)."""
    from abu_explorer.attribution import distributed

    n = len(dataset)

    def one(b: int) -> torch.Tensor:
        x = dataset.tensor(slice(b * block, min((b + 1) * block, n)))
        views = [x, x.flip(-1)] if dataset.config.flip else [x]
        return torch.stack([embed(v) for v in views], dim=1).flatten(0, 1).float()

    parts = distributed.run_batches(one, -(-n // block), progress)
    return torch.cat(parts).numpy().astype(np.float32)


class _Nearest:
    """Shared logic: ``embed(images) -> (B, D)`` normalised; faiss inner-product search over all rows."""

    name = ""
    box_note = "the box crop, resized to the model input, is embedded"

    def __init__(self, explorer, index_type: str = "Flat"):
        import faiss

        self.explorer, self.index_type = explorer, index_type
        ds = explorer.dataset
        self.n_views = 2 if ds.config.flip else 1
        emb = featurize(self.embed, ds)  # (N * V, D), row-major over (image, view)
        self.index = faiss.index_factory(emb.shape[1], index_type, faiss.METRIC_INNER_PRODUCT)
        self.index.add(emb)

    @classmethod
    def load(cls, explorer, **kwargs):
        return cls(explorer, **kwargs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        """What changes this method's ranking (its index is built from the model and data at load)."""
        return {"config": {"index_type": self.index_type, **self.embedder_settings()}, "tables": ""}

    def embedder_settings(self) -> dict:
        return {}

    def score(self, query, mode: str = "", progress=None) -> Ranking:
        t0 = time.perf_counter()
        q = self.embed(query_pixels(self.explorer, query)).numpy().astype(np.float32)
        sims, ids = self.index.search(q, self.index.ntotal)  # every (row, view), sorted
        scores = torch.full((self.index.ntotal // self.n_views,), -np.inf)
        rows = torch.from_numpy(ids[0] // self.n_views)
        vals = torch.from_numpy(sims[0]).float()
        scores = scores.scatter_reduce(0, rows, vals, reduce="amax")
        notes = self.box_note if query.box is not None else ""
        return Ranking(self.name, scores, time.perf_counter() - t0, "nn", {"search": time.perf_counter() - t0},
                       notes=notes)


class PixelNN(_Nearest):
    """Cosine similarity of raw pixels (32x32x3, centred on the dataset's white background)."""

    name = "pixel"
    max_side = 64  # larger images are area-averaged to 64 x 64 first: 12,288 dims, not 786k for 512 px

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] > self.max_side or images.shape[-2] > self.max_side:
            images = F.interpolate(images, size=(self.max_side, self.max_side), mode="area")
        return F.normalize((images - 1.0).flatten(1), dim=1)  # white (+1) -> 0, so empty space adds nothing

    def embedder_settings(self) -> dict:
        return {"max_side": self.max_side} if self.explorer.image_size > self.max_side else {}


class ClipNN(_Nearest):
    """Cosine similarity of CLIP image embeddings: the project's own CLIP by default, or any open_clip model
    given by name with a pretrained tag (downloaded by open_clip) or a local ``.safetensors`` checkpoint."""

    name = "clip"

    def __init__(self, explorer, index_type: str = "Flat", model_name: str | None = None,
                 pretrained: str | None = None):
        self.external = _external_clip(model_name, pretrained) if model_name else None
        self.model_name, self.pretrained = model_name, pretrained
        super().__init__(explorer, index_type)

    def embedder_settings(self) -> dict:
        return {"model_name": self.model_name, "pretrained": self.pretrained} if self.model_name else {}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.external is not None:
            model, size, mean, std = self.external
            out = []
            for x in images.split(64):  # [-1, 1] -> the model's input size and normalisation
                x = F.interpolate((x + 1) / 2, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
                out.append(model.encode_image((x - mean) / std, normalize=True))
            return torch.cat(out)
        embed = self.explorer.image_embedder()
        if embed is None:
            raise ValueError("this model has no image CLIP of its own; name an open_clip model for the CLIP "
                             "baseline (--clip-model NAME --clip-pretrained TAG_OR_SAFETENSORS)")
        return embed(images)


def _external_clip(model_name: str, pretrained: str | None):
    """(model, (h, w), mean, std) of an open_clip model; local checkpoints must be safetensors (no pickles)."""
    from pathlib import Path

    import open_clip

    if pretrained and (Path(pretrained).exists() or "/" in pretrained) and not pretrained.endswith(".safetensors"):
        raise ValueError(f"local CLIP checkpoints must be .safetensors (never unpickled), got {pretrained}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu").eval()
    except Exception as e:  # unknown name, missing tag, no network for a download: one readable line
        raise ValueError(f"cannot load open_clip model {model_name!r} with pretrained={pretrained!r}: "
                         f"{type(e).__name__}: {str(e)[:300]}") from None
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return model, tuple(size), mean, std


class DinoNN(_Nearest):
    """Cosine similarity of DINO / DINOv2 image embeddings (the strongest feature baseline of the AbU paper's
    MSCOCO table), from a local folder or a Hub id through transformers; safetensors weights only."""

    name = "dino"

    def __init__(self, explorer, index_type: str = "Flat", model: str | None = None):
        import os

        self.model_id = model or os.environ.get("ABU_DINO_MODEL", "")
        if not self.model_id:
            raise ValueError("DINO NN needs a DINO or DINOv2 checkpoint: set ABU_DINO_MODEL=PATH_OR_HUB_ID "
                             "(e.g. facebook/dinov2-small) or pass --dino-model")
        self.model, self.size, self.mean, self.std = _dino(self.model_id)
        super().__init__(explorer, index_type)

    def embedder_settings(self) -> dict:
        return {"model": self.model_id, "weights": self.weights_hash}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for x in images.split(64):  # [-1, 1] -> the checkpoint's input size and normalisation
            x = F.interpolate((x + 1) / 2, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
            hidden = self.model(pixel_values=(x - self.mean) / self.std)
            cls = hidden.pooler_output if getattr(hidden, "pooler_output", None) is not None \
                else hidden.last_hidden_state[:, 0]
            out.append(F.normalize(cls.float(), dim=1))
        return torch.cat(out)

    @property
    def weights_hash(self) -> str:
        from abu_explorer.artifacts import state_hash

        if not hasattr(self, "_weights_hash"):
            self._weights_hash = state_hash(self.model.state_dict())
        return self._weights_hash


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINO's normalisation when no processor is saved


def _dino(model_id: str):
    """(model, (h, w), mean, std): the backbone, and the crop size and normalisation of its image processor
    (the model config's image size and ImageNet statistics when it has none)."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(model_id, use_safetensors=True).eval()
    except Exception as e:  # no such folder or id, no network, pickled weights: one readable line
        raise ValueError(f"cannot load the DINO checkpoint {model_id!r} (safetensors only): "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    mean, std, size = *IMAGENET, model.config.image_size
    try:
        proc = AutoImageProcessor.from_pretrained(model_id)
        mean, std = proc.image_mean, proc.image_std
        crop = getattr(proc, "crop_size", None) or {}
        size = crop.get("height", size)
    except (OSError, ValueError):
        pass  # no preprocessor_config.json: the defaults above
    size = (size, size) if isinstance(size, int) else tuple(size)
    return model, size, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
