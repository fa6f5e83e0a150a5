"""Benchmarks, one CLI group: ``python -m abu_explorer bench NAME``. Each prints its figures (and the
machine it ran on) and can save them as JSON; the docs quote them beside the command.

- ``model``: the embedded model's quality (CLIP caption retrieval) and speed (sampling, loss scan, training);
- ``abu``: AbU's alpha sweep, self-rank, fast vs exact;
- ``methods``: every registered method's precompute time, storage and per-query latency.
"""
from __future__ import annotations

from abu_explorer.cli_options import add_precomputed


def add_commands(sub, default_model: str) -> None:
    b = sub.add_parser("bench", help="measure and print: bench model | abu | methods")
    group = b.add_subparsers(dest="bench", required=True)

    m = group.add_parser("model", help="the embedded model's quality and speed")
    add_precomputed(m, default_model)
    m.add_argument("--num-captions", type=int, default=200)
    m.add_argument("--snapshots", default="", help="folder of UNet snapshots for the quality-vs-time curve")
    m.add_argument("--skip-quality", action="store_true")
    m.add_argument("--compare", nargs="*", default=[], help="other model folders, measured beside --precomputed in one run")
    m.add_argument("--grids", default="", help="with --compare: write each model's sample grid here")
    m.add_argument("--rounds", type=int, default=2, help="with --compare: interleaved speed rounds (0: quality only)")
    m.add_argument("--curves", nargs="*", default=[], metavar="MODEL[=SNAPSHOTS]",
                   help="quality against training time of each model's UNet snapshots (see bench/curves.py)")
    m.add_argument("--plot", default="", help="with --curves: draw them here")
    m.add_argument("--json", default="", help="also write the figures here")
    m.set_defaults(func=lambda args: _run("model", args))

    a = group.add_parser("abu", help="AbU: alpha sweep, self-rank, fast vs exact")
    add_precomputed(a, default_model)
    a.add_argument("--alphas", type=float, nargs="*", default=[])
    a.add_argument("--self-queries", type=int, default=30)
    a.add_argument("--fast-exact-queries", type=int, default=20)
    a.add_argument("--fast-exact-start", type=int, default=0, help="index of the first generated query")
    a.add_argument("--json", default="")
    a.set_defaults(func=lambda args: _run("abu", args))

    t = group.add_parser("methods", help="every method's cost: precompute, storage, latency")
    add_precomputed(t, default_model)
    t.add_argument("--methods", nargs="*", default=[])
    t.add_argument("--queries", type=int, default=5)
    t.add_argument("--exact", action="store_true", help="also one query in each exact mode")
    t.add_argument("--precompute", action="store_true", help="also rebuild and time each method's tables")
    t.add_argument("--json", default="")
    t.set_defaults(func=lambda args: _run("methods", args))


def _run(name: str, args) -> int:
    from importlib import import_module

    import_module(f"abu_explorer.bench.{name}").main(args)
    return 0
