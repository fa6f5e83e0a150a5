"""Exact tests and intervals for counts and means, shared by the evaluations and the benchmarks (no scipy)."""
from __future__ import annotations

import math
import statistics


def p_text(p: float) -> str:
    """A p-value as a reader wants it: 'p < 0.001' rather than 'p = 0.000'."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def mcnemar_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs under H0 are Binomial(wins + losses, 1/2)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def clopper_pearson(wins: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a share, by bisection on the binomial tail."""
    alpha = (1 - level) / 2

    def tail_ge(p, k):  # P(X >= k), X ~ Bin(n, p)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

    def solve(f, target):  # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if wins == 0 else solve(lambda p: tail_ge(p, wins), alpha)
    upper = 1.0 if wins == n else solve(lambda p: tail_ge(p, wins + 1), 1 - alpha)  # P(X <= wins) = alpha
    return lower, upper


def mean_se(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return statistics.mean(xs), se


def sign_test_p(wins: int, n: int) -> float:
    """One-sided exact sign test: P(at least ``wins`` of ``n`` queries above random | no effect)."""
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n if n else math.nan


def bootstrap_ci(xs, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over ``xs`` (seeded: the same data give the same interval)."""
    import numpy as np

    x = np.asarray(xs, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    means = np.random.default_rng(seed).choice(x, size=(resamples, len(x)), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(xs, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``xs`` and its bootstrap interval."""
    import numpy as np

    return (float(np.mean(np.asarray(xs, dtype=np.float64))), *bootstrap_ci(xs, level))


def recall_at_k(scores, positives, k: int = 10) -> float:
    """Share of the positive rows among the ``k`` highest scores (ties broken by row order, as ``argsort``
    with a stable sort of the negated scores)."""
    import numpy as np

    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    pos = set(int(p) for p in positives)
    return len(pos & set(int(i) for i in top)) / len(pos)


def average_precision(scores, positives) -> float:
    """Average precision of the positive rows over the full ranking: the mean, over positives, of the precision
    at that positive's rank (stable ranking, as ``recall_at_k``)."""
    import numpy as np

    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    is_pos = np.isin(order, np.asarray(list(positives), dtype=np.int64))
    hits = np.cumsum(is_pos)
    ranks = np.nonzero(is_pos)[0] + 1
    return float(np.mean(hits[ranks - 1] / ranks))
