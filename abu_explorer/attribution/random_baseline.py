"""The control every counterfactual table needs: a uniformly random ranking, seeded by the query."""
from __future__ import annotations

import hashlib
import json
import time

import torch

from . import Ranking, register


@register("random")
class RandomRanking:
    def __init__(self, explorer, seed: int = 0):
        self.explorer, self.seed = explorer, seed

    @classmethod
    def load(cls, explorer, **kwargs):
        return cls(explorer, **kwargs)

    def score(self, query, mode: str = "", progress=None) -> Ranking:
        t0 = time.perf_counter()
        key = json.dumps(query.describe(), sort_keys=True) + f"|{self.seed}"
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
        n = len(self.explorer.dataset)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
        return Ranking("random", scores, time.perf_counter() - t0, "random", {}, notes="ignores the image and box")
