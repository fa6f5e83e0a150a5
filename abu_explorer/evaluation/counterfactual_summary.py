"""The numbers of the leave-K-out table: per method and K, the mean +- standard error over queries, the paired
difference to the same query's random draws with its sign test and bootstrap interval, and the markdown table
beside the paper's figures. ``counterfactual_table`` runs the cells and writes the report."""
from __future__ import annotations

import math
import statistics

from abu_explorer.attribution.settings import variant_label
from abu_explorer.evaluation import counterfactual_compare as compare
from abu_explorer.evaluation import stats
from abu_explorer.evaluation.counterfactual import SOURCE
from abu_explorer.evaluation.counterfactual_plot import METRICS

SOURCE_LABEL = "the source image alone (a reference: reads the query's provenance)"


def label(row: str) -> str:
    """A row's name in the tables: a method (or variant) as the app names it, or the source reference."""
    return SOURCE_LABEL if row == SOURCE else variant_label(row)

# The paper's Table 1 (MSCOCO, N ~ 118k): dL x1e-3 at K = 500 / 1000 / 4000, i.e. these fractions of N.
# Random is quoted as one figure for all K. IF is not in that table. Absolute values depend on the model and
# data; the ratio to random is the comparable part.
PAPER_FRACTIONS = (0.0042, 0.0085, 0.034)
PAPER_DL = {"abu": (5.6, 6.7, 9.8), "dtrak": (5.4, 6.6, 9.6), "dino": (4.8, 5.6, 8.1), "clip": (4.2, 4.7, 6.4),
            "pixel": (3.6, 3.6, 4.0), "random": (3.5, 3.5, 3.5)}


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
            elif any((k, compare.query_id(r)) in by_query for r in rs):  # the source reference (K = 1) has none
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
        elif r["method"] == "random":  # the control itself: its per-draw means show how much one draw moves it
            versus = "per draw: " + " / ".join(f"{v * 1e3:.1f}" for v in r.get("delta_loss_per_draw", {}).values())
        else:
            versus = "-"
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
        lines.append(f"| {label(r['method'])} | {r['k']} ({100 * r['k'] / num_train:.2f}%) | {r['n']} | "
                     f"{fmt('delta_loss', 1e3)} | {versus} | {stat} | {ratio} | {fmt('delta_g_mse', 1e3)} | "
                     f"{fmt('delta_g_clip', 1)} | {paper} | {'/'.join(map(str, r.get('source_removed', []))) or '-'} |")
    floor = summary.get("floor")
    if floor:
        dls = [v["delta_loss"] for v in floor["queries"].values()]
        lines.append(f"| K = 0 retrain (floor) | 0 | 1 | {statistics.mean(dls) * 1e3:.3f} (max |dL| "
                     f"{max(abs(d) for d in dls) * 1e3:.3f}) | - | - | - | - | - | - | - |")
    return "\n".join(lines)
