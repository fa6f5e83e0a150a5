"""AbU's box contrast with each box's loss changes put on one scale, checked on held-out halves composites.

The box contrast compares tau_A(z) - tau_B(z) between the two sources (``boxes.pair_contrast``). Two box
queries unlearn with steps of different sizes, so their loss changes differ in scale, and a raw difference
then mostly says which box took the larger step. *Scaled*: each box's changes divided by their median absolute
value over all rows before the difference (the variant chosen on the benchmark's own 40 composites, where it
won 30 of 40 against the raw contrast's 19; so it is checked here on pairs the benchmark never used).

Runs AbU exact on the halves composites of the ``--pairs`` pairs after the benchmark's 40 (cached in
``--folder``, resumable), then prints, per variant, the composites whose both boxes rank their own source
first: raw contrast, scaled contrast, z-scored contrast, and the plain boxes.

    PYTHONPATH=. python scripts/box_scaled_contrast.py [--pairs 12] [--folder runs/box_heldout]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import boxes
from abu_explorer.evaluation.stats import clopper_pearson
from abu_explorer.model.embedded import Explorer

BENCHMARK_PAIRS = 40


def zscored(t: np.ndarray) -> np.ndarray:
    return (t - t.mean()) / t.std()


def contrast_wins(rows: list[dict], folder: Path, norm) -> tuple[int, int]:
    """Composites whose contrast (after ``norm`` per box) ranks A above B: both boxes win together (raw and
    scaled: ``boxes.pair_contrast``; this is for the z-scored variant only)."""
    by = {}
    for r in rows:
        by.setdefault(tuple(r["pair"]), {})[r["own"]] = r
    wins = n = 0
    for (a, b), pair in by.items():
        if a in pair and b in pair:
            ta, tb = (norm(artifacts.load_npy(folder / pair[i]["scores_file"])) for i in (a, b))
            wins += bool((ta[a] - tb[a]) > (ta[b] - tb[b]))
            n += 1
    return wins, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--folder", default="runs/box_heldout")
    ap.add_argument("--benchmark", default="", help="a benchmark results folder to score instead (no runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.benchmark:
        files = sorted(Path(args.benchmark).glob("abu-*.json"))
        folder, rows = Path(args.benchmark), [r for f in files for r in artifacts.load_json(f)["boxes"].values()
                                              if r["layout"] == "halves"]
    else:
        exp = Explorer.load("precomputed")
        pairs = boxes.choose_pairs(exp, BENCHMARK_PAIRS + args.pairs)[BENCHMARK_PAIRS:]
        folder = Path(args.folder)
        rows = boxes.run_method(exp, "abu", pairs, ["halves"], "exact", folder)
    plain = sum(r["own_wins"] for r in rows)
    print(f"plain boxes: {plain}/{len(rows)}")
    for name in ("raw contrast", "scaled contrast", "z-scored contrast"):
        if name == "z-scored contrast":
            w, n = contrast_wins(rows, folder, zscored)
        else:
            derived = boxes.pair_contrast(rows, folder, "halves", scaled=name == "scaled contrast")
            w, n = sum(d["own_wins"] for d in derived), len(derived)
        lo, hi = clopper_pearson(w, n)
        print(f"{name}: {w}/{n} composites (both boxes win together), 95% CI [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main()
