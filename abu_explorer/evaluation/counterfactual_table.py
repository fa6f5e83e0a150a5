"""``python -m abu_explorer evaluate counterfactual``: the project's own Table 1.

Every (query, method, K[, random draw]) cell is one ``counterfactual.run`` request, cached by its key in
the results folder, so the runner is resumable: stop it at any time and run the same command again.
Cells run in rounds (every query for one method, then the next method), so a partial run already gives
complete rows. After each cell the summary (mean +- standard error per method and K), the plot and the
per-query regeneration strips are rewritten.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution.settings import variant
from abu_explorer.evaluation import counterfactual, counterfactual_compare as compare
from abu_explorer.evaluation.counterfactual import SOURCE
from abu_explorer.evaluation.counterfactual_plot import METRICS, curve, plot
from abu_explorer.evaluation.counterfactual_summary import (  # noqa: F401  (the table's numbers, re-exported)
    label, paper_dl, summarize, table, versus_random)
from abu_explorer.training import train
from abu_explorer.machine import kind as machine_kind


@dataclass(frozen=True)
class Cell:
    query: int  # index into the queries file
    method: str
    k: int
    draw: int = 0


def load_queries(path: Path) -> list[dict]:
    """A JSON list of {"prompt", "seed"[, "steps", "guidance", "box"]}."""
    doc = artifacts.load_json(Path(path))
    items = doc["queries"] if isinstance(doc, dict) else doc
    if not items:
        raise ValueError(f"{path}: no queries")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "prompt" not in item:
            raise ValueError(f"{path}: query {i} needs a 'prompt' (and optionally seed, steps, guidance, box)")
    return items


def build_queries(explorer, queries: list[dict]) -> list:
    """The generated queries of a queries file (prompt, seed, steps, guidance, box)."""
    from abu_explorer.attribution import query as q

    return [q.from_generation(explorer, d["prompt"], int(d.get("seed", 0)), int(d.get("steps", 50)),
                              d.get("guidance"), tuple(d["box"]) if d.get("box") else None) for d in queries]


def plan(num_queries: int, methods: list[str], ks: list[int], draws: int) -> list[Cell]:
    """Rounds: for each K, each method (random once per draw), all queries; the source reference (K = 1 whatever
    the table's Ks) last."""
    cells = []
    for k in ks:
        for m in (m for m in methods if m != SOURCE):
            for d in range(draws if m == "random" else 1):
                cells += [Cell(q, m, k, d) for q in range(num_queries)]
    # random draw 1+ after every method's first round: the control's spread matters less than coverage
    cells.sort(key=lambda c: (ks.index(c.k), c.draw, methods.index(c.method), c.query))
    return cells + [Cell(q, SOURCE, 1) for q in range(num_queries) if SOURCE in methods]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def table_id(queries: list[dict], methods: list[str], ks: list[int], draws: int) -> dict:
    """What makes a report one table: its queries, its methods (in row order), its Ks and random draws."""
    return {"queries": queries, "methods": list(methods), "k": sorted(set(ks)), "draws": draws}


def within(part: dict, whole: dict) -> bool:
    """Is table ``part`` (``table_id``) a part of ``whole``: its queries, methods, Ks and draws among whole's?"""
    return (all(q in whole["queries"] for q in part["queries"]) and set(part["methods"]) <= set(whole["methods"])
            and set(part["k"]) <= set(whole["k"]) and part["draws"] <= whole["draws"])


def report_table(assets_dir: Path, ident: dict, force: bool = False) -> dict:
    """The table whose report ``assets_dir`` holds once this run (``ident``) is done. A folder holds one table:
    a run of a part of it (fewer queries, methods, Ks or draws) rewrites the whole table's report from the cache,
    a run of a table that holds it grows it; another table's report stops the run before any work, unless
    ``force``: then its files go first, so no curve or strip of the old table stays beside the new one."""
    old = Path(assets_dir) / "counterfactual_summary.json"
    if not old.exists():
        return ident
    summary = artifacts.load_json(old)
    t = summary.get("table")
    if t and within(t, ident):
        return ident
    if t and within(ident, t) and not force:
        return t
    if not force:
        what = (f"{len(t['queries'])} queries, K = {', '.join(map(str, t['k']))}, {', '.join(t['methods'])}" if t
                else "written before reports named their table")
        raise FileExistsError(f"{assets_dir} holds the report of a table this run is not part of ({what}); pass "
                              "--assets DIR for this one, or --force to replace it")
    names = ["summary.json", "table.md", "plot.png", "curve.png",
             *(f"strip_{slug(d['prompt'])}.png" for d in summary.get("queries", []))]
    for name in names:
        (Path(assets_dir) / f"counterfactual_{name}").unlink(missing_ok=True)
    return ident


def planned(explorer, queries: list[dict], methods: list[str], ks: list[int], draws: int,
            recipe: train.StageConfig = train.UNET_RECIPE) -> tuple[dict, list, list[Cell], list[str]]:
    """The loaded rankers, the built queries, every cell in plan order and each cell's request key."""
    from abu_explorer.attribution import spec

    # "abu@before": AbU with the settings its tuning replaced, a row of its own (filed under AbU's key for them)
    rankers = {m: spec(variant(m)[0]).load(explorer, **variant(m)[1]) for m in methods  # unknown names fail here
               if m not in counterfactual.UNRANKED}
    settings = {m: counterfactual.removal_settings(explorer, variant(m)[0], rankers.get(m)) for m in methods}
    n = len(explorer.dataset)
    for k in ks:
        if not 1 <= k < n:
            raise ValueError(f"K must be in [1, {n - 1}]: a retrain needs at least one of the {n} images, got {k}")
    if SOURCE in methods:  # its one image must exist for every query: checked before any work
        for d in queries:
            counterfactual.source_row(explorer, d["prompt"])
    built = build_queries(explorer, queries)
    cells = plan(len(queries), methods, ks, draws)
    keys = [counterfactual.request_key(explorer, built[c.query], variant(c.method)[0], c.k, c.draw, recipe,
                                       settings[c.method]) for c in cells]
    return rankers, built, cells, keys


def run(explorer, queries: list[dict], methods: list[str], ks: list[int], draws: int, results_dir: Path,
        assets_dir: Path | None, progress: bool = True, max_cells: int | None = None,
        recipe: train.StageConfig = train.UNET_RECIPE, with_floor: bool = True, ray: dict | None = None,
        device: str = "cpu", force: bool = False) -> dict:
    """Run (or read from the cache) every cell on this machine; ``max_cells`` bounds the retrains of this call.
    The table holds this machine kind's cells only; ``with_floor`` adds its K = 0 retrain first. ``ray``
    ({"address", "threads"}): the missing cells run as Ray tasks instead (``ray_cells``), and the table reads
    them from the kind of machine that trained them. ``device``: where each UNet retrains (with Ray: on the
    workers, each task holding one GPU). ``assets_dir`` gets the report (``report_table``: of this table or of
    the one it is part of; ``force``: replace another table's report)."""
    rankers, built, cells, keys = planned(explorer, queries, methods, ks, draws, recipe)
    ident = table_id(queries, methods, ks, draws)
    shown = report_table(assets_dir, ident, force) if assets_dir is not None else None

    def rewrite() -> dict:  # the folder's table: this one, or the one this run is part of (read from the cache)
        if shown == ident:
            return write_report(explorer, queries, methods, results, results_dir, assets_dir, floor, device, ident)
        return run(explorer, shown["queries"], shown["methods"], shown["k"], shown["draws"], results_dir,
                   assets_dir, False, 0, recipe, with_floor, ray, device)["report"]

    if ray is not None and any("@" in m for m in methods):
        raise ValueError("method variants (name@before) run in this process only: drop --ray for them")
    floor = counterfactual.floor(explorer, built, results_dir, recipe, progress, device) if with_floor else None
    if floor is not None:  # the filed floor may hold queries of other tables: this table's row is over its own
        ids = {counterfactual.floor_query_id(q.describe()) for q in built}
        floor = {**floor, "queries": {i: v for i, v in floor["queries"].items() if i in ids}}
    if ray is not None and max_cells != 0:
        _run_on_ray(explorer, queries, cells, keys, results_dir, recipe, max_cells, {**ray, "device": device}, progress)
    results, done_now = [], 0
    for i, (cell, key) in enumerate(zip(cells, keys)):
        if ray is not None:
            found = counterfactual.find_result(results_dir, key)
            if found is not None:
                results.append({**artifacts.load_json(found / "result.json"), "query_index": cell.query})
            continue
        filed = counterfactual.result_dir(results_dir, key, machine_kind(device)) / "result.json"
        cached = filed.exists()
        if not cached and max_cells is not None and done_now >= max_cells:
            continue
        with contextlib.nullcontext(True) if cached else artifacts.claimed(filed) as mine:
            if not mine:
                continue  # another process is retraining this cell: left to it
            cached = filed.exists()  # it may have finished before the claim
            if not cached:
                print(f"[{i + 1}/{len(cells)}] {queries[cell.query]['prompt']!r} {cell.method} K={cell.k} "
                      f"draw {cell.draw}: retraining", flush=True)
                t0 = time.perf_counter()
            r = counterfactual.run(explorer, built[cell.query], variant(cell.method)[0], cell.k, results_dir,
                                   recipe=recipe, draw=cell.draw, progress=progress, ranker=rankers.get(cell.method),
                                   device=device)
            r = {**r, "method": cell.method}  # the row it belongs to (a variant is filed under its method's key)
            if not cached:
                done_now += 1
                print(f"  {counterfactual.show(r).splitlines()[0]} ({(time.perf_counter() - t0) / 60:.1f} min)",
                      flush=True)
        results.append({**r, "query_index": cell.query})
        if shown is not None and not cached:
            rewrite()
    report = rewrite() if shown is not None else None
    return {"cells": len(cells), "done": len(results), "report": report, "floor": floor}


def _run_on_ray(explorer, queries, cells, keys, results_dir: Path, recipe, max_cells, ray: dict, progress) -> None:
    """The missing cells (at most ``max_cells``) as Ray tasks; each result is filed as it finishes."""
    from abu_explorer.evaluation import ray_cells

    todo = [(c, key) for c, key in zip(cells, keys) if counterfactual.find_result(results_dir, key) is None]
    todo = todo[:max_cells] if max_cells is not None else todo
    threads = int(ray.get("threads") or 1)
    tasks = [ray_cells.CellTask(str(Path(explorer.root).resolve()), queries[c.query], c.method, c.k, c.draw,
                                recipe.to_dict(), str(Path(ray.get("scratch") or results_dir).resolve()), threads, key,
                                ray.get("device", "cpu"))
             for c, key in todo]
    ray_cells.run_cells(tasks, results_dir, ray.get("address"), ray.get("num_cpus"), progress)


def write_report(explorer, queries, methods, results, results_dir: Path, assets_dir: Path,
                 floor: dict | None = None, device: str = "cpu", ident: dict | None = None) -> dict:
    """Summary JSON + markdown table + plot + one regeneration strip per query (first draw; a row per K), of the
    machine kind that retrains on ``device``; ``ident`` (``table_id``) names the table it reports."""
    from functools import partial

    from abu_explorer.machine import kind as machine_kind

    kind = partial(machine_kind, device)

    n = len(explorer.dataset)
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    kinds = {r.get("trained_on", {}).get("kind") for r in results}
    if len(kinds) > 1:
        raise ValueError(f"one table holds one machine kind; these results come from {sorted(map(str, kinds))}")
    captions = explorer.dataset.captions
    sources = {d["prompt"]: captions.index(d["prompt"]) for d in queries if d["prompt"] in captions}
    summary = summarize(results, methods, sources)
    # one order whatever the command's order of Ks: a part of the table rewrites the same bytes
    results = sorted(results, key=lambda r: (r["k"], r["query_index"], methods.index(r["method"]), r["draw"]))
    summary.update({"table": ident, "num_train": n, "queries": queries, "machine_kind": kind(), "floor": floor,
                    "unet_hash": explorer.component_hash("unet"),
                    "cells": [{**{k: r[k] for k in ("key", "query_index", "method", "k", "draw", *METRICS, "trained_on")
                                  if k in r}, "mode": r.get("removal_settings", {}).get("mode", "")} for r in results]})
    between = [c for k in sorted({r["k"] for r in results}) for c in compare.comparisons(results, methods, k)]
    between += [c for k in sorted({r["k"] for r in results if r["method"] != SOURCE}) for m in methods  # vs K = 1
                if m != SOURCE for c in [compare.compare(results, m, SOURCE, k, 1)] if c["queries"]]
    summary["between"] = list({(c["a"], c["b"], c["k"], c["k_b"]): c for c in between}.values())
    per_cell = ["| query | method | mode | draw | source image removed | dL x1e-3 | dG-MSE x1e-3 | dG-CLIP | key |",
                "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mode = r.get("removal_settings", {}).get("mode") or "-"
        source = sources.get(r["query"]["prompt"])
        removed = "-" if source is None else "yes" if source in r.get("removed", []) else "no"
        per_cell.append(f"| {queries[r['query_index']]['prompt']} | {r['method']} | {mode} "
                        f"| {r['draw'] if r['method'] == 'random' else ''} | {removed} "
                        f"| {r['delta_loss'] * 1e3:+.1f} | {r.get('delta_g_mse', math.nan) * 1e3:.1f} "
                        f"| {r.get('delta_g_clip', math.nan):.3f} | `{r['key']}` |")
    artifacts.save_json(assets_dir / "counterfactual_summary.json", summary)
    between = ("\n\nBetween methods (paired by query: the same query's dL under each method's removal; two-sided "
               "exact sign test, so the smallest possible p is 2 / 2^queries: 0.25 with 3 queries; a bootstrap over "
               "3 queries has only 10 distinct resamples and is too narrow: read the sign test):\n\n"
               + compare.table(summary["between"], label)) if summary["between"] else ""
    artifacts.save_text(assets_dir / "counterfactual_table.md",
                        table(summary, n) + between + f"\n\nEvery cell retrained on one machine kind: {kind()} "
                        f"({results[0]['trained_on'].get('cpu_model', '') if results else ''}).\n\nPer retrain (K = "
                        + ", ".join(str(k) for k in sorted({r["k"] for r in results})) + "):\n\n" + "\n".join(per_cell) + "\n")
    title = (f"Leave-K-out retraining on the embedded model: {len({r['query_index'] for r in results})} queries, "
             f"mean ± s.e.; all on {kind()}")
    plot(summary, assets_dir / "counterfactual_plot.png", title)
    if len({r["k"] for r in results if r["method"] != SOURCE}) > 1:  # the source reference alone is no curve
        curve(summary, assets_dir / "counterfactual_curve.png", title)
    for qi, d in enumerate(queries):
        mine = [r for r in results if r["query_index"] == qi and r["draw"] == 0 and "delta_g_clip" in r]
        mine.sort(key=lambda r: (r["k"], methods.index(r["method"])))
        if mine:
            counterfactual.strip(Path(results_dir) / kind(), mine, assets_dir / f"counterfactual_strip_{slug(d['prompt'])}.png")
    return summary


GRID = "0.4%,0.84%,3.37%"  # the paper's three shares of N: 8, 17 and 68 at N = 2,015


def parse_ks(text: str, n: int) -> list[int]:
    """Comma-separated K values, each a count ("17") or a share of N ("0.84%": rounded, at least 1)."""
    ks = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            ks.append(max(1, round(n * float(part[:-1]) / 100)) if part.endswith("%") else int(part))
        except ValueError:
            raise ValueError(f"K must be a count or a share of N such as 0.84%, got {part!r}") from None
    return ks


def main(args) -> int:
    from abu_explorer.machine import use_device
    from abu_explorer.model.embedded import Explorer

    if not (args.ray or args.ray_address):
        use_device(args.device)  # a missing GPU is one line before anything loads (Ray workers check their own)
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = Explorer.load(args.precomputed)
    queries = load_queries(Path(args.queries))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ks = parse_ks(args.k, len(exp.dataset))
    if args.status:
        from abu_explorer.evaluation import progress

        print(progress.show(progress.counterfactual_status(exp, queries, methods, ks, args.draws,
                                                           Path(args.results), device=args.device)))
        return 0
    ray = {"address": args.ray_address or None, "threads": args.threads or 1, "scratch": args.ray_scratch or None} \
        if (args.ray or args.ray_address) else None
    out = run(exp, queries, methods, ks, args.draws, Path(args.results), Path(args.assets) if args.assets else None,
              progress=not args.quiet, max_cells=args.max_cells, with_floor=not args.no_floor, ray=ray,
              device=args.device, force=args.force)
    if out["report"]:
        print(table(out["report"], len(exp.dataset)))
    print(f"{out['done']}/{out['cells']} cells done")
    return 0
