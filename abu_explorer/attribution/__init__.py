"""Attribution methods behind one interface: ``method.score(query) -> Ranking``.

``METHODS`` is the one registry that the CLI, the benchmarks and the app iterate over.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Ranking:
    """Scores for every training row (higher = more influential) and the order they give."""

    method: str
    scores: torch.Tensor  # (N,) float
    seconds: float
    mode: str = ""
    phases: dict = field(default_factory=dict)  # seconds per phase, e.g. unlearn / screen / rescore
    exact_rows: torch.Tensor | None = None  # rows whose score is exact (fast mode); None = all
    notes: str = ""

    @property
    def order(self) -> torch.Tensor:
        # stable descending sort: ties keep the lower index first, so rankings are deterministic
        return torch.sort(-self.scores, stable=True).indices

    def top(self, k: int) -> list[tuple[int, float]]:
        n = len(self.scores)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] (the training set has {n} images), got {k}")
        return [(int(i), float(self.scores[i])) for i in self.order[:k]]

    def to_json(self, query: dict, captions: list[str], k: int) -> dict:
        exact = None if self.exact_rows is None else set(self.exact_rows.tolist())
        return {"query": query, "method": self.method, "mode": self.mode, "num_train": len(self.scores),
                "seconds": round(self.seconds, 4), "phases": {p: round(s, 4) for p, s in self.phases.items()},
                "notes": self.notes,
                "results": [{"rank": r + 1, "index": i, "caption": captions[i], "score": s,
                             "exact": exact is None or i in exact}
                            for r, (i, s) in enumerate(self.top(k))]}


METHODS: dict[str, type] = {}
# Load-time options of the serving configuration (the app, the benchmark that describes it, the removal
# rankers): AbU's loss batch of 64 keeps the app's peak memory near 1.2 GB at the same speed as 256.
SERVING_OPTIONS: dict[str, dict] = {"abu": {"batch_size": 64}}


def register(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def get_method(name: str) -> type:
    from . import abu, dtrak, influence, nearest, random_baseline  # noqa: F401  (each registers its methods)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
