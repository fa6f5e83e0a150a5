"""The middle phase of ``offload``: leave-K-out retrains from a bundle, on whatever machine has the device.

Needs torch, diffusers and this package only (no dataset, autoencoder, CLIP or app). For each planned cell
not yet in the output file: train the UNet from scratch without the removed rows (same recipe and seed;
batch order, timesteps and noise still come from the CPU generators, ``train.unet_step_draws``), measure
the query's DDPM loss and DDIM-sample its prompt from its seed's noise, and append one JSON line, tagged
with the plan's hash. The original UNet is measured once per query, in a worker like the retrains, so both
sides of dL come from the same arithmetic. All model work runs in spawned worker processes.

The plan format (``plan.json`` + ``bundle.safetensors``) and the line format live here, since both sides
read them.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual
from abu_explorer.machine import kind as machine_kind
from abu_explorer.machine import machine
from abu_explorer.model import components, sampling
from abu_explorer.training import train

PLAN_VERSION = 1
BUNDLE = "bundle.safetensors"


def load_plan(bundle_dir: Path) -> dict:
    doc = artifacts.load_json(bundle_dir / "plan.json")
    if doc.get("version") != PLAN_VERSION:
        raise artifacts.ArtifactError(f"{bundle_dir}/plan.json has version {doc.get('version')}, need {PLAN_VERSION}")
    if artifacts.file_hash(bundle_dir / BUNDLE) != doc["bundle_hash"]:
        raise artifacts.ArtifactError(f"{bundle_dir}/{BUNDLE} does not match plan.json; export again")
    return doc


def read_lines(out: Path, plan_hash: str) -> dict[str, dict]:
    """Finished lines of this plan by key; other plans' lines, errors and a torn last line are ignored."""
    lines = {}
    if out.exists():
        for raw in out.read_text().splitlines():
            try:
                d = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if d.get("plan") == plan_hash and d.get("type") in ("original", "cell"):
                lines[d["key"]] = d
    return lines


