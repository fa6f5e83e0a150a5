"""Which way of asking AbU about a box finds the box's own source? A fast-mode look on held-out pairs.

The box benchmark's 40 pairs stay untouched: this uses the next ``--pairs`` pairs of the same rule
(``boxes.choose_pairs``), halves and pasted layouts, and compares three ways to query a box:

    plain     the box-masked DDPM loss of the composite (AbU's box, as shipped)
    contrast  ``box_contrast``: unlearn the box and the rest apart, rank by the difference
    crop      the box cut out and resized to the model's size, queried as a whole image (same caption)
    box-nocap, crop-nocap   the same with the empty caption (the model's unconditional input)
    alpha-0.001, alpha-0.1  the plain box with a 10x smaller / larger unlearning step than the shipped 0.01
    low-t, high-t  the plain box unlearned with draws at t < T/4 only (little noise: the denoiser's error is
              local) / at t >= 3T/4 only (mostly noise: the caption decides); the scores' loss timesteps unchanged

Fast mode (the screen + 200 rescored rows), so a source outside the rescored rows keeps its screen rank: a
quick look to choose what the exact benchmark should run, not a result. Prints the own-source wins per
variant and layout; ``--json`` saves every box.

    PYTHONPATH=. python scripts/box_variants.py [--pairs 12] [--json runs/box_variants.json]
    PYTHONPATH=. python scripts/box_variants.py --steps 4   # cosines between unlearning steps instead
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch
from PIL import Image

from abu_explorer.attribution import query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.evaluation import boxes
from abu_explorer.model.embedded import Explorer

BENCHMARK_PAIRS = 40


class Banded(AbU):
    """AbU whose unlearning draws take their timestep only in ``band`` = [lo, hi) (uniform there: t -> lo + t mod
    (hi - lo), the noise unchanged); everything else as shipped."""
    band = (0, 1000)

    def query_gradient(self, query, step: int = 0):
        from abu_explorer.attribution import abu as module

        lo, hi = self.band
        original = module.random_draw

        def banded(*args):
            t, noise = original(*args)
            return lo + t % (hi - lo), noise

        module.random_draw = banded
        try:
            return super().query_gradient(query, step)
        finally:
            module.random_draw = original


def banded(exp, lo: int, hi: int) -> Banded:
    method = Banded.load(exp)
    method.band = (lo, hi)
    return method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--layouts", default="halves,pasted")
    ap.add_argument("--variants", default="plain,contrast,crop")
    ap.add_argument("--json", default="")
    ap.add_argument("--steps", type=int, default=0, help="print, for this many held-out halves composites, the "
                    "cosine between the unlearning steps of its two boxes and of its two sources as queries")
    args = ap.parse_args()
    torch.set_num_threads(1)
    exp = Explorer.load("precomputed")
    ds, size = exp.dataset, exp.image_size
    plain, contrast = AbU.load(exp), AbU.load(exp, box_contrast=True)
    stepped = {alpha: AbU.load(exp, alpha=alpha) for alpha in (0.001, 0.1)}
    T = exp.scheduler.config.num_train_timesteps
    bands = {"low-t": banded(exp, 0, T // 4), "high-t": banded(exp, 3 * T // 4, T)}
    pairs = boxes.choose_pairs(exp, BENCHMARK_PAIRS + args.pairs)[BENCHMARK_PAIRS:]
    if args.steps:
        return step_cosines(exp, plain, pairs[:args.steps])
    rows = []
    for a, b in pairs:
        for lay in args.layouts.split(","):
            img, parts = boxes.composite(ds, a, b, lay)
            cap = boxes.caption(ds, a, b)
            for i, (box, own, other) in enumerate(parts):
                crop = img.crop(tuple(int(v) for v in box)).resize((size, size), Image.Resampling.BICUBIC)
                boxed, cropped = q.from_image(exp, img, cap, box), q.from_image(exp, crop, cap)
                asks = {"plain": (plain, boxed), "contrast": (contrast, boxed), "crop": (plain, cropped),
                        "box-nocap": (plain, dataclasses.replace(boxed, prompt="")),
                        "crop-nocap": (plain, dataclasses.replace(cropped, prompt=""))}
                for alpha in (0.001, 0.1):
                    asks[f"alpha-{alpha}"] = (stepped[alpha], boxed)
                asks.update({band: (method, boxed) for band, method in bands.items()})
                asks = {k: asks[k] for k in args.variants.split(",")}
                for name, (method, query) in asks.items():
                    s = method.score(query, "fast").scores.numpy()
                    rows.append({"pair": [a, b], "layout": lay, "box": i, "variant": name,
                                 **boxes.box_result(s, own, other)})
            print(f"pair {a}-{b} {lay}: " + ", ".join(
                f"{v} {sum(r['own_wins'] for r in rows[-2 * len(asks):] if r['variant'] == v)}/2" for v in asks),
                flush=True)
    print("| variant | " + " | ".join(args.layouts.split(",")) + " | all | mean own rank |")
    print("|---|" + "---|" * (len(args.layouts.split(",")) + 2))
    for v in args.variants.split(","):
        sel = [r for r in rows if r["variant"] == v]
        cells = [f"{sum(r['own_wins'] for r in sel if r['layout'] == lay)}/{sum(r['layout'] == lay for r in sel)}"
                 for lay in args.layouts.split(",")]
        print(f"| {v} | " + " | ".join(cells) + f" | {sum(r['own_wins'] for r in sel)}/{len(sel)} | "
              f"{np.mean([r['own_rank'] for r in sel]):.0f} |")
    if args.json:
        from pathlib import Path

        from abu_explorer import artifacts

        artifacts.save_json(Path(args.json), {"command": "PYTHONPATH=. python " + " ".join(sys.argv),
                                              "pairs": pairs, "rows": rows})


def step_cosines(exp, method, pairs) -> None:
    """Cosine between unlearning steps dtheta: of a composite's two boxes, of its two sources (training images as
    queries), and of each box with each source."""
    def cos(x, y):
        return float(torch.nn.functional.cosine_similarity(x, y, dim=0))

    print("| pair | box A vs box B | source A vs source B | box A vs source A / B | box B vs source A / B |")
    print("|---|---|---|---|---|")
    for a, b in pairs:
        img, parts = boxes.composite(exp.dataset, a, b, "halves")
        cap = boxes.caption(exp.dataset, a, b)
        box_a, box_b = (method.unlearn(q.from_image(exp, img, cap, box)) for box, _, _ in parts)
        src_a, src_b = (method.unlearn(q.from_training_image(exp, i)) for i in (a, b))
        print(f"| {a}-{b} | {cos(box_a, box_b):+.3f} | {cos(src_a, src_b):+.3f} | {cos(box_a, src_a):+.3f} / "
              f"{cos(box_a, src_b):+.3f} | {cos(box_b, src_a):+.3f} / {cos(box_b, src_b):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
