"""The leave-K-out figure: dL, dG-MSE and dG-CLIP against K per method with the random control as a band, or,
at one K, each query's value per method over that band; the K = 0 retrain's mean dL (the floor) as a dotted line."""
from __future__ import annotations

import math
from pathlib import Path

from abu_explorer import artifacts

METRICS = ("delta_loss", "delta_g_mse", "delta_g_clip")
LABELS = {"delta_loss": "dL x1e-3 (higher = more forgotten)", "delta_g_mse": "dG-MSE x1e-3 (higher = more changed)",
          "delta_g_clip": "dG-CLIP (lower = more changed)"}
SCALE = {"delta_loss": 1e3, "delta_g_mse": 1e3, "delta_g_clip": 1.0}  # the table's units


def plot(summary: dict, path: Path, title: str) -> None:
    """One panel per metric. Several Ks: mean +- s.e. against K per method (the issue's plot). One K: each
    method's per-query values (one marker per query) with their mean +- s.e., over the band of the random
    control's mean +- s.e., so a reader sees which differences clear chance and which queries drive a mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    methods = list(dict.fromkeys(r["method"] for r in summary["rows"]))
    ks = sorted({r["k"] for r in summary["rows"]})
    cells = summary.get("cells", [])
    prompts = [d["prompt"] for d in summary.get("queries", [])]
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.6), dpi=110)
    for ax, metric in zip(axes, METRICS):
        sc = SCALE[metric]
        if len(ks) > 1:  # the loss-vs-K curve: one line per method, the random control as a band
            for j, m in enumerate(methods):
                rs = [r for r in summary["rows"] if r["method"] == m and not math.isnan(r[metric][0])]
                if not rs:
                    continue
                mu = [sc * r[metric][0] for r in rs]
                se = [0 if math.isnan(r[metric][1]) else sc * r[metric][1] for r in rs]
                if m == "random":
                    ax.fill_between([r["k"] for r in rs], [a - b for a, b in zip(mu, se)],
                                    [a + b for a, b in zip(mu, se)], color="0.85", zorder=0, label="random ± s.e.")
                    ax.plot([r["k"] for r in rs], mu, color="0.55", lw=1, ls="--", zorder=1)
                    continue
                xs = [r["k"] * (1 + 0.03 * (j - len(methods) / 2)) for r in rs]  # dodge: bars do not overlap
                ax.errorbar(xs, mu, yerr=se, capsize=3, label=m, marker="o", zorder=2)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ks))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("K (images removed)")
        else:
            rand = next((r for r in summary["rows"] if r["method"] == "random"), None)
            if rand is not None and not math.isnan(rand[metric][0]):
                mu, se = sc * rand[metric][0], 0 if math.isnan(rand[metric][1]) else sc * rand[metric][1]
                ax.axhspan(mu - se, mu + se, color="0.85", zorder=0, label="random mean ± s.e.")
                ax.axhline(mu, color="0.6", lw=1, zorder=0)
            named = set()  # each query in the legend once, whichever method first has its cell
            for j, m in enumerate(methods):
                for c in (c for c in cells if c["method"] == m and metric in c):
                    qi = c["query_index"]
                    ax.scatter(j + 0.08 * (qi - 1), sc * c[metric], s=22, marker=markers[qi % len(markers)],
                               color=f"C{qi % 10}", alpha=0.8, zorder=2,
                               label=prompts[qi] if prompts and qi not in named else None)
                    named.add(qi)
                row = next(r for r in summary["rows"] if r["method"] == m)
                if not math.isnan(row[metric][0]):
                    ax.errorbar(j + 0.3, sc * row[metric][0], yerr=0 if math.isnan(row[metric][1]) else sc * row[metric][1],
                                fmt="_", color="k", ms=14, capsize=4, zorder=3)
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(methods) - 0.3)
            ax.set_xlabel(f"method (K = {ks[0]}; black: mean ± s.e.)" if ks else "method")
        floor = summary.get("floor") or {}
        if metric == "delta_loss" and floor.get("queries"):  # what a retrain on every row gives on this kind
            dls = [v["delta_loss"] for v in floor["queries"].values()]
            ax.axhline(sc * sum(dls) / len(dls), color="C3", ls=":", lw=1.2, zorder=1, label="K = 0 retrain (floor)")
        ax.set_title(LABELS[metric], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: over them it hides markers
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    artifacts.save_figure(path, fig)
    plt.close(fig)
