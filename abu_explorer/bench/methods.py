"""``python -m abu_explorer bench methods``: what each attribution method costs on this machine.

Per method: precompute time (optional: rebuilt into a temporary folder and timed), storage of its
precomputed folder, load time (NN methods build their faiss index here), and query latency over a few
generated queries (query generation not counted). Printed as the table in docs/methods.md and saved as JSON.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution import METHODS, spec
from abu_explorer.attribution import gradient_table
from abu_explorer.attribution import query as q

# every method once in its default mode, then the exact scans (one query each)
RUNS = ([(m.name, "fast") for m in METHODS] + [(m.name, "exact") for m in METHODS if "exact" in m.modes])


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def time_precompute(exp, name: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec(name).precompute(exp, folder=Path(tmp) / name, progress=False)
        return time.perf_counter() - t0


def main(args) -> dict:
    from abu_explorer.model.embedded import Explorer

    if not args.precompute:
        return _measure(args, Explorer.load(args.precomputed))
    # rebuilt and timed too: IF's gradient table is built in a fresh folder, removed afterwards
    with tempfile.TemporaryDirectory(prefix="abu-bench-tables-") as tables, gradient_table.tables_in(tables):
        return _measure(args, Explorer.load(args.precomputed))


def _measure(args, exp) -> dict:
    from abu_explorer.machine import cpu_name

    caps = exp.dataset.captions
    n = len(caps)
    queries = [q.from_generation(exp, caps[(53 + 211 * i) % n], seed=3000 + i) for i in range(args.queries)]
    exp.training_cache()  # shared by the gradient methods; not counted in any method's load time
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "num_train": n, "queries": args.queries,
              "methods": []}
    print(f"CPU: {report['cpu']}, torch threads: {report['threads']}, N = {n}, {args.queries} queries")
    loaded = {}
    for name, mode in RUNS:
        if args.methods and name not in args.methods:
            continue
        if mode == "exact" and not args.exact:
            continue
        row = {"method": name, "mode": mode}
        if name not in loaded:
            t0 = time.perf_counter()
            loaded[name] = spec(name).load(exp)
            row["load_seconds"] = time.perf_counter() - t0
        folder = name if spec(name).tables else None
        row["storage_mb"] = folder_mb(Path(args.precomputed) / folder) if folder else 0.0
        if args.precompute and folder and mode == "fast":
            row["precompute_seconds"] = time_precompute(exp, name)
        if mode == "exact" and hasattr(loaded[name], "prepare_exact"):  # IF's gradient table: timed apart
            t0 = time.perf_counter()
            loaded[name].prepare_exact()
            row["exact_setup_seconds"] = time.perf_counter() - t0
        count = 1 if mode == "exact" else len(queries)
        times = []
        for query in queries[:count]:
            t0 = time.perf_counter()
            loaded[name].score(query, mode)
            times.append(time.perf_counter() - t0)
        row.update({"median_seconds": statistics.median(times), "max_seconds": max(times), "count": count})
        report["methods"].append(row)
        print(f"  {name:6} {mode:5} median {row['median_seconds'] * 1e3:10.1f} ms  max {row['max_seconds'] * 1e3:10.1f} ms"
              f"  storage {row['storage_mb']:5.1f} MB"
              + (f"  precompute {row['precompute_seconds']:6.1f} s" if "precompute_seconds" in row else "")
              + (f"  exact setup {row['exact_setup_seconds']:6.1f} s" if "exact_setup_seconds" in row else ""), flush=True)
    if args.json:
        artifacts.save_json(Path(args.json), report)
    return report
