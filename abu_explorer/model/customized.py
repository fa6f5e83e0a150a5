"""A customized model: a base model plus a small Custom Diffusion delta, trained on a few exemplar images.

Custom Diffusion (Kumari et al., CVPR 2023) fine-tunes only the cross-attention key/value projections and the
embedding of one new modifier token (``<new1>``). That is all a customized model stores (``delta.safetensors``,
0.7 MB on the embedded model), beside its exemplars as an image folder and ``customized.json``:

    FOLDER/customized.json      {"base": (relative to FOLDER), "base_provenance", "token": "<new1>", "init_word", ...}
    FOLDER/delta.safetensors    the fine-tuned attn2.to_k / to_v weights and the token's embedding
    FOLDER/exemplars/           metadata.jsonl + images: what the model was customized on

Loaded, it is a model backend like any other: its training set is the base's rows followed by the exemplars
(row ``N + j`` is exemplar j), so every method attributes over pretraining and customization data at once,
and its tables live in ``FOLDER/<method>/``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts, data
from abu_explorer.attribution.params import select
from abu_explorer.model.embedded import Explorer

SPEC, DELTA = "customized.json", "delta.safetensors"
EMBED_KEY = "token_embedding"
HINT = "python -m abu_explorer evaluate customized"


class ExtendedEmbedding(torch.nn.Module):
    """A token-embedding table with rows appended: the base rows frozen, the new rows trainable."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base.weight.detach().clone(), persistent=False)
        self.extra = torch.nn.Parameter(extra.detach().clone().reshape(-1, self.base.shape[1]))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.extra])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)


def text_tower(clip):
    return clip.text if hasattr(clip, "text") else clip


def attach_token(explorer: Explorer, token: str, init: torch.Tensor | str) -> torch.nn.Parameter:
    """Give ``explorer`` (in place) the modifier ``token``, its embedding initialised from the word ``init``
    (or set to the tensor ``init``). Returns the new embedding row (a parameter)."""
    tower = text_tower(explorer.clip)
    table = tower.token_embedding
    if isinstance(init, str):
        if init not in explorer.tokenizer.index:
            raise ValueError(f"initial word {init!r} is not in the model's vocabulary")
        init = table.weight[explorer.tokenizer.index[init]]
    explorer.tokenizer = explorer.tokenizer.with_token(token)
    tower.token_embedding = ExtendedEmbedding(table, init)
    explorer._null = None  # the null caption's states do not change, but keep no stale cache
    return tower.token_embedding.extra


def kv_weights(unet) -> dict[str, torch.nn.Parameter]:
    """What Custom Diffusion fine-tunes in the UNet: the cross-attention K/V projections."""
    return select(unet, "cross-attn")


def delta_tensors(explorer: Explorer) -> dict[str, torch.Tensor]:
    out = {f"unet.{n}": p.detach().clone() for n, p in kv_weights(explorer.unet).items()}
    out[EMBED_KEY] = text_tower(explorer.clip).token_embedding.extra.detach().clone()
    return out


def combined_hash(*parts: str) -> str:
    return hashlib.sha256("+".join(parts).encode()).hexdigest()[:16]


def exemplar_rows(folder: Path, image_size: int) -> data.Dataset:
    return data.load_image_folder(Path(folder) / "exemplars", image_size)


class CustomizedExplorer(Explorer):
    """The base model with a Custom Diffusion delta applied (``ModelBackend``)."""

    @classmethod
    def load(cls, folder: str | Path, base: Explorer | None = None, **_) -> CustomizedExplorer:
        folder = Path(folder)
        spec = artifacts.load_json(folder / SPEC, HINT)
        delta = artifacts.load_safetensors(folder / DELTA, HINT)
        base = base or Explorer.load(folder / spec["base"])  # relative to the folder (an absolute path stays)
        if base.provenance() != spec["base_provenance"]:
            raise artifacts.ArtifactError(f"{folder / SPEC}: customized from another base model "
                                          f"({spec['base_provenance']}); retrain it with: {HINT}")
        # the UNet and text encoder are copies: a base shared with the caller stays as it was
        self = cls(folder, base.vae, copy.deepcopy(base.clip), base.tokenizer, copy.deepcopy(base.unet),
                   base.scheduler_config, None,
                   {k: dict(v) if isinstance(v, dict) else v for k, v in base.meta.items()})
        self.base_root = Path(spec["base"])
        self.spec = spec
        attach_token(self, spec["token"], delta[EMBED_KEY])
        kv = kv_weights(self.unet)
        if set(kv) != {k[len("unet."):] for k in delta if k.startswith("unet.")}:
            raise artifacts.ArtifactError(f"{folder / DELTA} does not hold this UNet's cross-attention K/V weights")
        with torch.no_grad():
            for n, p in kv.items():
                p.copy_(delta[f"unet.{n}"])
        # 1. the training set: the base's rows, then the exemplars
        self._dataset = concatenate(base.dataset, exemplar_rows(folder, base.image_size))
        # 2. provenance: the delta changes the UNet and the text encoder's table; the rows change the data
        delta_hash = artifacts.state_hash(delta)
        self.meta["unet"]["weights_hash"] = combined_hash(base.component_hash("unet"), delta_hash)
        self.meta["clip"]["weights_hash"] = combined_hash(base.component_hash("clip"), delta_hash)
        self.meta["dataset"] = {**base.meta["dataset"], "content_hash": self._dataset.content_hash}
        self.num_base = len(base.dataset)
        return self

    @property
    def exemplars(self) -> list[int]:
        """Training rows of the exemplars (the known answer of a query on this model)."""
        return list(range(self.num_base, len(self.dataset)))

    @property
    def dataset(self) -> data.Dataset:
        return self._dataset


def concatenate(base: data.Dataset, extra: data.Dataset) -> data.Dataset:
    """Rows of ``base`` followed by those of ``extra`` (one caption each)."""
    if base.images.shape[1:] != extra.images.shape[1:]:
        raise ValueError(f"exemplars are {extra.images.shape[1:]}, the training images {base.images.shape[1:]}")
    images = np.concatenate([np.asarray(base.images), np.asarray(extra.images)])
    captions = list(base.captions) + list(extra.captions)
    return data.Dataset(images, captions, list(base.codes) + [f"exemplar:{c}" for c in extra.codes], base.config,
                        data.content_hash(images, captions))


def save(folder: Path, explorer: Explorer, spec: dict, exemplars: np.ndarray, caption: str) -> Path:
    """Write a customized model: its delta, its exemplars as an image folder, and its spec (atomically, each)."""
    from PIL import Image

    folder = Path(folder)
    rows = []
    for j, arr in enumerate(exemplars):
        name = f"exemplar_{j:02d}.png"
        artifacts.save_png(folder / "exemplars" / name, Image.fromarray(arr))
        rows.append({"file_name": name, "text": caption})
    artifacts.save_text(folder / "exemplars" / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    artifacts.save_safetensors(folder / DELTA, delta_tensors(explorer), {"token": spec["token"]})
    artifacts.save_json(folder / SPEC, spec)
    return folder


def fresh_copy(base: Explorer) -> Explorer:
    """An ``Explorer`` sharing ``base``'s autoencoder and data but owning copies of its UNet and text encoder:
    what Custom Diffusion fine-tunes (``base`` stays as it was)."""
    return Explorer(base.root, base.vae, copy.deepcopy(base.clip), base.tokenizer, copy.deepcopy(base.unet),
                    base.scheduler_config, base.dataset, base.meta)
