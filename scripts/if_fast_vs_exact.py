"""IF (EK-FAC) fast mode against exact mode on generated queries: overlap@10, where exact's top-1 lands.

    python scripts/if_fast_vs_exact.py [--queries 4] [--threads 1] [--json assets/benchmarks/if_fast_vs_exact.json]

Queries are the `bench abu` ones: caption (37 + 97 i) mod N with seed 1000 + i.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abu_explorer.artifacts import save_json  # noqa: E402
from abu_explorer.attribution import influence, query as q  # noqa: E402
from abu_explorer.bench.abu import spearman  # noqa: E402
from abu_explorer.model.embedded import Explorer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precomputed", default="precomputed")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = Explorer.load(args.precomputed)
    n, caps = len(exp.dataset), exp.dataset.captions
    method = influence.InfluenceFunctions.load(exp)
    rows = []
    for i in range(args.queries):
        query = q.from_generation(exp, caps[(37 + 97 * i) % n], seed=1000 + i)
        fast, exact = method.score(query, "fast"), method.score(query, "exact")
        rows.append({"prompt": query.prompt, "seed": 1000 + i,
                     "overlap10": len(set(fast.order[:10].tolist()) & set(exact.order[:10].tolist())) / 10,
                     "spearman_all": spearman(fast.scores, exact.scores), "fast_s": fast.seconds,
                     "exact_s": exact.seconds,
                     "rank_of_exact_top1_in_fast": int((fast.order == exact.order[0]).nonzero()[0, 0]) + 1})
        print(rows[-1], flush=True)
    if args.json:
        save_json(Path(args.json), {"threads": torch.get_num_threads(), "queries": rows})


if __name__ == "__main__":
    main()
