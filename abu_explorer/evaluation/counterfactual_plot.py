"""The leave-K-out figures. ``plot``: at one K, each query's value per method over the band of the random
control. ``curve``: dL, dG-MSE and dG-CLIP against K, one line per method with error bars, random as a band.
Both draw the K = 0 retrain's mean dL (the floor) as a dotted line."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from abu_explorer import artifacts

METRICS = ("delta_loss", "delta_g_mse", "delta_g_clip")
LABELS = {"delta_loss": "dL x1e-3 (higher = more forgotten)", "delta_g_mse": "dG-MSE x1e-3 (higher = more changed)",
          "delta_g_clip": "dG-CLIP (lower = more changed)"}
SCALE = {"delta_loss": 1e3, "delta_g_mse": 1e3, "delta_g_clip": 1.0}  # the table's units
MARKERS = "osD^v<>ph*"


def _label(row: str) -> str:
    """A row's short name: "AbU+", "Pixel NN", "AbU, alpha 0.01" (a variant row: the settings it changes)."""
    from abu_explorer.attribution import spec
    from abu_explorer.attribution.settings import variant
    from abu_explorer.evaluation.counterfactual import SOURCE

    if row == SOURCE:
        return "source image alone"
    base, opts = variant(row)
    try:
        name = spec(base).label.split(" (")[0]
    except ValueError:
        name = base
    return ", ".join([name] + [f"{k} {v}" for k, v in opts.items()])


def _mean_se(row: dict, metric: str) -> tuple[float, float]:
    mu, se = row[metric]
    return SCALE[metric] * mu, 0.0 if math.isnan(se) else SCALE[metric] * se


def _per_method(ax, summary: dict, metric: str, k: int) -> None:
    """One K: a marker per query and method, the method's mean +- s.e. beside it, over the random band."""
    rows = [r for r in summary["rows"] if r["k"] == k]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    prompts = [d["prompt"] for d in summary.get("queries", [])]
    rand = next((r for r in rows if r["method"] == "random"), None)
    if rand is not None and not math.isnan(rand[metric][0]):
        mu, se = _mean_se(rand, metric)
        ax.axhspan(mu - se, mu + se, color="0.85", zorder=0, label="random mean ± s.e.")
        ax.axhline(mu, color="0.6", lw=1, zorder=0)
    named = set()  # each query in the legend once, whichever method first has its cell
    for j, m in enumerate(methods):
        for c in (c for c in summary.get("cells", []) if c["method"] == m and c["k"] == k and metric in c):
            qi = c["query_index"]
            ax.scatter(j + 0.08 * (qi - 1), SCALE[metric] * c[metric], s=22, marker=MARKERS[qi % len(MARKERS)],
                       color=f"C{qi % 10}", alpha=0.8, zorder=2, label=prompts[qi] if prompts and qi not in named else None)
            named.add(qi)
        row = next(r for r in rows if r["method"] == m)
        if not math.isnan(row[metric][0]):
            mu, se = _mean_se(row, metric)
            ax.errorbar(j + 0.3, mu, yerr=se, fmt="_", color="k", ms=14, capsize=4, zorder=3)
    ax.set_xticks(range(len(methods)), [_label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(methods) - 0.3)
    ax.set_xlabel(f"method (K = {k}; black: mean ± s.e.)")


def _against_k(ax, summary: dict, metric: str) -> None:
    """Several Ks: mean +- s.e. against K (log axis), one line per method, the random control as a band. A point
    over fewer queries than the table's most is marked "n=..": its mean is not over the same queries."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    methods = list(dict.fromkeys(r["method"] for r in summary["rows"]))
    most = max(r["queries"] for r in summary["rows"])

    def mark(xs, mu, rs):
        for x, y, r in zip(xs, mu, rs):
            if r["queries"] < most:
                ax.annotate(f"n={r['queries']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    for j, m in enumerate(methods):
        rs = sorted((r for r in summary["rows"] if r["method"] == m and not math.isnan(r[metric][0])), key=lambda r: r["k"])
        if not rs:
            continue
        mu, se = zip(*(_mean_se(r, metric) for r in rs))
        ks = [r["k"] for r in rs]
        if m == "random" and len(ks) == 1:  # a band needs two Ks: one K's control as a grey bar
            ax.errorbar(ks, mu, yerr=se, color="0.55", fmt="_", ms=16, capsize=4, zorder=1, label="random ± s.e.")
            mark(ks, mu, rs)
            continue
        if m == "random":
            ax.fill_between(ks, [a - b for a, b in zip(mu, se)], [a + b for a, b in zip(mu, se)], color="0.85",
                            zorder=0, label="random ± s.e.")
            ax.plot(ks, mu, color="0.55", lw=1, ls="--", zorder=1)
            mark(ks, mu, rs)
            continue
        xs = [k * (1 + 0.03 * (j - len(methods) / 2)) for k in ks]  # dodge: the bars do not overlap
        ax.errorbar(xs, mu, yerr=se, capsize=3, label=_label(m), marker="o" if len(ks) > 1 else "s", zorder=2)
        mark(xs, mu, rs)
    ks = sorted({r["k"] for r in summary["rows"]})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(ks[0] / 1.35, ks[-1] * 1.35)
    n = summary.get("num_train")
    ax.set_xlabel("K images removed" + (f" ({', '.join(f'{100 * k / n:.2g}%' for k in ks)} of N)" if n else ""))


def _figure(summary: dict, path: Path, title: str, panel) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.6), dpi=110)
    for ax, metric in zip(axes, METRICS):
        panel(ax, metric)
        floor = summary.get("floor") or {}
        if metric == "delta_loss" and floor.get("queries"):  # what a retrain on every row gives on this kind
            dls = [v["delta_loss"] for v in floor["queries"].values()]
            ax.axhline(SCALE[metric] * sum(dls) / len(dls), color="C3", ls=":", lw=1.2, zorder=1,
                       label="K = 0 retrain (floor)")
        ax.set_title(LABELS[metric], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: over them it hides markers
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    artifacts.save_figure(path, fig)
    plt.close(fig)


def plot(summary: dict, path: Path, title: str, k: int | None = None) -> None:
    """Each method's per-query values at one K (default: the K with the most cells), so a reader sees which
    differences clear chance and which queries drive a mean."""
    if k is None:
        counts = Counter()
        for r in summary["rows"]:
            counts[r["k"]] += r["n"]
        k = max(counts, key=lambda kk: (counts[kk], -kk))  # ties: the smaller K
    _figure(summary, path, title, lambda ax, metric: _per_method(ax, summary, metric, k))


def curve(summary: dict, path: Path, title: str) -> None:
    """The loss-vs-K curve: every metric against K, one line per method, random as a band."""
    _figure(summary, path, title, lambda ax, metric: _against_k(ax, summary, metric))
