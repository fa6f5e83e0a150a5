"""Between methods in the leave-K-out table: are two methods' dL different? Paired by query (the same query,
recipe, seed and machine kind; only the removed set differs), each query's mean dL of one method minus that of
the other; over the queries, a two-sided exact sign test and a bootstrap interval of the mean difference.

With n queries the smallest two-sided p is 2 / 2^n: 3 queries give 0.25, so no difference between two methods
can be significant there; 6 queries reach 0.031 only if all six agree."""
from __future__ import annotations

import json
import math
import statistics

from abu_explorer.evaluation import stats

SUBJECTS = ("abu", "abuplus")  # the rows compared with every other method; the rest only with these


def query_id(r: dict) -> str:
    """The query a result answered (prompt, seed, steps, ...), whatever its index in the file that ran it."""
    return json.dumps(r["query"], sort_keys=True)


def per_query(results: list[dict], method: str, k: int) -> dict[str, float]:
    """Query -> the method's mean dL at K over that query's cells (random: over its draws)."""
    by = {}
    for r in results:
        if r["method"] == method and r["k"] == k:
            by.setdefault(query_id(r), []).append(r["delta_loss"])
    return {q: statistics.mean(v) for q, v in by.items()}


def compare(results: list[dict], a: str, b: str, k: int, k_b: int | None = None) -> dict:
    """``a`` minus ``b`` per query they share at K (``b`` at ``k_b`` when given: the source reference's K = 1):
    how often ``a`` is higher, the two-sided sign-test p (ties count for neither side) and the mean difference
    with its 95% bootstrap interval."""
    k_b = k if k_b is None else k_b
    da, db = per_query(results, a, k), per_query(results, b, k_b)
    diffs = [da[q] - db[q] for q in sorted(da.keys() & db.keys())]
    higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    p = stats.mcnemar_p(higher, lower) if diffs else math.nan
    return {"a": a, "b": b, "k": k, "k_b": k_b, "queries": len(diffs), "a_higher": higher, "b_higher": lower,
            "sign_test_p_two_sided": p, "min_possible_p": min(1.0, 2 * 0.5 ** len(diffs)) if diffs else math.nan,
            "mean_difference": statistics.mean(diffs) if diffs else math.nan,
            "bootstrap_ci95": stats.bootstrap_ci(diffs), "significant": bool(diffs and p < 0.05)}


def comparisons(results: list[dict], methods: list[str], k: int, subjects=SUBJECTS) -> list[dict]:
    """Each subject method (AbU, AbU+) against every other method with cells at K, each pair once (random is
    the main table's own column: one-sided there, since only "above chance" is asked)."""
    present = [m for m in methods if any(r["method"] == m and r["k"] == k for r in results)]
    pairs = []
    for a in (m for m in subjects if m in present):
        pairs += [(a, b) for b in present if b not in (a, "random") and (b, a) not in pairs]
    return [c for c in (compare(results, a, b, k) for a, b in pairs) if c["queries"]]


def table(rows: list[dict], label=lambda m: m) -> str:
    """The comparisons as markdown: mean difference x1e-3, its interval, the split of queries and the p."""
    lines = ["| method A | method B | K | queries | dL(A) - dL(B) x1e-3 | 95% bootstrap CI x1e-3 | A higher / B higher "
             "| sign test p (two-sided) | significant at 0.05 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lo, hi = c["bootstrap_ci95"]
        ci = "-" if math.isnan(lo) else f"[{lo * 1e3:+.1f}, {hi * 1e3:+.1f}]"
        b = label(c["b"]) + (f" (K = {c['k_b']})" if c.get("k_b", c["k"]) != c["k"] else "")
        lines.append(f"| {label(c['a'])} | {b} | {c['k']} | {c['queries']} | {c['mean_difference'] * 1e3:+.1f} "
                     f"| {ci} | {c['a_higher']} / {c['b_higher']} | {stats.p_text(c['sign_test_p_two_sided'])} "
                     f"| {'yes' if c['significant'] else 'no'} |")
    return "\n".join(lines)
