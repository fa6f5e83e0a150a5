"""``python -m abu_explorer bench abu``: AbU's figures (docs/methods.md), measured and printed.

1. alpha sweep on a few *tuning* training-image queries (self-rank and the query's own loss rise; fast mode);
   with ``--method abuplus`` the same sweep for AbU+ beside AbU's own rise at its alpha, the calibration
   target of AbU+'s alpha (the same unlearning strength, another direction);
2. self-rank: a training image used as the query should rank itself near the top (held-out rows);
3. fast vs exact on generated queries not used for tuning: overlap@10 and Spearman over the rows the
   fast mode rescored, plus timings and the per-phase breakdown;
4. precompute time (read from the tables' log when present).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.attribution import query as q
from abu_explorer.attribution.abu import AbU

TUNING_ROWS = (101, 601, 1101, 1601)  # alpha is tuned on these only; evaluation rows avoid them


def self_rank(engine: AbU, rows: list[int], mode: str = "fast", rises: list | None = None) -> list[int]:
    """Each row's rank of itself as the query; ``rises`` collects its own loss rise (its score)."""
    ranks = []
    for r in rows:
        ranking = engine.score(q.from_training_image(engine.explorer, r), mode)
        ranks.append(int((ranking.order == r).nonzero()[0, 0]) + 1)
        if rises is not None:
            rises.append(float(ranking.scores[r]))
    return ranks


def alpha_sweep(exp, method: str, alphas: list[float]) -> dict:
    """Self-rank and the mean own loss rise on the tuning rows per alpha (and AbU's rise at its alpha)."""
    from abu_explorer.attribution import spec

    out = {}
    if method != "abu":
        rises: list[float] = []
        self_rank(spec("abu").load(exp), list(TUNING_ROWS), rises=rises)
        out["abu_reference_rise"] = statistics.mean(rises)
        print(f"  AbU at its alpha: mean own loss rise {out['abu_reference_rise']:.4g}", flush=True)
    for alpha in alphas:
        rises = []
        ranks = self_rank(spec(method).load(exp, alpha=alpha), list(TUNING_ROWS), rises=rises)
        out[f"{alpha:g}"] = row = {"ranks": ranks, "mean_own_rise": statistics.mean(rises)}
        print(f"  alpha {alpha:g}: ranks {ranks}, mean own loss rise {row['mean_own_rise']:.4g}", flush=True)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def fast_vs_exact(engine: AbU, queries: list[q.Query], k: int = 10) -> dict:
    rows = []
    for query in queries:
        fast = engine.score(query, "fast")
        screen = engine.last_screen
        exact = engine.score(query, "exact")
        top_f, top_e = set(fast.order[:k].tolist()), set(exact.order[:k].tolist())
        rows.append({"prompt": query.prompt, "seed": query.source.get("seed"),
                     "overlap_at_k": len(top_f & top_e) / k,
                     "spearman_all": spearman(fast.scores, exact.scores),
                     "spearman_screen_vs_exact": spearman(screen, exact.scores),
                     "fast_seconds": fast.seconds, "exact_seconds": exact.seconds,
                     "fast_phases": fast.phases, "exact_phases": exact.phases})
        print(f"  {query.prompt!r:40.40} overlap@{k} {rows[-1]['overlap_at_k']:.2f}  "
              f"spearman {rows[-1]['spearman_all']:.3f}  fast {fast.seconds:.1f}s exact {exact.seconds:.1f}s",
              flush=True)
    return {"per_query": rows,
            "mean_overlap_at_k": statistics.mean(r["overlap_at_k"] for r in rows),
            "mean_spearman_all": statistics.mean(r["spearman_all"] for r in rows),
            "mean_spearman_screen_vs_exact": statistics.mean(r["spearman_screen_vs_exact"] for r in rows),
            "median_fast_seconds": statistics.median(r["fast_seconds"] for r in rows),
            "median_exact_seconds": statistics.median(r["exact_seconds"] for r in rows), "k": k}


def main(args) -> dict:
    from abu_explorer.machine import cpu_name
    from abu_explorer.model.embedded import Explorer

    from abu_explorer.attribution import spec

    exp = Explorer.load(args.precomputed)
    engine = spec(args.method).load(exp)
    n = len(exp.dataset)
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "method": args.method,
              "config": engine.cfg.to_dict()}
    print(f"CPU: {report['cpu']}, torch threads: {report['threads']}, N = {n}")
    if args.alphas:
        print(f"{args.method} alpha sweep (self-rank on tuning rows, fast mode):")
        report["alpha_sweep"] = alpha_sweep(exp, args.method, args.alphas)
    if args.self_queries:
        step = max(1, n // args.self_queries)
        eval_rows = [r for r in range(step // 2, n, step) if r not in TUNING_ROWS][: args.self_queries]
        t0 = time.perf_counter()
        ranks = self_rank(engine, eval_rows)
        report["self_rank"] = {"rows": eval_rows, "ranks": ranks, "top1": sum(r == 1 for r in ranks) / len(ranks),
                               "top10": sum(r <= 10 for r in ranks) / len(ranks), "median": statistics.median(ranks)}
        print(f"self-rank over {len(ranks)} training queries (fast): top-1 {report['self_rank']['top1']:.2f}, "
              f"top-10 {report['self_rank']['top10']:.2f}, median {report['self_rank']['median']} "
              f"({time.perf_counter() - t0:.0f} s)")
    if args.fast_exact_queries:
        caps = exp.dataset.captions
        ids = range(args.fast_exact_start, args.fast_exact_start + args.fast_exact_queries)
        queries = [q.from_generation(exp, caps[(37 + 97 * i) % n], seed=1000 + i) for i in ids]
        print(f"fast vs exact on {len(queries)} generated queries:")
        report["fast_vs_exact"] = fast_vs_exact(engine, queries)
        fe = report["fast_vs_exact"]
        print(f"mean overlap@10 {fe['mean_overlap_at_k']:.3f}, mean Spearman {fe['mean_spearman_all']:.3f}, "
              f"median fast {fe['median_fast_seconds']:.1f} s, median exact {fe['median_exact_seconds']:.1f} s")
    if args.json:
        artifacts.save_json(Path(args.json), report)
    return report
