"""Which UNet weights AbU (and the gradient baselines) treat as theta.

- ``cross-attn`` (default, the paper's): cross-attention key/value projections ``attn2.to_k/to_v``;
- ``attn``: every attention projection (self and cross: to_q, to_k, to_v, to_out);
- ``all``: every parameter.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SELECTIONS = ("cross-attn", "attn", "all")


def _keep(name: str, selection: str) -> bool:
    if selection == "cross-attn":
        return ".attn2." in name and (".to_k." in name or ".to_v." in name)
    if selection == "attn":
        return (".attn1." in name or ".attn2." in name) and any(
            f".{p}." in name or f".{p}.0." in name for p in ("to_q", "to_k", "to_v", "to_out"))
    if selection == "all":
        return True
    raise ValueError(f"unknown parameter selection {selection!r}; choose from {', '.join(SELECTIONS)}")


def select(unet: torch.nn.Module, selection: str = "cross-attn") -> dict[str, torch.nn.Parameter]:
    """Name -> parameter, in the module's order (a fixed order shared by every flat vector)."""
    chosen = {n: p for n, p in unet.named_parameters() if _keep(n, selection)}
    if not chosen:
        raise ValueError(f"selection {selection!r} matches no UNet parameter")
    return chosen


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, t in like.items():
        out[n] = vector[i:i + t.numel()].view_as(t)
        i += t.numel()
    if i != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, parameters {i}")
    return out


@contextlib.contextmanager
def only_grad_for(module: torch.nn.Module, names) -> Iterator[None]:
    """Within the block only the named parameters require grad (and grad mode is on); restored after."""
    saved = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        for n, p in module.named_parameters():
            p.requires_grad_(n in names)
        with torch.enable_grad():
            yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(saved[n])