def _append(out: Path, line: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    torn = out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n")
    with open(out, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


_W: dict = {}  # one process's state: bundle tensors on the device, configs


def _setup(bundle_dir: str, device: str, threads: int) -> None:
    """Load and check the bundle (and set the arithmetic) in a worker process."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):  # full fp32 and repeatable kernels: only the arithmetic order differs
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-filling kernels per empty()
    doc = load_plan(Path(bundle_dir))
    t = artifacts.load_safetensors(Path(bundle_dir) / BUNDLE)
    _W.update(doc=doc, device=torch.device(device), recipe=train.StageConfig(**doc["recipe"]),
              t={k: v.to(device) for k, v in t.items()})


def _measure(unet, qi: int) -> tuple[float, list[float]]:
    """(DDPM loss of the query at stride 5, final DDIM latent of its prompt and seed) under ``unet``."""
    t, qd, cfg = _W["t"], _W["doc"]["queries"][qi], _W["doc"]["scheduler_config"]
    loss = counterfactual.query_loss(unet, components.build_scheduler(cfg), t[f"q{qi}.latent"], t[f"q{qi}.context"],
                                     t.get(f"q{qi}.mask"))
    lat = sampling.ddim_sample(unet, components.build_scheduler(cfg, "ddim"), t[f"q{qi}.context"], t["null_state"],
                               t[f"q{qi}.noise"], qd["steps"], qd["guidance"])
    return loss, lat[0].float().cpu().flatten().tolist()


def _machine() -> dict:
    info = machine()
    if _W["device"].type == "cuda":
        info["device"] = torch.cuda.get_device_name(_W["device"])
        info["kind"] = machine_kind(str(_W["device"]))
    return info


def _originals() -> list[dict]:
    """The original UNet's measurements, one line per query (run in a worker like the retrains)."""
    from safetensors.torch import load_file

    doc = _W["doc"]
    unet = components.build_unet(doc["unet_config"])
    state = load_file(doc["unet_weights"])
    if artifacts.state_hash(state) != doc["hashes"]["unet"]:
        raise artifacts.ArtifactError(f"{doc['unet_weights']} is not the UNet the plan was exported from")
    unet.load_state_dict(state)
    unet.to(_W["device"]).eval()
    lines = []
    for qi in range(len(doc["queries"])):
        loss, lat = _measure(unet, qi)
        lines.append({"type": "original", "key": f"original{qi}", "query": qi, "describe": doc["queries"][qi]["describe"],
                      "loss": loss, "latent": lat, **_machine()})
    return lines


def _name(cell: dict) -> str:
    where = f"q{cell['query']} d{cell['draw']}" if cell["query"] is not None else "(all queries)"
    return f"{cell['method']} K={cell['k']} {where}"


def _retrain(cells: list[dict]) -> list[dict]:
    """Retrain one cell alone, or several of equal K in lockstep (``train_stacked``); one line per cell."""
    doc, t, recipe = _W["doc"], _W["t"], _W["recipe"]
    names = ", ".join(_name(c) for c in cells)
    try:
        t0 = time.time()
        steps = math.ceil((len(t["latents"]) - len(cells[0]["removed"])) / recipe.batch_size)

        def report(epoch, lg):  # the speed shows in the first minute, not after the first cell
            if epoch in (1, 5) or epoch % 25 == 0:
                print(f"    {names}: epoch {epoch}/{recipe.epochs}, "
                      f"{1e3 * lg['seconds'] / (epoch * steps):.0f} ms/step", flush=True)

        sched = components.build_scheduler(doc["scheduler_config"])
        if len(cells) == 1:
            torch.manual_seed(recipe.seed)  # as counterfactual.run: initial weights from the CPU generator
            unet = components.build_unet(doc["unet_config"]).to(_W["device"])
            log = train.train_unet(unet, sched, t["latents"], t["text_states"], t["null_state"], recipe,
                                   exclude=set(cells[0]["removed"]), progress=False, on_epoch_end=report)
            unets, finals = [unet], [log["loss"][-1]]
        else:
            from abu_explorer.training.stacked import train_unets_stacked

            states, log = train_unets_stacked(doc["unet_config"], sched, t["latents"], t["text_states"],
                                              t["null_state"], recipe, [set(c["removed"]) for c in cells],
                                              _W["device"], on_epoch_end=report)
            unets = []
            for state in states:
                unet = components.build_unet(doc["unet_config"])
                unet.load_state_dict(state)
                unets.append(unet.to(_W["device"]))
            finals = log["loss"][-1]
        lines = []
        for cell, unet, final in zip(cells, unets, finals):
            unet.eval()
            qis = range(len(doc["queries"])) if cell["query"] is None else [cell["query"]]
            measured = {qi: _measure(unet, qi) for qi in qis}
            lines.append({"type": "cell", **cell, "name": _name(cell), "stacked_with": len(cells),
                          "losses": {str(qi): m[0] for qi, m in measured.items()},
                          "latents": {str(qi): m[1] for qi, m in measured.items()}, "train_seconds": log["seconds"],
                          "final_train_loss": final, "wall_seconds": time.time() - t0, **_machine()})
        return lines
    except Exception:  # one broken group must not cost the others
        error = traceback.format_exc()[-1500:]
        return [{"type": "error", "key": c["key"], "name": _name(c), "error": error} for c in cells]


def _groups(cells: list[dict], stack: int) -> list[list[dict]]:
    """Consecutive cells of equal K in groups of up to ``stack``, keeping the plan's priority order."""
    groups, open_by_k = [], {}
    for c in cells:
        g = open_by_k.get(c["k"])
        if g is None or len(g) == stack:
            g = open_by_k[c["k"]] = []
            groups.append(g)
        g.append(c)
    return groups


def retrain(bundle_dir: Path, out: Path, device: str = "cpu", workers: int = 1, threads: int = 1,
            deadline_s: float | None = None, log=print, stack: int = 1) -> int:
    """Run every planned cell not yet in ``out`` (JSON lines, tagged with the plan's hash); returns how
    many finished now. All model work happens in ``workers`` spawned processes; this one only schedules.
    ``stack`` > 1 trains up to that many cells of equal K in lockstep in one process (for a GPU)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # 1. what is left (a cell whose line removed other rows is redone)
    t_start, bundle_dir, out = time.time(), Path(bundle_dir), Path(out)
    doc = load_plan(bundle_dir)
    tag = doc["bundle_hash"]
    done = read_lines(out, tag)
    todo = [c for c in doc["cells"] if done.get(c["key"], {}).get("removed") != c["removed"]]
    need_originals = any(f"original{qi}" not in done for qi in range(len(doc["queries"])))
    log(f"{len(todo)} of {len(doc['cells'])} cells to retrain, {workers} worker(s) on {device}")
    if not todo and not need_originals:
        return 0
    # 2. workers: spawned (CUDA-safe); a dead worker breaks the pool instead of hanging it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    finished = 0
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_setup,
                               initargs=(str(bundle_dir), device, threads))
    try:
        if need_originals:
            for line in pool.submit(_originals).result():
                _append(out, {**line, "plan": tag})
            log(f"originals measured on {line['device']}")
        originals = {k: v for k, v in read_lines(out, tag).items() if k.startswith("original")}
        pending = {pool.submit(_retrain, g): g for g in _groups(todo, stack)}
        while pending:
            for fut in [f for f in pending if f.done()]:  # collect first: nothing finished is dropped
                pending.pop(fut)
                for line in fut.result():
                    line = {**line, "plan": tag}
                    _append(out, line)
                    if line["type"] == "error":
                        log(f"  {line['name']}: {line['error']}")
                        continue
                    finished += 1
                    dl = ", ".join(f"{(v - originals[f'original{qi}']['loss']) * 1e3:+.1f}"
                                   for qi, v in line["losses"].items())
                    log(f"  [{finished}/{len(todo)}] {line['name']}: train {line['train_seconds']:.0f} s, "
                        f"dL {dl} e-3, {(time.time() - t_start) / 60:.1f} min")
            if not pending:
                break
            if deadline_s is not None and time.time() - t_start > deadline_s:
                log(f"deadline reached: {len(pending)} cells left (finished ones are saved)")
                break
            time.sleep(0.5)
    except BrokenProcessPool as e:
        log(f"a worker died ({e}); finished cells are saved, run again to resume")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for child in mp.active_children():  # stop retrains in flight
            child.terminate()
    return finished
