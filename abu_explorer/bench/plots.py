"""The quality-vs-time figure of ``bench model --snapshots`` (``python -m abu_explorer.bench.plots [ASSETS]``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from abu_explorer import artifacts


def quality_vs_time(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = report["snapshots"]
    minutes = [s["train_minutes"] for s in snaps]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    ax.plot(minutes, [s["top10"] for s in snaps], "o-", label="generated, top-10")
    ax.plot(minutes, [s["top1"] for s in snaps], "s-", label="generated, top-1")
    real = report["quality"]["real"]
    ax.axhline(real["top10"], color="gray", ls="--", lw=1, label=f"real images, top-10 ({real['top10']:.2f})")
    ax.axhline(real["top10"] / 2, color="red", ls=":", lw=1, label="bar: half the real top-10")
    ax.set_xlabel(f"UNet training time, minutes ({report['threads']} threads, {report['cpu']})", fontsize=7)
    ax.set_ylabel("CLIP caption retrieval accuracy")
    ax.set_title("Quality of the embedded model vs training time (100 captions)", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    artifacts.save_figure(out, fig)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "assets")
    quality_vs_time(json.loads((root / "benchmarks" / "model_benchmark.json").read_text()),
                    root / "quality_vs_time.png")
