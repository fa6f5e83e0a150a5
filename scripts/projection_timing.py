"""D-TRAK's query time with the projection matrix drawn on every call (ABU_PROJECTION_CACHE_MB=0, as before
the cache) and kept between calls (the default), in one process on the shipped model; rankings compared.

    PYTHONPATH=. python scripts/projection_timing.py [--queries 5] [--threads 2]
"""
import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from abu_explorer.attribution import dtrak, query as q
    from abu_explorer.model.embedded import Explorer

    exp = Explorer.load("precomputed")
    method = dtrak.DTrak.load(exp)
    prompts = ["red apple", "red heart", "banana", "blue car", "green tree", "yellow star", "cat face"]
    queries = [q.from_generation(exp, prompts[i % len(prompts)], seed=i) for i in range(args.queries)]
    out = {}
    for label, budget in (("drawn every call", "0"), ("kept", "1024")):
        os.environ["ABU_PROJECTION_CACHE_MB"] = budget
        method.score(queries[0])  # warm-up (and, when kept, the one draw)
        times, rankings = [], []
        for query in queries:
            t0 = time.perf_counter()
            rankings.append(method.score(query).scores)
            times.append(time.perf_counter() - t0)
        out[label] = rankings
        print(f"{label:>17}: median {statistics.median(times):.3f} s, min {min(times):.3f}, max {max(times):.3f} "
              f"over {len(times)} queries")
    same = all(torch.equal(a, b) for a, b in zip(*out.values()))
    print(f"scores bit-identical: {same}; threads {args.threads}")


if __name__ == "__main__":
    main()
