"""How alike are the methods' rankings on the LDS test split, where does each put the query's source image, and
how do two methods compare query by query on the LDS and on the LDS within the source image's strata?

Reads the score matrices the LDS table was made from (each method's shipped settings, exact mode where it has
one; nothing is scored here: a missing matrix is named with the command that makes it) and prints the mean over
queries of the Spearman correlation between every two methods' scores of all N rows, and each method's
median rank of the source row (the training row whose caption generated the query). Then, from the table's
``assets/lds_summary.json``, each pair of ``--pairs`` on both figures: the mean per-query difference with its 95%
bootstrap interval and a two-sided sign test, as the table's "minus AbU" column.

    PYTHONPATH=. python scripts/lds_score_agreement.py [--methods abu,abuplus,if,dtrak,trak,pixel]
        [--pairs abuplus:abu,abuplus:dtrak,dtrak:abu,abu:pixel]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.attribution import spec
from abu_explorer.evaluation import lds, lds_table, stats
from abu_explorer.evaluation.lds_tuning import compare
from abu_explorer.model.embedded import Explorer
from abu_explorer.training import train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="abu,abuplus,if,dtrak,trak,pixel")
    ap.add_argument("--precomputed", default="precomputed")
    ap.add_argument("--queries", default="evaluation/lds_queries.json")
    ap.add_argument("--results", default="results/lds")
    ap.add_argument("--kind", default="x86_64-amd-avx2-torch2.14.1+cu130", help="the machine kind of the table")
    ap.add_argument("--pairs", default="abuplus:abu,abuplus:dtrak,dtrak:abu,abu:pixel")
    ap.add_argument("--summary", default="assets/lds_summary.json")
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
    for name in names:
        c = lds_table.caption_row(scores[name], test)
        print(f"{name}: source image's median rank {c['median_rank']:g}, in the top 10 for {c['in_top10']} of "
              f"{c['queries']} queries")
    summary = artifacts.load_json(Path(args.summary))["methods"]
    print(f"paired by query ({args.summary}): mean difference [95% bootstrap], better / worse, two-sided sign test")
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        for key, what in (("per_query", "LDS"), ("within_per_query", "within the source's strata")):
            c = compare(np.array(summary[a][key]), np.array(summary[b][key]))
            print(f"  {a} - {b}, {what}: {c['diff']:+.3f} [{c['diff_ci95'][0]:+.3f}, {c['diff_ci95'][1]:+.3f}], "
                  f"{c['wins']} / {c['losses']}, {stats.p_text(c['sign_p'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
