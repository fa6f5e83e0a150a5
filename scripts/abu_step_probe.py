"""Exploratory: the size and direction of the unlearning step of AbU (undamped diagonal Fisher), of AbU with a
damped diagonal Fisher (0.1 x its mean, the analogue of AbU+'s damping), and of AbU+ (EK-FAC), on the first 3
tuning queries: each step's norm and the cosine between every two. No training row is scored.

    PYTHONPATH=. python scripts/abu_step_probe.py     # about 1 min at one thread
"""
import json

import torch

from abu_explorer.model.embedded import Explorer
from abu_explorer.attribution import query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.attribution.abu_plus import AbUPlus
torch.set_num_threads(1)
exp = Explorer.load("precomputed")
tune = json.load(open("evaluation/lds_queries.json"))["tune"][:3]
abu = AbU.load(exp)
lam = 0.1 * abu.tables.fisher.double().mean().item()
damped = AbU.load(exp, fisher_damping=lam)
plus = AbUPlus.load(exp)
print(f"damping {lam:.3g}")
for d in tune:
    query = q.from_generation(exp, d["prompt"], int(d["seed"]), int(d.get("steps", 50)))
    a, b, c = abu.unlearn(query), damped.unlearn(query), plus.unlearn(query)

    def cos(x, y):
        return float(torch.dot(x, y) / (x.norm() * y.norm()))

    print(d["prompt"], "norms abu %.3g damped %.3g abu+ %.3g" % (a.norm(), b.norm(), c.norm()),
          "cos(abu,abu+) %.3f cos(damped,abu+) %.3f cos(abu,damped) %.3f" % (cos(a, c), cos(b, c), cos(a, b)))
