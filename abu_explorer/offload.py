"""Leave-K-out retrains on another machine: export a bundle here, retrain there, import the results here.

Retraining is the only heavy part of remove-and-regenerate (~25 min per cell on 2 CPU cores). This module
splits ``counterfactual.run`` in three so that the middle phase can run where an accelerator is:

1. ``export`` (here): pick every cell's removed rows with the app's own rankers, and write a bundle: the
   training cache (latents + caption states), each query's latent, prompt states and initial noise, and
   ``plan.json`` with the cells, their cache keys, the recipe and the hashes of the parts.
2. ``retrain`` (there; needs torch and diffusers only): measure the original UNet once per query, then for
   each cell train the UNet from scratch without the removed rows (same recipe and seed; batch order,
   timesteps and noise still come from the CPU generators), measure the query's DDPM loss and DDIM-sample
   its prompt from its seed's noise. One JSON line per cell, appended as cells finish: resumable.
   A ``full`` cell (K = 0) retrains on everything: its dL is the floor that arithmetic alone gives.
3. ``import_results`` (here): check each line against the plan and this model, decode the sampled latents,
   compute dG-MSE and dG-CLIP, and write the result folders ``counterfactual.run`` writes, with the machine
   that trained them recorded, so the app and the table read them as usual.
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

from . import artifacts, counterfactual, models, sampling, train

PLAN_VERSION = 1
BUNDLE = "bundle.safetensors"


def _order(cells, ks: list[int], methods: list[str]):
    """First K with two random draws, then the other Ks, then extra random draws: cut anywhere, the
    finished part is the most useful one."""
    return sorted(cells, key=lambda c: (c.draw >= 2, c.k != ks[0], ks.index(c.k), c.draw,
                                        methods.index(c.method), c.query))


def export(explorer, queries: list[dict], methods: list[str], ks: list[int], draws: int, out_dir: Path,
           recipe: train.StageConfig = train.UNET_RECIPE, full: bool = True, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from .attribution import SERVING_OPTIONS, get_method
    from .counterfactual_eval import build_queries, plan

    # 1. queries and cells, in the order the retrains should run
    if len(set(ks)) != len(ks) or not all(1 <= k <= len(explorer.dataset) for k in ks):
        raise ValueError(f"K values must be distinct and in [1, {len(explorer.dataset)}], got {ks}")
    built = build_queries(explorer, queries)
    cells = _order(plan(len(queries), methods, ks, draws), ks, methods)
    # 2. removed rows: one ranking per (query, method), cut at each K
    rankers = {m: get_method(m).load(explorer, **SERVING_OPTIONS.get(m, {})) for m in methods if m != "random"}
    rankings: dict[tuple[int, str], list[int]] = {}
    planned = []
    for c in tqdm(cells, desc="rank", disable=not progress):
        if c.method == "random":
            removed = counterfactual.removal(explorer, built[c.query], "random", c.k, c.draw)
        else:
            if (c.query, c.method) not in rankings:
                rankings[(c.query, c.method)] = [i for i, _ in rankers[c.method].score(built[c.query]).top(max(ks))]
            removed = rankings[(c.query, c.method)][:c.k]
        planned.append({"key": counterfactual.request_key(explorer, built[c.query], c.method, c.k, c.draw, recipe),
                        "query": c.query, "method": c.method, "k": c.k, "draw": c.draw, "removed": removed})
    if full:
        planned.insert(sum(1 for c in cells if c.k == ks[0] and c.draw < 2),
                       {"key": "full", "query": None, "method": "full", "k": 0, "draw": 0, "removed": []})
    # 3. the bundle: every tensor the retrains read
    cache = explorer.training_cache()
    tensors = {"latents": cache.latents, "text_states": cache.text_states, "null_state": cache.null_state}
    for i, qu in enumerate(built):
        tensors[f"q{i}.latent"] = qu.latent
        tensors[f"q{i}.context"] = explorer.encode_text([qu.prompt])
        c, h = explorer.unet.config.in_channels, explorer.unet.config.sample_size
        tensors[f"q{i}.noise"] = sampling.initial_noise(qu.source["seed"], (1, c, h, h))
        if qu.mask is not None:
            tensors[f"q{i}.mask"] = qu.mask
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_safetensors(out_dir / BUNDLE, {k: v.contiguous() for k, v in tensors.items()})
    doc = {"version": PLAN_VERSION, "bundle_hash": artifacts.file_hash(out_dir / BUNDLE),
           "unet_weights": _portable(Path(explorer.root) / "unet" / "diffusion_pytorch_model.safetensors"),
           "hashes": {p: explorer.component_hash(p) for p in ("unet", "autoencoder", "clip")},
           "unet_config": {k: v for k, v in explorer.unet.config.items() if not k.startswith("_")},
           "scheduler_config": dict(explorer.scheduler_config),
           "recipe": recipe.to_dict(), "num_train": len(explorer.dataset),
           "queries": [{"describe": qu.describe(), "steps": qu.source["steps"], "guidance": qu.source["guidance"]}
                       for qu in built], "cells": planned}
    artifacts.save_json(out_dir / "plan.json", doc)
    return doc


def _portable(path: Path) -> str:
    """Relative to the working directory when inside it, so the plan works in a copy of the repository."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


