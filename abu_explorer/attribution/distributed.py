"""Sharding of batch lists over processes with torch.distributed (gloo on CPU, nccl on GPU).

Work is cut into a fixed list of batches that does not depend on the number of processes; rank r
computes batches r, r + W, r + 2W, ... and the results are gathered and put back in batch order. Each
batch is computed exactly as in a single process, so the gathered array is bit-identical to it.
Launch with ``torchrun --nproc-per-node 2 -m abu_explorer precompute``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_from_env() -> None:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def rank_world() -> tuple[int, int]:
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def rank0_first(fn: Callable):
    """``fn()`` on rank 0, then on the other ranks: for work that writes shared files (rendered images, the
    training cache), which the other ranks then find fresh and only read."""
    rank, world = rank_world()
    out = fn() if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:
            out = fn()
    return out


def run_batches(fn: Callable[[int], torch.Tensor], num_batches: int, progress=None) -> list[torch.Tensor]:
    """``[fn(0), ..., fn(num_batches - 1)]``, computed across ranks, returned on every rank."""
    rank, world = rank_world()
    mine = {}
    for b in range(rank, num_batches, world):
        mine[b] = fn(b).detach().cpu()
        if progress is not None:
            progress(len(mine) * world, num_batches)
    if world == 1:
        return [mine[b] for b in range(num_batches)]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, {b: t.numpy() for b, t in mine.items()})
    merged = {b: torch.from_numpy(a) for part in gathered for b, a in part.items()}
    return [merged[b] for b in range(num_batches)]
