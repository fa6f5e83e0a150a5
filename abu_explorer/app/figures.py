"""The About tab's figure: AbU in one picture, drawn from a precomputed example."""
from __future__ import annotations

import json
from pathlib import Path

from abu_explorer import artifacts


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
    artifacts.save_figure(out, fig)
    plt.close(fig)