# --- there: the retrains -------------------------------------------------------------------------

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
    doc = _plan(Path(bundle_dir))
    t = artifacts.load_safetensors(Path(bundle_dir) / BUNDLE)
    _W.update(doc=doc, device=torch.device(device), recipe=train.StageConfig(**doc["recipe"]),
              t={k: v.to(device) for k, v in t.items()})


def _plan(bundle_dir: Path) -> dict:
    doc = artifacts.load_json(bundle_dir / "plan.json")
    if doc.get("version") != PLAN_VERSION:
        raise artifacts.ArtifactError(f"{bundle_dir}/plan.json has version {doc.get('version')}, need {PLAN_VERSION}")
    if artifacts.file_hash(bundle_dir / BUNDLE) != doc["bundle_hash"]:
        raise artifacts.ArtifactError(f"{bundle_dir}/{BUNDLE} does not match plan.json; export again")
    return doc


def _measure(unet, qi: int) -> tuple[float, list[float]]:
    """(DDPM loss of the query at stride 5, final DDIM latent of its prompt and seed) under ``unet``."""
    t, qd, cfg = _W["t"], _W["doc"]["queries"][qi], _W["doc"]["scheduler_config"]
    loss = counterfactual.query_loss(unet, models.build_scheduler(cfg), t[f"q{qi}.latent"], t[f"q{qi}.context"],
                                     t.get(f"q{qi}.mask"))
    lat = sampling.ddim_sample(unet, models.build_scheduler(cfg, "ddim"), t[f"q{qi}.context"], t["null_state"],
                               t[f"q{qi}.noise"], qd["steps"], qd["guidance"])
    return loss, lat[0].float().cpu().flatten().tolist()


def _machine() -> dict:
    info = counterfactual.machine()
    if _W["device"].type == "cuda":
        info["device"] = torch.cuda.get_device_name(_W["device"])
    return info


def _originals() -> list[dict]:
    """The original UNet's measurements, one line per query (run in a worker like the retrains)."""
    from safetensors.torch import load_file

    doc = _W["doc"]
    unet = models.build_unet(doc["unet_config"])
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

        sched = models.build_scheduler(doc["scheduler_config"])
        if len(cells) == 1:
            torch.manual_seed(recipe.seed)  # as counterfactual.run: initial weights from the CPU generator
            unet = models.build_unet(doc["unet_config"]).to(_W["device"])
            log = train.train_unet(unet, sched, t["latents"], t["text_states"], t["null_state"], recipe,
                                   exclude=set(cells[0]["removed"]), progress=False, on_epoch_end=report)
            unets, finals = [unet], [log["loss"][-1]]
        else:
            from .train_stacked import train_unets_stacked

            states, log = train_unets_stacked(doc["unet_config"], sched, t["latents"], t["text_states"],
                                              t["null_state"], recipe, [set(c["removed"]) for c in cells],
                                              _W["device"], on_epoch_end=report)
            unets = []
            for state in states:
                unet = models.build_unet(doc["unet_config"])
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


def _done(out: Path, plan_hash: str) -> dict[str, dict]:
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


