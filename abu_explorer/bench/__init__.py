"""Benchmarks, one CLI group: ``python -m abu_explorer bench NAME``. Each prints its figures (and the
machine it ran on) and can save them as JSON; the docs quote them beside the command.

- ``model``: the embedded model's quality (CLIP caption retrieval) and speed (sampling, loss scan, training);
- ``abu``: AbU's alpha sweep, self-rank, fast vs exact;
- ``methods``: every registered method's precompute time, storage and per-query latency;
- ``load``: the web app under load (browsers, API clients, a real retrain, the admission caps);
- ``scale``: table sizes and precompute cost over N, projected to MSCOCO / LAION scale.
"""
from __future__ import annotations

from abu_explorer.cli_options import add_precomputed


def add_commands(sub, default_model: str) -> None:
    b = sub.add_parser("bench", help="measure and print: bench model | abu | methods | load | scale | isa")
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

    a = group.add_parser("abu", help="AbU (or AbU+): alpha sweep, self-rank, fast vs exact")
    add_precomputed(a, default_model)
    a.add_argument("--method", default="abu", choices=["abu", "abuplus"])
    a.add_argument("--alphas", type=float, nargs="*", default=[])
    a.add_argument("--self-queries", type=int, default=30)
    a.add_argument("--fast-exact-queries", type=int, default=20)
    a.add_argument("--fast-exact-start", type=int, default=0, help="index of the first generated query")
    a.add_argument("--json", default="")
    a.set_defaults(func=lambda args: _run("abu", args))

    ld = group.add_parser("load", help="the web app under load: browsers + API clients, a real retrain, the caps")
    add_precomputed(ld, default_model)
    ld.add_argument("--browsers", type=int, default=8, help="headless Chromium clients (0: none)")
    ld.add_argument("--api-clients", type=int, default=32, help="gradio_client clients")
    ld.add_argument("--seconds", type=int, default=300, help="length of the mixed-load phase")
    ld.add_argument("--grace", type=int, default=300, help="seconds the clients may take to finish after it")
    ld.add_argument("--probe", type=int, default=12, help="AbU fast attributions per probe (idle, retrain running)")
    ld.add_argument("--methods", default="abu,clip,pixel", help="methods the clients attribute with")
    ld.add_argument("--target-ratio", type=float, default=2.5, help="AbU p95 with a retrain / idle must stay below")
    ld.add_argument("--json", default="")
    ld.set_defaults(func=lambda args: _run("load", args))

    t = group.add_parser("methods", help="every method's cost: precompute, storage, latency")
    add_precomputed(t, default_model)
    t.add_argument("--methods", nargs="*", default=[])
    t.add_argument("--queries", type=int, default=5)
    t.add_argument("--exact", action="store_true", help="also one query in each exact mode")
    t.add_argument("--precompute", action="store_true", help="also rebuild and time each method's tables")
    t.add_argument("--json", default="")
    t.set_defaults(func=lambda args: _run("methods", args))


    s = group.add_parser("scale", help="table sizes and precompute cost over N; MSCOCO / LAION projections")
    add_precomputed(s, default_model)
    s.add_argument("--rows", type=int, default=256, help="training rows per embedded stage")
    s.add_argument("--curve", type=int, nargs="*", default=[500, 1000, 2000, 4000], help="N of the loss-scan curve")
    s.add_argument("--unet-batch", type=int, default=4, help="items per timed batch of the scale UNets")
    s.add_argument("--gpu-tflops", type=float, default=50.0,
                   help="assumed sustained GPU rate for the FLOP-scaled projection (not measured)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--sizes-only", action="store_true", help="only the table sizes (no timing)")
    s.add_argument("--json", default="")
    s.add_argument("--plot", default="", help="draw the loss-scan curve here")
    s.set_defaults(func=lambda args: _run("scale", args))

    i = group.add_parser("isa", help="does this CPU, pinned to AVX2 (as evaluations run), round like AVX2 hardware?")
    i.add_argument("--write", action="store_true", help="on AVX2 hardware: record its fingerprints as the "
                   "reference; on other hardware: record that this CPU model, pinned, matched it")
    i.add_argument("--force", action="store_true", help="replace a recorded reference that differs")
    i.set_defaults(func=_isa)


def _isa(args) -> int:
    from abu_explorer.evaluation import isa_pin

    isa_pin.report(args)
    return 0


def _run(name: str, args) -> int:
    from importlib import import_module

    import_module(f"abu_explorer.bench.{name}").main(args)
    return 0
