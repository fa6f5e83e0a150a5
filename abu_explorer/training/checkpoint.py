"""Resumable training checkpoints in safetensors: model, AdamW state and progress, written atomically.

Optimizer state is flattened to tensors (``opt.<param index>.<key>``), so resuming never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from abu_explorer import artifacts


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict,
         extra: dict | None = None) -> None:
    """``extra``: more named tensors to keep (an EMA of the weights, say), stored under ``extra.<name>``."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    state = optimizer.state_dict()
    for pid, s in state["state"].items():
        for key, value in s.items():
            tensors[f"opt.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {"progress": json.dumps(progress), "param_groups": json.dumps(state["param_groups"])}
    artifacts.save_safetensors(path, tensors, meta)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> dict:
    """Restore model and optimizer (and, in place, the tensors of ``extra``); returns the progress dict."""
    from safetensors import safe_open

    tensors = artifacts.load_safetensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    for k, v in (extra or {}).items():
        if f"extra.{k}" not in tensors:
            raise ValueError(f"{path} lacks {k}; it was written without it: delete it to start over")
        v.copy_(tensors[f"extra.{k}"])
    return json.loads(meta["progress"])


def progress_of(path: Path) -> dict | None:
    """The progress dict of the checkpoint at ``path`` (its epoch, the recipe), read from the file's header
    alone; None where there is none."""
    from safetensors import safe_open

    if not Path(path).exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["progress"])
