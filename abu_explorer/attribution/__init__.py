"""Attribution methods behind one interface: ``method.score(query) -> Ranking``.

``registry.METHODS`` is the one list of methods that the CLI, the app, the evaluations and the docs iterate over.
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


from abu_explorer.attribution.registry import (  # noqa: E402
    METHODS,
    MethodSpec,
    get_method,
    names,
    spec,
)

__all__ = ["METHODS", "MethodSpec", "Ranking", "get_method", "names", "spec"]
