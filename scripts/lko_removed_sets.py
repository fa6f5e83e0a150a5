"""Does AbU's tuned default remove the same images? For each leave-K-out query: AbU's exact top K at its current
default against the removed set of its finished cell with the settings the tuning replaced (``abu@before``): the
overlap, and whether each holds the query's source image (the training row whose caption is the prompt). Scores
AbU once per query (exact mode, about a minute each); retrains nothing.

    PYTHONPATH=. python scripts/lko_removed_sets.py [--k 0.84%] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual
from abu_explorer.evaluation import counterfactual_table as ce
from abu_explorer.model.embedded import Explorer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", default="evaluation/counterfactual_queries.json")
    ap.add_argument("--k", default="0.84%")
    ap.add_argument("--results", default="results/counterfactual")
    ap.add_argument("--precomputed", default="precomputed")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = Explorer.load(args.precomputed)
    queries = ce.load_queries(Path(args.queries))
    captions = exp.dataset.captions
    print("| query | K | alpha now: source removed | before: source removed | rows in both | before's cell |")
    print("|---|---|---|---|---|---|")
    for k in ce.parse_ks(args.k, len(exp.dataset)):
        rankers, built, cells, keys = ce.planned(exp, queries, ["abu", "abu@before"], [k], 1)
        for qi, d in enumerate(queries):
            key = next(key for c, key in zip(cells, keys) if c.query == qi and c.method == "abu@before")
            found = counterfactual.find_result(Path(args.results), key)
            if found is None:
                print(f"| {d['prompt']} | {k} | - | no finished cell | - | `{key}` |")
                continue
            before = set(artifacts.load_json(found / "result.json")["removed"])
            now = set(counterfactual.removal(exp, built[qi], "abu", k, ranker=rankers["abu"]))
            src = captions.index(d["prompt"]) if d["prompt"] in captions else None
            has = (lambda rows: "-" if src is None else ("yes" if src in rows else "no"))
            print(f"| {d['prompt']} | {k} | {has(now)} | {has(before)} | {len(now & before)} / {k} | "
                  f"`{found.parent.name}/{key}` |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
