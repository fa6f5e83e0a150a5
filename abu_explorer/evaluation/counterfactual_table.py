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
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution.settings import variant, variant_label
from abu_explorer.evaluation import counterfactual, counterfactual_compare as compare
from abu_explorer.evaluation import stats
from abu_explorer.evaluation.counterfactual_plot import METRICS, curve, plot
from abu_explorer.training import train
from abu_explorer.machine import kind as machine_kind

# The paper's Table 1 (MSCOCO, N ~ 118k): dL x1e-3 at K = 500 / 1000 / 4000, i.e. these fractions of N.
# Random is quoted as one figure for all K. IF is not in that table. Absolute values depend on the model and
# data; the ratio to random is the comparable part.
PAPER_FRACTIONS = (0.0042, 0.0085, 0.034)
PAPER_DL = {"abu": (5.6, 6.7, 9.8), "dtrak": (5.4, 6.6, 9.6), "dino": (4.8, 5.6, 8.1), "clip": (4.2, 4.7, 6.4),
            "pixel": (3.6, 3.6, 4.0), "random": (3.5, 3.5, 3.5)}


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
    """Rounds: for each K, each method (random once per draw), all queries."""
    cells = []
    for k in ks:
        for m in methods:
            for d in range(draws if m == "random" else 1):
                cells += [Cell(q, m, k, d) for q in range(num_queries)]
    # random draw 1+ after every method's first round: the control's spread matters less than coverage
    return sorted(cells, key=lambda c: (ks.index(c.k), c.draw, methods.index(c.method), c.query))


def summarize(results: list[dict], methods: list[str], sources: dict[str, int] | None = None) -> dict:
    """Mean +- standard error over queries (and random draws) per method and K. Also, per method, the paired
    difference dL - (the same query's mean random dL) over the queries that have a random draw, which
    removes the queries' own spread; and random's per-draw means (the spread of the control). ``sources``:
    prompt -> the training row whose caption it is; each row then counts the cells that removed that image."""
    by_query, per_draw = {}, {}  # the random control's dL, by (K, query) and by (K, draw)
    for r in results:
        if r["method"] == "random":
            by_query.setdefault((r["k"], compare.query_id(r)), []).append(r["delta_loss"])
            per_draw.setdefault(r["k"], {}).setdefault(r["draw"], []).append(r["delta_loss"])
    rows = []
    for m in methods:
        for k in sorted({r["k"] for r in results if r["method"] == m}):
            rs = [r for r in results if r["method"] == m and r["k"] == k]
            row = {"method": m, "k": k, "n": len(rs), "queries": len({compare.query_id(r) for r in rs})}
            known = [r for r in rs if (sources or {}).get(r["query"]["prompt"]) is not None and "removed" in r]
            if known:
                row["source_removed"] = [sum(sources[r["query"]["prompt"]] in r["removed"] for r in known), len(known)]
            for metric in METRICS:
                row[metric] = stats.mean_se([r[metric] for r in rs if metric in r])
            if m == "random":
                row["delta_loss_per_draw"] = {d: statistics.mean(v) for d, v in sorted(per_draw[k].items())}
            else:
                paired = [(r["delta_loss"], statistics.mean(by_query[(k, compare.query_id(r))]))
                          for r in rs if (k, compare.query_id(r)) in by_query]
                diffs = [dl - rand for dl, rand in paired]
                row["delta_loss_vs_random"] = stats.mean_se(diffs)
                # over the queries random has run at this K, so that a half-run control is not set against all
                rand = statistics.mean(rand for _, rand in paired) if paired else math.nan
                row["ratio_to_random"] = statistics.mean(dl for dl, _ in paired) / rand if paired and rand > 0 else math.nan
                row["vs_random_test"] = versus_random(diffs)
            rows.append(row)
    return {"rows": rows}


def versus_random(diffs: list[float]) -> dict:
    """Per-query differences (method dL - the same query's random mean): sign test and bootstrap interval.
    With n queries the smallest possible one-sided p is 1/2^n: 3 queries cannot reach 0.05."""
    wins = sum(d > 0 for d in diffs)
    p = stats.sign_test_p(wins, len(diffs))
    return {"queries": len(diffs), "above_random": wins, "sign_test_p": p, "min_possible_p": 0.5 ** len(diffs),
            "bootstrap_ci95": stats.bootstrap_ci(diffs), "significant": bool(p < 0.05)}


def paper_dl(method: str, k: int, num_train: int) -> float | None:
    """The paper's dL x1e-3 for ``method`` at the setting nearest K/N, if one is within a factor 1.25."""
    frac = k / num_train
    i = min(range(len(PAPER_FRACTIONS)), key=lambda j: abs(math.log(frac / PAPER_FRACTIONS[j])))
    if method not in PAPER_DL or abs(math.log(frac / PAPER_FRACTIONS[i])) > math.log(1.25):
        return None
    return PAPER_DL[method][i]