def retrain(bundle_dir: Path, out: Path, device: str = "cpu", workers: int = 1, threads: int = 1,
            deadline_s: float | None = None, log=print, stack: int = 1) -> int:
    """Run every planned cell not yet in ``out`` (JSON lines, tagged with the plan's hash); returns how
    many finished now. All model work happens in ``workers`` spawned processes; this one only schedules.
    ``stack`` > 1 trains up to that many cells of equal K in lockstep in one process (for a GPU)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # 1. what is left (a cell whose line removed other rows is redone)
    t_start, bundle_dir, out = time.time(), Path(bundle_dir), Path(out)
    doc = _plan(bundle_dir)
    tag = doc["bundle_hash"]
    done = _done(out, tag)
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
        originals = {k: v for k, v in _done(out, tag).items() if k.startswith("original")}
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


# --- here: import ---------------------------------------------------------------------------------


def import_results(explorer, bundle_dir: Path, lines_path: Path, results_dir: Path, report: Path | None = None) -> dict:
    """Write a result folder per finished cell (never over an existing one); returns the import report:
    cells written or skipped, the machine, the floor (dL of the K = 0 retrain) and the parity of the
    original generation there against this machine's."""
    from .attribution import query as q
    from .pipeline import to_pil

    # 1. the plan must describe this model, and every line the plan
    doc = _plan(Path(bundle_dir))
    for part, h in doc["hashes"].items():
        if explorer.component_hash(part) != h:
            raise artifacts.ArtifactError(f"{bundle_dir}/plan.json was exported from another {part} ({h}, "
                                          f"this model has {explorer.component_hash(part)})")
    plan = {c["key"]: c for c in doc["cells"]}
    if not Path(lines_path).exists():
        raise FileNotFoundError(f"{lines_path} not found: it is written by `python -m abu_explorer offload retrain`")
    lines = _done(Path(lines_path), doc["bundle_hash"])
    missing = [qi for qi in range(len(doc["queries"])) if f"original{qi}" not in lines]
    if missing:
        raise ValueError(f"{lines_path} has no original measurement of queries {missing} for this plan; "
                         f"run `offload retrain` with this bundle")
    recipe = train.StageConfig(**doc["recipe"])
    c, h = explorer.unet.config.in_channels, explorer.unet.config.sample_size

    def decode(lat):
        return to_pil(explorer.decode(torch.tensor(lat, dtype=torch.float32).view(1, c, h, h)))[0]

    # 2. the originals: there vs here
    built, originals, parity = [], [], []
    for qi, qd in enumerate(doc["queries"]):
        d = qd["describe"]
        qu = q.from_generation(explorer, d["prompt"], d["seed"], qd["steps"], qd["guidance"],
                               tuple(d["box"]) if d.get("box") else None)
        if qu.describe() != d:
            raise ValueError(f"query {qi} differs from the plan: {qu.describe()} vs {d}")
        there = lines[f"original{qi}"]
        built.append(qu)
        originals.append(there)
        here = explorer.generate(d["prompt"], d["seed"], qd["steps"], qd["guidance"]).latent
        loss_here = counterfactual.query_loss(explorer.unet, explorer.scheduler, qu.latent,
                                              explorer.encode_text([qu.prompt]), qu.mask)
        parity.append({"query": qi, "latent_max_abs_diff": float((torch.tensor(there["latent"]) - here.flatten()).abs().max()),
                       "loss_there": there["loss"], "loss_here": loss_here})
    # 3. the floor: the K = 0 retrain there
    full = next((line for line in lines.values() if line.get("method") == "full"), None)
    floor = None if full is None else {qi: v - originals[int(qi)]["loss"] for qi, v in full["losses"].items()}
    # 4. one result folder per cell
    written, skipped = [], []
    for key, line in lines.items():
        if line["type"] != "cell" or line["method"] == "full":
            continue
        cell = plan.get(key)
        if cell is None or cell["removed"] != line["removed"]:
            raise ValueError(f"{lines_path}: cell {key} is not in {bundle_dir}/plan.json (or removes other rows)")
        machine = {k: line[k] for k in ("device", "torch", "diffusers")}
        qi, qu = cell["query"], built[cell["query"]]
        if counterfactual.request_key(explorer, qu, cell["method"], cell["k"], cell["draw"], recipe) != key:
            raise ValueError(f"cell {key}: its key does not match this model and query; export again")
        out = Path(results_dir) / key
        if (out / "result.json").exists():
            skipped.append(key)
            continue
        loss0, loss1 = originals[qi]["loss"], line["losses"][str(qi)]
        a, b = decode(originals[qi]["latent"]), decode(line["latents"][str(qi)])
        result = {**counterfactual.record(explorer, key, qu, cell["method"], cell["k"], cell["draw"], cell["removed"],
                                          loss0, loss1, line["train_seconds"], recipe, machine),
                  **counterfactual.image_change(explorer, a, b)}
        if full is not None:  # the same machine's K = 0 retrain: dL against it has no arithmetic offset
            result["loss_full_retrain"] = full["losses"][str(qi)]
        artifacts.save_png(out / "regenerated.png", b)
        artifacts.save_png(out / "original.png", a)
        artifacts.save_json(out / "result.json", result)
        written.append(key)
    summary = {"plan": str(bundle_dir), "bundle_hash": doc["bundle_hash"], "written": len(written),
               "skipped_existing": skipped, "cells_in_plan": len(doc["cells"]),
               "machine": {k: originals[0][k] for k in ("device", "torch", "diffusers")},
               "floor_delta_loss": floor, "original_parity": parity}
    if report is not None:
        artifacts.save_json(Path(report), summary)
    return summary
