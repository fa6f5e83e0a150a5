"""Figures for README, drawn from the benchmark JSON files (``python -m abu_explorer.plots``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


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
    fig.savefig(out)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "assets")
    quality_vs_time(json.loads((root / "benchmarks" / "model_benchmark.json").read_text()),
                    root / "quality_vs_time.png")


def about_figure(example_dir: Path, out: Path, data_images=None) -> None:
    """AbU in one picture: query -> unlearning step -> re-measured losses -> ranking (a precomputed example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    doc = json.loads((example_dir / "examples.json").read_text())
    item = doc["items"][0]
    top = item["rankings"]["abu"]["results"][:4]
    fig = plt.figure(figsize=(10, 2.8), dpi=120)
    ax = fig.add_axes([0.0, 0.12, 0.16, 0.76])
    ax.imshow(Image.open(example_dir / f"{item['name']}.png"))
    ax.set_title(f"query: \"{item['source']['prompt']}\"", fontsize=9)
    ax.axis("off")
    steps = [("1. unlearn the query", "one Newton step of gradient\nascent on its DDPM loss,\ncross-attention K/V only:\n"
              "θ' = θ₀ + (α/N) F⁻¹ ∇L(query)"),
             ("2. re-measure", "the DDPM loss of every\ntraining image at fixed\ntimesteps and fixed noise,\n"
              "under θ₀ and under θ'"),
             ("3. rank", "score = loss(θ') - loss(θ₀):\nthe images the model\nforgot most made the query")]
    for i, (title, body) in enumerate(steps):
        x = 0.19 + i * 0.2
        fig.text(x, 0.78, title, fontsize=10, weight="bold")
        fig.text(x, 0.25, body, fontsize=8, va="bottom")
        fig.patches.append(matplotlib.patches.FancyArrow(x - 0.025, 0.5, 0.015, 0, width=0.02, head_width=0.06,
                                                         head_length=0.008, transform=fig.transFigure,
                                                         color="0.4"))
    for j, r in enumerate(top):
        ax = fig.add_axes([0.79 + (j % 2) * 0.1, 0.52 - (j // 2) * 0.45, 0.09, 0.36])
        if data_images is not None:
            ax.imshow(data_images[r["index"]])
        ax.set_title(f"#{r['rank']} {r['caption'][:14]}\n{r['score']:+.4f}", fontsize=7)
        ax.axis("off")
    fig.savefig(out)
    plt.close(fig)
