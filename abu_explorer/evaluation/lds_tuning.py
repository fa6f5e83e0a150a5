"""``evaluate lds --split tune --sweep JSON``: choose a method's settings by LDS on the tuning split.

The grid varies one factor at a time: the method's current default, then each listed value of each setting with
the others at their defaults. Every setting is scored on the tuning queries with the subset models already
trained (the sweep trains none), its LDS reported with a bootstrap interval, and paired query by query against
the default (the mean LDS difference with its bootstrap interval, and a two-sided sign test of the per-query
differences). With ``stability``, a method with a draw seed (``SEED_OF``) is scored again with the next seed
and the mean top-10 overlap of the two rankings is reported: how much of a ranking is the draw's noise.
Whatever is chosen becomes the code default and is then reported on the test split, never on the queries it
was chosen on.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.evaluation import stats


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


SEED_OF = {"abu": "unlearn_seed", "abuplus": "unlearn_seed"}  # the seed of the unlearning step's random draws


def combos(grid: dict[str, list], default: dict) -> list[dict]:
    """The default first, then one factor at a time: each other value of each setting, the rest at the default."""
    out = [dict(default)]
    for key in sorted(grid):
        for value in grid[key]:
            combo = {**default, key: value}
            if combo not in out:
                out.append(combo)
    return out


def top_overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over queries of |top(a) & top(b)| / len(top(a)): rankings' agreement at the top."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def compare(per_query: np.ndarray, base: np.ndarray) -> dict:
    """Paired by query: mean difference with its bootstrap interval, and a two-sided exact sign test."""
    diff = np.asarray(per_query) - np.asarray(base)
    mean, lo, hi = stats.mean_ci(diff)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {"diff": mean, "diff_ci95": [lo, hi], "wins": wins, "losses": losses,
            "sign_p": stats.mcnemar_p(wins, losses)}


def sweep(evaluate_setting, explorer, grid: dict[str, dict[str, list]], stability: bool = False,
          around: dict | None = None) -> list[dict]:
    """``evaluate_setting(name, settings) -> LDS row`` (with "per_query" and "top10") for every setting of every
    method's grid; with ``stability``, each again with the next draw seed where the method has one. ``around``
    ({method: settings}): the centre of a method's grid where it is not the current default (e.g. an earlier
    round of the grid, re-made after the default moved)."""
    rows = []
    for name, g in grid.items():
        base = None
        seed_key = SEED_OF.get(name) if stability else None
        seed = defaults(explorer, name, [seed_key])[seed_key] if seed_key else None
        centre = {**defaults(explorer, name, g), **(around or {}).get(name, {})}
        for i, combo in enumerate(combos(g, centre)):
            r = evaluate_setting(name, combo)
            row = {"method": name, "settings": combo, "default": i == 0, "lds": r["lds"], "ci95": r["ci95"],
                   "per_query": r["per_query"], "lds_within_source": r.get("lds_within_source")}
            base = base if base is not None else np.array(r["per_query"])
            row["versus_default"] = compare(np.array(r["per_query"]), base) if i else None
            if seed_key:
                other = evaluate_setting(name, {**combo, seed_key: combo.get(seed_key, seed) + 1})
                row["stability"] = {"top10_overlap": top_overlap(r["top10"], other["top10"]),
                                    "lds_next_seed": other["lds"]}
            rows.append(row)
    return rows


def table(rows: list[dict], num_queries: int, num_subsets: int) -> str:
    stab = any("stability" in r for r in rows)
    lines = [f"| method | settings | LDS (tuning split, {num_queries} queries, M = {num_subsets}) | 95% interval "
             "| minus the default, 95% interval | queries better / worse | sign test p | within the source image's "
             "strata (decides nothing) |" + (" top-10 overlap with the next draw seed | LDS, next seed |" if stab else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if stab else "")]
    for r in rows:
        s = ", ".join(f"{k} = {v}" for k, v in r["settings"].items()) + (" (default)" if r["default"] else "")
        v = r["versus_default"]
        vs = "-" if v is None else (f"{v['diff']:+.3f} [{v['diff_ci95'][0]:+.3f}, {v['diff_ci95'][1]:+.3f}] | "
                                    f"{v['wins']} / {v['losses']} | {stats.p_text(v['sign_p'])}")
        st = r.get("stability")
        extra = (f" {st['top10_overlap']:.2f} | {st['lds_next_seed']:+.3f} |" if st else " - | - |") if stab else ""
        w = r.get("lds_within_source")
        lines.append(f"| {r['method']} | {s} | {r['lds']:+.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     + (vs if v is not None else "- | - | -") + (" | -" if w is None else f" | {w:+.3f}") + " |"
                     + extra)
    return "\n".join(lines)


def choose(rows: list[dict]) -> dict[str, dict | None]:
    """The rule fixed before the grid ran: per method, a setting replaces the default only if the bootstrap
    interval of its difference from the default lies above 0; of several, the largest mean difference. None keeps
    the default. The rule picks; the caller changes the code default and runs the grid again around it."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        better = [r for r in rows if r["method"] == name and r["versus_default"] is not None
                  and r["versus_default"]["diff_ci95"][0] > 0]
        out[name] = max(better, key=lambda r: r["versus_default"]["diff"])["settings"] if better else None
    return out


def choice_text(rows: list[dict]) -> str:
    parts = []
    for name, chosen in choose(rows).items():
        default = next(r["settings"] for r in rows if r["method"] == name and r["default"])
        changed = {k: v for k, v in (chosen or {}).items() if default.get(k) != v}
        parts.append(f"{name}: " + (", ".join(f"{k} = {v}" for k, v in changed.items()) if changed
                                    else "keep the default (no interval of a difference lies above 0)"))
    return "The rule's choice: " + "; ".join(parts) + "."


def sweep_key(entry: dict) -> str:
    """A sweep is one grid around one default on one set of queries; re-running it replaces its entry."""
    defaults_of = {r["method"]: r["settings"] for r in entry["rows"] if r["default"]}
    return json.dumps([defaults_of, entry["num_queries"]], sort_keys=True, default=str)


def write(rows: list[dict], report: dict, assets_dir: Path) -> list[dict]:
    """Add this sweep to ``assets/lds_tuning.json`` / ``.md`` beside the earlier ones (the first grid, the grid
    around a new default, a costly setting on fewer queries), replacing a sweep with the same defaults and
    queries; returns every sweep, oldest first."""
    path = assets_dir / "lds_tuning.json"
    old = artifacts.load_json(path).get("sweeps", []) if path.exists() else []
    entry = {**report, "rows": rows, "choice": choose(rows)}
    sweeps = [s for s in old if sweep_key(s) != sweep_key(entry)] + [entry]
    assets_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_json(path, {"sweeps": sweeps})
    blocks = []
    for i, s in enumerate(sweeps, 1):
        defaults_of = "; ".join(f"{r['method']}: " + ", ".join(f"{k} = {v}" for k, v in r["settings"].items())
                                for r in s["rows"] if r["default"])
        blocks.append(f"### Sweep {i}: around {defaults_of} ({s['num_queries']} queries)\n\n"
                      + table(s["rows"], s["num_queries"], s["num_subsets"]) + "\n\n" + choice_text(s["rows"])
                      + f" All subset models trained on {s['machine_kind']}.")
    artifacts.save_text(assets_dir / "lds_tuning.md", "\n\n".join(blocks) + "\n")
    return sweeps
