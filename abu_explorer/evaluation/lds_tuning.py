"""``evaluate lds --split tune --sweep JSON``: choose a method's settings by LDS on the tuning split.

Every setting in the grid is scored on the tuning queries with the subset models already trained (the sweep
trains none), its LDS reported with a bootstrap interval, and paired query by query against the method's
current default (the mean LDS difference with its bootstrap interval, and a two-sided sign test of the
per-query differences). Whatever is chosen becomes the code default and is then reported on the test split,
never on the queries it was chosen on.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.evaluation import lds, stats


def parse_grid(text: str, methods: list[str]) -> dict[str, dict[str, list]]:
    """{"abu": {"alpha": [0.003, 0.01, 0.03]}} -> the same, checked: known methods, non-empty value lists."""
    grid = json.loads(text)
    ok = isinstance(grid, dict) and grid and set(grid) <= set(methods) and all(
        isinstance(g, dict) and g and all(isinstance(v, list) and v for v in g.values()) for g in grid.values())
    if not ok:
        raise ValueError("--sweep takes a JSON object keyed by method names of --methods, each a setting -> list "
                         'of values, e.g. \'{"abu": {"alpha": [0.003, 0.01, 0.03]}}\'')
    return grid


def defaults(explorer, name: str, keys) -> dict:
    """The method's current value of each swept setting (so the sweep always holds the default)."""
    from abu_explorer.attribution import spec

    cfg = getattr(spec(name).load(explorer), "cfg", None)
    values = dataclasses.asdict(cfg) if cfg is not None and dataclasses.is_dataclass(cfg) else {}
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"{name} has no setting {', '.join(missing)} (its settings: {sorted(values)})")
    return {k: values[k] for k in keys}


def combos(grid: dict[str, list], default: dict) -> list[dict]:
    """Every combination of the grid's values, the default first (added if the grid lacks it)."""
    keys = sorted(grid)
    out = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    return [default] + [c for c in out if c != default]


def compare(per_query: np.ndarray, base: np.ndarray) -> dict:
    """Paired by query: mean difference with its bootstrap interval, and a two-sided exact sign test."""
    diff = np.asarray(per_query) - np.asarray(base)
    mean, lo, hi = lds.bootstrap_mean_ci(diff)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {"diff": mean, "diff_ci95": [lo, hi], "wins": wins, "losses": losses,
            "sign_p": stats.mcnemar_p(wins, losses)}


def sweep(evaluate_setting, explorer, grid: dict[str, dict[str, list]]) -> list[dict]:
    """``evaluate_setting(name, settings) -> LDS row`` for every combination of every method's grid."""
    rows = []
    for name, g in grid.items():
        base = None
        for i, combo in enumerate(combos(g, defaults(explorer, name, g))):
            r = evaluate_setting(name, combo)
            row = {"method": name, "settings": combo, "default": i == 0, "lds": r["lds"], "ci95": r["ci95"],
                   "per_query": r["per_query"]}
            base = base if base is not None else np.array(r["per_query"])
            row["versus_default"] = compare(np.array(r["per_query"]), base) if i else None
            rows.append(row)
    return rows


def table(rows: list[dict], num_queries: int, num_subsets: int) -> str:
    lines = [f"| method | settings | LDS (tuning split, {num_queries} queries, M = {num_subsets}) | 95% interval "
             "| minus the default, 95% interval | queries better / worse | sign test p |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = ", ".join(f"{k} = {v}" for k, v in r["settings"].items()) + (" (default)" if r["default"] else "")
        v = r["versus_default"]
        vs = "-" if v is None else (f"{v['diff']:+.3f} [{v['diff_ci95'][0]:+.3f}, {v['diff_ci95'][1]:+.3f}] | "
                                    f"{v['wins']} / {v['losses']} | {v['sign_p']:.3f}")
        lines.append(f"| {r['method']} | {s} | {r['lds']:+.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     + (vs if v is not None else "- | - | -") + " |")
    return "\n".join(lines)


def write(rows: list[dict], report: dict, assets_dir: Path) -> None:
    assets_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_json(assets_dir / "lds_tuning.json", {**report, "rows": rows})
    artifacts.save_text(assets_dir / "lds_tuning.md", table(rows, report["num_queries"], report["num_subsets"])
                        + f"\n\nAll subset models trained on {report['machine_kind']}.\n")
