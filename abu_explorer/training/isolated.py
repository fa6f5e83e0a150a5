"""UNet training in a child process with its own torch thread count (the app's retrains, capped to one core).

torch's thread count is process-wide: capping a retrain inside the server would also change the arithmetic
(and the bytes) of every generation served meanwhile. Here the retrain runs in a spawned process:

1. the parent writes the inputs (latents, caption states, the excluded rows) to ``run_dir/inputs.safetensors``
   and the configs to ``run_dir/inputs.json``;
2. the child sets its threads, builds the UNet from the seed, runs ``train.train_unet`` (checkpoints in
   ``run_dir``, so a killed child resumes) and reports each epoch on a queue;
3. the child writes the weights to ``run_dir/unet.safetensors``; the parent loads them.

A callback that raises (a cancelled job) stops the child at once; the last epoch checkpoint stays.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import traceback
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.training import train

INPUTS, WEIGHTS = "inputs", "unet.safetensors"


def train_unet(unet_config: dict, scheduler_config: dict, latents: torch.Tensor, text_states: torch.Tensor,
               null_state: torch.Tensor, recipe: train.StageConfig, exclude: set[int], run_dir: Path,
               threads: int = 1, on_epoch_end=None, poll_seconds: float = 1.0):
    """(state dict of the trained UNet, training log), trained from scratch in a child process."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # 1. inputs for the child
    artifacts.save_safetensors(run_dir / f"{INPUTS}.safetensors", {
        "latents": latents.contiguous(), "text_states": text_states.contiguous(),
        "null_state": null_state.contiguous(), "exclude": torch.tensor(sorted(exclude), dtype=torch.long)})
    artifacts.save_json(run_dir / f"{INPUTS}.json", {"unet": _public(unet_config), "scheduler": _public(scheduler_config),
                                                    "recipe": recipe.to_dict(), "threads": int(threads)})
    # 2. the child trains; the parent relays its epochs
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    child = ctx.Process(target=_child, args=(str(run_dir), messages), name="abu-retrain", daemon=True)
    child.start()
    try:
        log = _relay(child, messages, on_epoch_end, poll_seconds)
    finally:
        if child.is_alive():
            child.terminate()
        child.join()
    # 3. the weights
    state = artifacts.load_safetensors(run_dir / WEIGHTS)
    return state, log


def _public(config) -> dict:
    """A diffusers config without its private entries (paths, versions): what the child rebuilds from."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _relay(child, messages, on_epoch_end, poll_seconds: float) -> dict:
    while True:
        try:
            msg = messages.get(timeout=poll_seconds)
        except queue_mod.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the retrain process ended without a result (exit code {child.exitcode})")
            continue
        if msg[0] == "epoch" and on_epoch_end is not None:
            on_epoch_end(msg[1], msg[2])  # may raise: the finally above stops the child
        elif msg[0] == "done":
            return msg[1]
        elif msg[0] == "error":
            raise RuntimeError(f"the retrain process failed: {msg[1]}")


def _child(run_dir: str, messages) -> None:
    try:
        from abu_explorer.model import components

        run = Path(run_dir)
        doc = artifacts.load_json(run / f"{INPUTS}.json")
        torch.set_num_threads(doc["threads"])
        t = artifacts.load_safetensors(run / f"{INPUTS}.safetensors")
        recipe = train.StageConfig(**doc["recipe"])
        with components.seeded_global_rng(recipe.seed):  # the initial weights, as the shipped UNet's
            unet = components.build_unet(doc["unet"])
        scheduler = components.build_scheduler(doc["scheduler"], "ddpm")
        parent = os.getppid()

        def report(epoch, log):
            if os.getppid() != parent:  # the server is gone: stop (the checkpoint of this epoch is written)
                raise SystemExit(f"the parent process ended; stopped after epoch {epoch}")
            messages.put(("epoch", epoch, log))

        log = train.train_unet(unet, scheduler, t["latents"], t["text_states"], t["null_state"], recipe,
                               exclude=set(t["exclude"].tolist()), run_dir=run, progress=False,
                               on_epoch_end=report)
        artifacts.save_safetensors(run / WEIGHTS, {k: v.contiguous() for k, v in unet.state_dict().items()})
        messages.put(("done", log))
    except BaseException:  # the parent shows the child's error in one line
        messages.put(("error", traceback.format_exc().strip().splitlines()[-1]))
        raise
