"""Leave-K-out cells and LDS subset models as Ray tasks: many retrains at once, on this machine or on a cluster.

``ray.init()`` starts a local Ray instance (one task per ``threads`` CPUs); ``--ray-address`` joins a running
cluster instead (CPU or GPU machines; on SLURM, start Ray on the allocation first). With ``--device cuda`` each
task also asks Ray for one GPU and retrains the UNet on it (full fp32, deterministic kernels), so a GPU machine
takes part by joining the cluster as a worker. Each cell is one task:

1. the worker loads the model from ``precomputed`` (a path every worker can read) and builds the query;
2. it runs ``counterfactual.run`` into ``scratch`` (resumable: its epoch checkpoints live there, so a task
   that is retried after a lost worker resumes where the checkpoints stopped when ``scratch`` is shared); it
   holds the cell's claim meanwhile, as the in-process runner does, so the two never retrain one cell twice
   and ``--status`` lists it as running (claims are ``flock`` locks: on a shared scratch folder they need a
   file system that honours them);
3. it returns the finished result folder as bytes, and the driver writes each file atomically where the
   evaluation reads it (``RESULTS/<kind of the machine that trained it>/<key>/``), ``result.json`` last.

The worker computes the removal ranking and the cache key exactly as an in-process run does; the driver
checks the key against its own, so a worker with other tables or settings fails loudly instead of filing a
result under the wrong key. Task arguments and results are plain JSON-able values and bytes.

An LDS subset model (``SubsetTask``) is one task the same way: the worker trains subset j on its kept rows and
returns ``subset_JJJ.json`` (each query's loss under it), which the driver files under
``RESULTS/<kind>/<protocol key>/`` after checking the protocol key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from abu_explorer import artifacts


@dataclasses.dataclass(frozen=True)
class CellTask:
    precomputed: str
    query: dict  # {"prompt", "seed"[, "steps", "guidance", "box"]}, as in a queries file
    method: str
    k: int
    draw: int
    recipe: dict  # train.StageConfig.to_dict()
    scratch: str  # where the worker runs the cell (its checkpoints); the results folder when shared
    threads: int = 1
    key: str = ""  # the driver's key for this cell, checked by the driver
    device: str = "cpu"  # "cuda": the task asks Ray for a GPU and retrains the UNet there


@dataclasses.dataclass(frozen=True)
class SubsetTask:
    precomputed: str
    queries: list  # the split's query dicts ({"prompt", "seed", ...})
    subset: int
    recipe: dict
    scratch: str  # where the worker trains (its checkpoints)
    threads: int = 1
    key: str = ""  # the driver's protocol key, checked by the driver
    device: str = "cpu"


def run_subset(task: SubsetTask) -> dict:
    """In the worker: subset model ``task.subset`` and its query losses; {"kind", "key", "doc"}."""
    import torch

    from abu_explorer.evaluation import lds
    from abu_explorer.machine import kind as machine_kind
    from abu_explorer.model import load
    from abu_explorer.training import train

    torch.set_num_threads(task.threads)
    explorer = load(task.precomputed)
    recipe = train.StageConfig(**task.recipe)
    doc = lds.protocol(explorer, task.queries, recipe)
    kind = machine_kind(task.device)
    folder = lds.results_folder(Path(task.scratch), doc, kind)
    built = lds.query_latents(explorer, task.queries)
    # the claim an in-process runner takes: one trains, the other waits and then reads the filed result
    with artifacts.claimed(folder / f"subset_{task.subset:03d}.json", wait=True):
        result = lds.train_subset(explorer, task.subset, built, folder, recipe, progress=False, device=task.device)
    return {"kind": kind, "key": lds.key_of(doc), "doc": result}


def run_subsets(tasks: list[SubsetTask], results_dir: Path, address: str | None = None,
                num_cpus: int | None = None, progress: bool = True) -> list[dict]:
    """Every subset task on Ray; each ``subset_JJJ.json`` filed atomically as it finishes (never replaced)."""
    def file(task, payload):
        if task.key and payload["key"] != task.key:
            raise RuntimeError(f"a Ray worker filed LDS subset {task.subset} under protocol {payload['key']}, the "
                               f"driver expects {task.key}: the worker's model or queries differ")
        out = Path(results_dir) / payload["kind"] / payload["key"] / f"subset_{task.subset:03d}.json"
        if not out.exists():
            artifacts.save_json(out, payload["doc"])
        return payload["doc"]

    return _run(run_subset, tasks, file, address, num_cpus, progress, "LDS subset models (Ray)")


def run_cell(task: CellTask) -> dict:
    """In the worker: one cell, start to finish; its result folder as {"kind", "key", "files": {name: bytes}}."""
    import torch

    from abu_explorer.evaluation import counterfactual
    from abu_explorer.evaluation.counterfactual_table import build_queries
    from abu_explorer.machine import kind as machine_kind
    from abu_explorer.model import load
    from abu_explorer.training import train

    torch.set_num_threads(task.threads)
    explorer = load(task.precomputed)
    query = build_queries(explorer, [task.query])[0]
    recipe = train.StageConfig(**task.recipe)
    # the claim an in-process runner takes (and ``--status`` reads): one retrains, the other waits, then reads
    claim = counterfactual.result_dir(Path(task.scratch), task.key, machine_kind(task.device)) / "result.json"
    with artifacts.claimed(claim, wait=True) if task.key else contextlib.nullcontext():
        result = counterfactual.run(explorer, query, task.method, task.k, Path(task.scratch), recipe=recipe,
                                    draw=task.draw, progress=False, device=task.device)
    kind = result["trained_on"]["kind"]
    folder = counterfactual.result_dir(Path(task.scratch), result["key"], kind)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return {"kind": kind, "key": result["key"], "files": files}


def store(results_dir: Path, payload: dict) -> Path:
    """Write a task's result folder atomically (every file by temp file + rename, ``result.json`` last); a
    finished folder is never overwritten."""
    from abu_explorer.evaluation import counterfactual

    out = counterfactual.result_dir(Path(results_dir), payload["key"], payload["kind"])
    if (out / "result.json").exists():
        return out
    names = sorted(payload["files"], key=lambda n: n == "result.json")
    for name in names:
        artifacts.save_bytes(out / name, payload["files"][name])
    return out


def run_cells(tasks: list[CellTask], results_dir: Path, address: str | None = None, num_cpus: int | None = None,
              progress: bool = True) -> list[dict]:
    """Run every task on Ray (a local instance unless ``address``); results in the order they finish."""
    def file(task, payload):
        if task.key and payload["key"] != task.key:
            raise RuntimeError(f"a Ray worker filed {task.method} K={task.k} under key {payload['key']}, "
                               f"the driver expects {task.key}: the worker's model, tables or settings differ "
                               f"from {task.precomputed} here")
        store(results_dir, payload)
        return artifacts.load_json(Path(results_dir) / payload["kind"] / payload["key"] / "result.json")

    return _run(run_cell, tasks, file, address, num_cpus, progress, "leave-K-out cells (Ray)")


def _run(fn, tasks: list, file, address: str | None, num_cpus: int | None, progress: bool, desc: str) -> list:
    """``fn`` on every task as a Ray task (``threads`` CPUs and, on CUDA, one GPU each); ``file(task, payload)``
    as each finishes, in the driver. A local instance is started (and shut down) unless one is running."""
    import ray
    from tqdm import tqdm

    if not tasks:
        return []
    started = not ray.is_initialized()
    if started:
        # local workers import this package from the same checkout; a cluster's workers must have it installed
        root = str(Path(__file__).resolve().parents[2])
        from abu_explorer.machine import PIN_ENV, isa_pinned

        pin = dict(PIN_ENV) if isa_pinned() else {}  # workers round as the driver's evaluation does
        local = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        env = {"env_vars": pin if address else {**local, **pin}}
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 runtime_env=env if env["env_vars"] else None, logging_level="ERROR", log_to_driver=False)
    try:
        remote = ray.remote(fn)
        pending = {remote.options(num_cpus=t.threads, num_gpus=1 if t.device.startswith("cuda") else 0,
                                  max_retries=2).remote(t): t for t in tasks}
        done = []
        with tqdm(total=len(pending), desc=desc, disable=not progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready[0])
                done.append(file(task, ray.get(ready[0])))
                bar.update(1)
        return done
    finally:
        if started:
            ray.shutdown()
