"""How alike are the methods' rankings on the LDS test split, and where does each put the query's source image?

Reads the score matrices the LDS table was made from (each method's shipped settings, exact mode where it has
one; nothing is scored here: a missing matrix is named with the command that makes it) and prints the mean over
queries of the Spearman correlation between every two methods' scores of all N rows, and each method's
median rank of the source row (the training row whose caption generated the query).

    PYTHONPATH=. python scripts/lds_score_agreement.py [--methods abu,abuplus,if,dtrak,trak,pixel]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.attribution import spec
from abu_explorer.evaluation import lds
from abu_explorer.model.embedded import Explorer
from abu_explorer.training import train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="abu,abuplus,if,dtrak,trak,pixel")
    ap.add_argument("--precomputed", default="precomputed")
    ap.add_argument("--queries", default="evaluation/lds_queries.json")
    ap.add_argument("--results", default="results/lds")
    ap.add_argument("--kind", default="x86_64-amd-avx2-torch2.14.1+cu130", help="the machine kind of the table")
    args = ap.parse_args()
    exp = Explorer.load(args.precomputed)
    doc = artifacts.load_json(Path(args.queries))
    queries = [{**q, "split": name} for name in ("test", "tune") for q in doc[name]]
    folder = lds.results_folder(Path(args.results), lds.protocol(exp, queries, train.UNET_RECIPE), args.kind)
    test = [q for q in queries if q["split"] == "test"]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    scores = {}
    for name in names:
        path, _ = lds.scores_path(folder, name, spec(name).load(exp), test)
        if not path.exists():
            print(f"no scores for {name} at {path}: run python -m abu_explorer evaluate lds --methods {name}",
                  file=sys.stderr)
            return 2
        scores[name] = artifacts.load_npy(path)
    print(f"mean per-query Spearman over all {scores[names[0]].shape[1]} rows, {len(test)} test queries ({folder})")
    print(" " * 9 + "".join(f"{n:>9s}" for n in names))
    for a in names:
        row = [np.mean([lds.spearman(x, y) for x, y in zip(scores[a], scores[b])]) for b in names]
        print(f"{a:>9s}" + "".join(f"{v:9.3f}" for v in row))
    rows = lds.source_rows(test)
    for name in names:
        ranks = [int((s > s[r]).sum()) + 1 for s, r in zip(scores[name], rows)]
        print(f"{name}: source image's median rank {np.median(ranks):g}, in the top 10 for "
              f"{sum(r <= 10 for r in ranks)} of {len(ranks)} queries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