def table(summary: dict, num_train: int) -> str:
    lines = ["| method | K (% of N) | cells | dL x1e-3 | dL - random x1e-3 (paired by query) | above random: "
             "sign test p (one-sided); 95% bootstrap CI x1e-3 | dL / random | dG-MSE x1e-3 | dG-CLIP "
             "| paper dL x1e-3 (/ random) | source image removed (cells) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rand_mean = {r["k"]: r["delta_loss"][0] for r in summary["rows"] if r["method"] == "random"}
    for r in summary["rows"]:
        def fmt(metric, scale, sign=""):
            m, se = r[metric]
            digits = 1 if scale > 1 else 3
            if math.isnan(m):
                return "-"
            return f"{m * scale:{sign}.{digits}f}" + ("" if math.isnan(se) else f" ± {se * scale:.{digits}f}")

        if "delta_loss_vs_random" in r:
            versus = fmt("delta_loss_vs_random", 1e3, "+")
        else:  # the control itself: its per-draw means show how much one draw moves it
            versus = "per draw: " + " / ".join(f"{v * 1e3:.1f}" for v in r.get("delta_loss_per_draw", {}).values())
        rm = rand_mean.get(r["k"], math.nan)
        ratio = r.get("ratio_to_random", 1.0 if r["method"] == "random" else
                      r["delta_loss"][0] / rm if rm > 0 else math.nan)  # rows without a paired ratio: the ratio of means
        ratio = "-" if math.isnan(ratio) else f"{ratio:.2f}"
        p, p_rand = paper_dl(r["method"], r["k"], num_train), paper_dl("random", r["k"], num_train)
        paper = "-" if p is None else f"{p:.1f} ({p / p_rand:.2f})"
        test = r.get("vs_random_test")
        if test and test["queries"]:
            lo, hi = test["bootstrap_ci95"]
            ci = "" if math.isnan(lo) else f"; [{lo * 1e3:+.1f}, {hi * 1e3:+.1f}]"
            stat = f"{test['above_random']}/{test['queries']}: {stats.p_text(test['sign_test_p'])}{ci}"
        else:
            stat = "-"
        lines.append(f"| {variant_label(r['method'])} | {r['k']} ({100 * r['k'] / num_train:.2f}%) | {r['n']} | "
                     f"{fmt('delta_loss', 1e3)} | {versus} | {stat} | {ratio} | {fmt('delta_g_mse', 1e3)} | "
                     f"{fmt('delta_g_clip', 1)} | {paper} | {'/'.join(map(str, r.get('source_removed', []))) or '-'} |")
    floor = summary.get("floor")
    if floor:
        dls = [v["delta_loss"] for v in floor["queries"].values()]
        lines.append(f"| K = 0 retrain (floor) | 0 | 1 | {statistics.mean(dls) * 1e3:.3f} (max |dL| "
                     f"{max(abs(d) for d in dls) * 1e3:.3f}) | - | - | - | - | - | - | - |")
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def table_id(queries: list[dict], methods: list[str], ks: list[int], draws: int) -> dict:
    """What makes a report one table: its queries, its methods (in row order), its Ks and random draws."""
    return {"queries": queries, "methods": list(methods), "k": sorted(set(ks)), "draws": draws}


def report_table(assets_dir: Path, ident: dict, force: bool = False) -> dict:
    """The table whose report ``assets_dir`` holds once this run (``ident``) is done. A folder holds one table:
    a run of a part of it (fewer queries, methods, Ks or draws) rewrites the whole table's report from the cache;
    another table's report stops the run before any work, unless ``force``: then its files go first, so no
    curve or strip of the old table stays beside the new one."""
    old = Path(assets_dir) / "counterfactual_summary.json"
    if not old.exists():
        return ident
    summary = artifacts.load_json(old)
    t = summary.get("table")
    if t and all(q in t["queries"] for q in ident["queries"]) and set(ident["methods"]) <= set(t["methods"]) \
            and set(ident["k"]) <= set(t["k"]) and ident["draws"] <= t["draws"] and not (force and t != ident):
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
               if m != "random"}
    settings = {m: counterfactual.removal_settings(explorer, variant(m)[0], rankers.get(m)) for m in methods}
    n = len(explorer.dataset)
    for k in ks:
        if not 1 <= k < n:
            raise ValueError(f"K must be in [1, {n - 1}]: a retrain needs at least one of the {n} images, got {k}")
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
    summary.update({"table": ident, "num_train": n, "queries": queries, "machine_kind": kind(), "floor": floor,
                    "unet_hash": explorer.component_hash("unet"),
                    "cells": [{**{k: r[k] for k in ("key", "query_index", "method", "k", "draw", *METRICS, "trained_on")
                                  if k in r}, "mode": r.get("removal_settings", {}).get("mode", "")} for r in results]})
    summary["between"] = [c for k in sorted({r["k"] for r in results}) for c in compare.comparisons(results, methods, k)]
    per_cell = ["| query | method | mode | draw | source image removed | dL x1e-3 | dG-MSE x1e-3 | dG-CLIP | key |",
                "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["k"], r["query_index"], methods.index(r["method"]), r["draw"])):
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
               + compare.table(summary["between"], variant_label)) if summary["between"] else ""
    artifacts.save_text(assets_dir / "counterfactual_table.md",
                        table(summary, n) + between + f"\n\nEvery cell retrained on one machine kind: {kind()} "
                        f"({results[0]['trained_on'].get('cpu_model', '') if results else ''}).\n\nPer retrain (K = "
                        + ", ".join(str(k) for k in sorted({r["k"] for r in results})) + "):\n\n" + "\n".join(per_cell) + "\n")
    title = (f"Leave-K-out retraining on the embedded model: {len({r['query_index'] for r in results})} queries, "
             f"mean ± s.e.; all on {kind()}")
    plot(summary, assets_dir / "counterfactual_plot.png", title)
    if len({r["k"] for r in results}) > 1:
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
