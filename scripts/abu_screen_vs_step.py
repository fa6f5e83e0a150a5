"""Exploratory: why fast mode's order below its rescored rows follows exact less at alpha 0.003 than at 0.01.

One unlearning step is linear in alpha (dtheta = alpha/N F^-1 g), so the value-shift screen, a sum of squares of
dW_v c, only scales by alpha^2: its order is the same at every alpha. Each row's exact loss change is not: it is
tau(s) = s a + s^2 b + ... for the step s dtheta. Scanning every row at +dtheta and -dtheta splits it into the
first-order part a = (tau(+) - tau(-)) / 2 and the even part b = (tau(+) + tau(-)) / 2 (max over flips taken
per scan, as AbU scores). The script prints, on 3 of the benchmark's generated queries, Spearman of the screen
with each part and with exact tau at alpha 0.001 / 0.003 / 0.01, and the share of |tau| the first-order part
holds. (4 scans of 2,015 rows per query: about 7 min per query at one thread, here beside two retrains.)

    PYTHONPATH=. python scripts/abu_screen_vs_step.py [--queries 3] [--json out.json]
"""
import argparse
import json

import torch

from abu_explorer.attribution import query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.bench.abu import spearman
from abu_explorer.model.embedded import Explorer

ap = argparse.ArgumentParser()
ap.add_argument("--queries", type=int, default=3)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--json", default="")
args = ap.parse_args()
torch.set_num_threads(args.threads)
exp = Explorer.load("precomputed")
abu = AbU.load(exp, alpha=0.003)
caps = exp.dataset.captions
n = len(exp.dataset)
rows = torch.arange(abu.cache.num_images)
out = []
for i in range(args.queries):  # the benchmark's generated queries: caption (37 + 97 i) mod N, seed 1000 + i
    query = q.from_generation(exp, caps[(37 + 97 * i) % n], seed=1000 + i)
    delta = abu.unlearn(query)  # alpha = 0.003
    screen = abu.screen(delta)
    tau = {s: abu.rescore(s * delta, rows) for s in (1 / 3, 1.0, -1.0, 10 / 3)}  # alpha 0.001, 0.003, -0.003, 0.01
    first, even = (tau[1.0] - tau[-1.0]) / 2, (tau[1.0] + tau[-1.0]) / 2
    r = {"prompt": query.prompt, "seed": 1000 + i,
         "spearman_screen": {"first_order": spearman(screen, first), "even": spearman(screen, even),
                             **{f"exact_alpha_{0.003 * s:.3g}": spearman(screen, tau[s]) for s in (1 / 3, 1.0, 10 / 3)}},
         "spearman_exact_vs_first_order": {f"alpha_{0.003 * s:.3g}": spearman(tau[s], first) for s in (1 / 3, 1.0, 10 / 3)},
         "first_order_share_at_0.003": float(first.abs().mean() / (first.abs().mean() + even.abs().mean()))}
    print(json.dumps(r), flush=True)
    out.append(r)
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
