"""A user's Custom Diffusion fine-tune, as diffusers' training script saves it, applied to a diffusers model.

The script (``examples/custom_diffusion/train_custom_diffusion.py``) writes a folder with
``pytorch_custom_diffusion_weights.safetensors`` (or ``.bin``): the new cross-attention K/V projections under
``<block>.attn2.processor.to_k_custom_diffusion.weight`` (and ``to_v``; ``to_q`` / ``to_out`` with
``--freeze_model crossattn``), and one ``<token>.safetensors`` (or ``.bin``) per modifier token, holding its
embedding. diffusers runs them through ``CustomDiffusionAttnProcessor``, whose forward pass is the plain
attention with those weights. Here they are copied into the UNet's own ``attn2.to_k`` / ``to_v`` (...) weights
instead, so every method finds the fine-tuned K/V where it always looks, and the tokens are added to the
tokenizer and the text encoder's embedding table. ``.bin`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from abu_explorer import artifacts

WEIGHTS = "pytorch_custom_diffusion_weights"
_TARGET = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
           "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
           "to_out_custom_diffusion.0.bias": "to_out.0.bias"}


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return artifacts.load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never objects
    except Exception as e:
        raise ValueError(f"{path}: not a plain tensor file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors")
    return state


def unet_state(state: dict) -> dict[str, torch.Tensor]:
    """Processor keys -> the UNet's own parameter names (``...attn2.processor.to_k_custom_diffusion.weight`` ->
    ``...attn2.to_k.weight``); entries without tensors (untrained processors) are skipped."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        head, sep, tail = key.partition(".processor.")
        if not sep or tail not in _TARGET:
            raise ValueError(f"unexpected key {key!r} in the Custom Diffusion weights")
        out[f"{head}.{_TARGET[tail]}"] = value
    if not out:
        raise ValueError("the Custom Diffusion weights hold no trained projection")
    return out


def apply(folder: str | Path, unet, text_encoder, tokenizer) -> dict:
    """Copy the fine-tune in ``folder`` into ``unet`` / ``text_encoder`` / ``tokenizer`` (in place). Returns
    {"tokens": [...], "parameters": [...]}."""
    folder = Path(folder)
    files = [folder / f"{WEIGHTS}{ext}" for ext in (".safetensors", ".bin")]
    weights = next((f for f in files if f.exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS}.safetensors or .bin (the Custom Diffusion script's output)")
    target = unet_state(_read(weights))
    params = dict(unet.named_parameters())
    for name, value in target.items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"{weights}: {name} {tuple(value.shape)} does not fit this UNet")
    with torch.no_grad():
        for name, value in target.items():
            params[name].copy_(value)
    tokens = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(WEIGHTS) or path.suffix not in (".safetensors", ".bin"):
            continue
        for token, vector in _read(path).items():
            tokens.append(token)
            _add_token(token, vector, text_encoder, tokenizer, path)
    return {"tokens": tokens, "parameters": sorted(target)}


def _add_token(token: str, vector: torch.Tensor, text_encoder, tokenizer, path: Path) -> None:
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"{path}: token {token!r} is already in the tokenizer")
    with torch.random.fork_rng(devices=[]):  # the new row's placeholder init must not move the global generator
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    vector = vector.reshape(-1)
    if vector.numel() != table.shape[1]:
        raise ValueError(f"{path}: {token!r} has {vector.numel()} values, the text encoder {table.shape[1]}")
    with torch.no_grad():
        table[tokenizer.convert_tokens_to_ids(token)] = vector.to(table.dtype)
