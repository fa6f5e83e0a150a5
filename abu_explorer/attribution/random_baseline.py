"""The control every counterfactual table needs: a uniformly random ranking, seeded by the query."""
from __future__ import annotations

import hashlib
import json
import time

import torch

from abu_explorer.attribution import Ranking


def query_seed(query, salt: str) -> int:
    """A seed that depends on the query (prompt, source, box) and ``salt`` alone."""
    key = json.dumps(query.describe(), sort_keys=True) + f"|{salt}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


class RandomRanking:
    name = "random"

    def __init__(self, explorer, seed: int = 0):
        self.explorer, self.seed = explorer, seed

    @classmethod
    def load(cls, explorer, **kwargs):
        return cls(explorer, **kwargs)

    def settings(self) -> dict:
        return {"config": {"seed": self.seed}, "tables": ""}

    def score(self, query, mode: str = "", progress=None) -> Ranking:
        t0 = time.perf_counter()
        n = len(self.explorer.dataset)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(query_seed(query, str(self.seed))))
        return Ranking("random", scores, time.perf_counter() - t0, "random", {}, notes="ignores the image and box")
