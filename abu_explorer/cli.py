"""Command line: ``python -m abu_explorer {train,generate,benchmark,dataset}``.

Errors a user can cause (bad prompt, bad numbers, missing artifacts) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "precomputed"


def _cmd_train(args) -> int:
    from . import build

    build.build(Path(args.out), Path(args.run_dir), only=args.only, progress=not args.quiet,
                data_folder=Path(args.data) if args.data else None)
    return 0


def _cmd_generate(args) -> int:
    from .pipeline import Explorer

    exp = Explorer.load(args.model)
    t0 = time.perf_counter()
    result = exp.generate(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)
    seconds = time.perf_counter() - t0
    img = result.image
    if args.size and args.size != img.width:
        from PIL import Image

        img = img.resize((args.size, args.size), Image.Resampling.NEAREST)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    unknown = exp.tokenizer.unknown_words(args.prompt)
    if unknown:
        print(f"note: words the model does not know (read as <unk>): {', '.join(unknown)}")
    print(f"wrote {out} ({img.width}x{img.height}) in {seconds:.2f} s")
    return 0


def _cmd_benchmark(args) -> int:
    from . import benchmark

    benchmark.main(args)
    return 0


def _cmd_counterfactual(args) -> int:
    from . import counterfactual
    from .attribution import get_method, query as q
    from .pipeline import Explorer

    if args.method != "random":
        get_method(args.method)
    exp = Explorer.load(args.model)
    box = tuple(args.box) if args.box else None
    query = q.from_generation(exp, args.prompt, args.seed, args.steps, args.guidance, box)
    result = counterfactual.run(exp, query, args.method, args.k, Path(args.results), draw=args.draw)
    print(counterfactual.show(result))
    print(f"result: {Path(args.results) / result['key'] / 'result.json'}")
    return 0


def _cmd_benchmark_abu(args) -> int:
    from .attribution import evaluate

    evaluate.main(args)
    return 0


def _cmd_benchmark_methods(args) -> int:
    from .attribution import benchmark_methods

    benchmark_methods.main(args)
    return 0


def _cmd_examples(args) -> int:
    from . import examples
    from .pipeline import Explorer
    from .ui import ExplorerApp

    app = ExplorerApp(Explorer.load(args.model), Path(args.results))
    out = examples.build(app, Path(args.queries), progress=not args.quiet)
    print(f"wrote {out / 'examples.json'}")
    return 0


def _cmd_evaluate(args) -> int:
    from . import counterfactual_eval

    return counterfactual_eval.main(args)


def _cmd_offload(args) -> int:
    import dataclasses

    if args.step == "retrain":  # needs torch + diffusers only: no Explorer here
        from . import offload_retrain

        n = offload_retrain.retrain(Path(args.bundle), Path(args.lines), args.device, args.workers, args.threads,
                                    args.deadline_min * 60 if args.deadline_min else None, stack=args.stack)
        print(f"{n} cells retrained -> {args.lines}")
        return 0
    from . import counterfactual_eval, offload, train
    from .pipeline import Explorer

    exp = Explorer.load(args.model)
    if args.step == "export":
        recipe = train.UNET_RECIPE
        if args.epochs:
            recipe = dataclasses.replace(recipe, epochs=args.epochs)
        doc = offload.export(exp, counterfactual_eval.load_queries(Path(args.queries)),
                             [m.strip() for m in args.methods.split(",") if m.strip()],
                             [int(k) for k in args.k.split(",")], args.draws, Path(args.bundle), recipe,
                             full=not args.no_full)
        print(f"{len(doc['cells'])} cells -> {args.bundle}/plan.json")
        return 0
    rep = offload.import_results(exp, Path(args.bundle), Path(args.lines), Path(args.results),
                                 Path(args.report) if args.report else None)
    print(json.dumps({k: v for k, v in rep.items() if k != "skipped_existing"}, indent=1))
    return 0


def _cmd_dataset(args) -> int:
    from . import contact_sheet, data

    ds = data.build_openmoji(data.DataConfig())
    print(f"{len(ds)} images, content hash {ds.content_hash}, cached at {data._cache_path(ds.config)}")
    if args.sheet:
        contact_sheet.dataset_sheet(ds, Path(args.sheet))
        print(f"wrote {args.sheet}")
    return 0


def _cmd_precompute(args) -> int:
    from .attribution import abu_precompute, distributed
    from .pipeline import Explorer

    distributed.init_from_env()
    exp = Explorer.load(args.model)
    t0 = time.perf_counter()
    if args.method == "if":
        from .attribution import influence

        cfg = influence.IFConfig(selection=args.selection, num_timesteps=args.timesteps, damping=args.damping)
        folder = influence.precompute(exp, cfg, args.out or None, progress=not args.quiet)
    elif args.method == "dtrak":
        from .attribution import dtrak

        cfg = dtrak.DTrakConfig(selection=args.selection, num_timesteps=args.timesteps)
        folder = dtrak.precompute(exp, cfg, args.out or None, progress=not args.quiet)
    else:
        cfg = abu_precompute.AbUConfig(selection=args.selection, fisher_passes=args.fisher_passes,
                                       num_timesteps=args.timesteps)
        folder = abu_precompute.precompute(exp, cfg, args.out or None, progress=not args.quiet)
    if distributed.rank_world()[0] == 0:
        print(f"{args.method} tables in {folder} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_attribute(args) -> int:
    from .attribution import get_method, query as q
    from .pipeline import Explorer

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.mode not in ("fast", "exact"):
        raise ValueError(f"--mode must be fast or exact, got {args.mode!r}")
    method_cls = get_method(args.method)
    from .attribution import distributed

    distributed.init_from_env()  # under torchrun the exact scan is sharded; rank 0 prints and writes
    exp = Explorer.load(args.model)
    n = len(exp.dataset)
    if args.k > n:
        raise ValueError(f"--k {args.k} exceeds the training set ({n} images)")
    box = tuple(args.box) if args.box else None
    if args.train_index is not None:
        query = q.from_training_image(exp, args.train_index, box)
    elif args.image:
        if not args.caption:
            raise ValueError("--image needs --caption")
        query = q.from_image(exp, args.image, args.caption, box)
    else:
        if args.prompt is None:
            raise ValueError("give --prompt (with --seed), --image with --caption, or --train-index")
        query = q.from_generation(exp, args.prompt, args.seed, args.steps, args.guidance, box)
    if args.method == "if":
        overrides = {k: v for k, v in (("damping", args.damping), ("screen_candidates", args.candidates))
                     if v is not None}
        if any(v is not None for v in (args.alpha, args.unlearn_steps, args.unlearn_samples)):
            raise ValueError("--alpha, --unlearn-steps and --unlearn-samples only apply to --method abu")
    else:
        overrides = {k: v for k, v in (("alpha", args.alpha), ("unlearn_steps", args.unlearn_steps),
                                       ("unlearn_samples", args.unlearn_samples), ("fisher_damping", args.damping),
                                       ("screen_candidates", args.candidates)) if v is not None}
        if overrides and args.method != "abu":
            raise ValueError(f"{', '.join(overrides)} only apply to --method abu (and --damping, --candidates to if)")
    if args.clip_model:
        if args.method != "clip":
            raise ValueError("--clip-model applies to --method clip")
        overrides = {"model_name": args.clip_model, "pretrained": args.clip_pretrained or None}
    method = method_cls.load(exp, **overrides)
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"{args.method} scan", disable=args.method not in ("abu", "if") or distributed.rank_world()[0] != 0)
    ranking = method.score(query, mode=args.mode,
                           progress=lambda i, total: (setattr(bar, "total", total), bar.update(i - bar.n)))
    bar.close()
    result = ranking.to_json(query.describe(), exp.dataset.captions, args.k)
    if distributed.rank_world()[0] != 0:
        return 0
    print(f"{args.method} ({ranking.mode}) on {n} training images in {ranking.seconds:.2f} s "
          + " ".join(f"[{p} {s:.2f} s]" for p, s in ranking.phases.items()))
    print(f"{'rank':>4}  {'index':>5}  {'score':>11}  caption")
    for r in result["results"]:
        print(f"{r['rank']:>4}  {r['index']:>5}  {r['score']:>11.4e}  {r['caption']}")
    if args.json:
        from .artifacts import save_json

        save_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m abu_explorer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="reproduce the embedded model's weights from scratch")
    t.add_argument("--only", choices=["autoencoder", "clip", "unet"], help="one stage (the others must exist)")
    t.add_argument("--out", default=str(DEFAULT_DIR))
    t.add_argument("--run-dir", default="runs", help="resumable checkpoints")
    t.add_argument("--data", default="", help="your own folder of NAME.png + NAME.txt (caption) instead of OpenMoji")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate one image from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--size", type=int, default=0, help="upscale (nearest) to this many pixels for display")
    g.add_argument("--out", required=True)
    g.add_argument("--model", default=str(DEFAULT_DIR), help="precomputed folder")
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("benchmark", help="measure quality and speed; prints the README tables")
    b.add_argument("--model", default=str(DEFAULT_DIR))
    b.add_argument("--num-captions", type=int, default=200)
    b.add_argument("--snapshots", default="", help="folder of UNet snapshots for the quality-vs-time curve")
    b.add_argument("--skip-quality", action="store_true")
    b.add_argument("--json", default="", help="also write the figures here")
    b.set_defaults(func=_cmd_benchmark)

    ba = sub.add_parser("benchmark-abu", help="AbU: alpha sweep, self-rank, fast vs exact; prints README figures")
    ba.add_argument("--model", default=str(DEFAULT_DIR))
    ba.add_argument("--alphas", type=float, nargs="*", default=[])
    ba.add_argument("--self-queries", type=int, default=30)
    ba.add_argument("--fast-exact-queries", type=int, default=20)
    ba.add_argument("--fast-exact-start", type=int, default=0, help="index of the first generated query")
    ba.add_argument("--json", default="")
    ba.set_defaults(func=_cmd_benchmark_abu)

    bm = sub.add_parser("benchmark-methods", help="cost of every attribution method: precompute, storage, latency")
    bm.add_argument("--model", default=str(DEFAULT_DIR))
    bm.add_argument("--methods", nargs="*", default=[])
    bm.add_argument("--queries", type=int, default=5)
    bm.add_argument("--exact", action="store_true", help="also one query in each exact mode")
    bm.add_argument("--precompute", action="store_true", help="also rebuild and time each method's tables")
    bm.add_argument("--json", default="")
    bm.set_defaults(func=_cmd_benchmark_methods)

    pc = sub.add_parser("precompute", help="build a method's tables: AbU (Fisher, losses), D-TRAK or IF features (torchrun-able)")
    pc.add_argument("--model", default=str(DEFAULT_DIR))
    pc.add_argument("--method", default="abu", choices=["abu", "dtrak", "if"])
    pc.add_argument("--out", default="", help="default: MODEL/<method>")
    pc.add_argument("--selection", default="cross-attn", choices=["cross-attn", "attn", "all"])
    pc.add_argument("--fisher-passes", type=int, default=5)
    pc.add_argument("--timesteps", type=int, default=10)
    pc.add_argument("--damping", type=float, default=None, help="if: EK-FAC damping (default 0.1 x mean eigenvalue)")
    pc.add_argument("--quiet", action="store_true")
    pc.set_defaults(func=_cmd_precompute)

    a = sub.add_parser("attribute", help="rank training images by influence on a query")
    a.add_argument("--prompt")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps", type=int, default=50)
    a.add_argument("--guidance", type=float, default=None)
    a.add_argument("--image", help="an uploaded image instead of a generated one (needs --caption)")
    a.add_argument("--caption")
    a.add_argument("--train-index", type=int, help="a training image as the query (sanity check)")
    a.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="local attribution box (pixels)")
    a.add_argument("--method", default="abu")
    a.add_argument("--mode", default="fast")
    a.add_argument("--k", type=int, default=20)
    a.add_argument("--alpha", type=float, help="AbU step size (default: the tuned value in the tables' config)")
    a.add_argument("--unlearn-steps", type=int, help="AbU Newton steps (default 1)")
    a.add_argument("--unlearn-samples", type=int, help="(noise, timestep) draws per step (default 512)")
    a.add_argument("--damping", type=float, help="abu: added to the Fisher before inverting (default 0: the paper); "
                   "if: EK-FAC damping (default 0.1 x mean eigenvalue)")
    a.add_argument("--candidates", type=int, help="fast mode: rows rescored exactly (default 200)")
    a.add_argument("--clip-model", default="", help="clip: any open_clip model name instead of the project's CLIP")
    a.add_argument("--clip-pretrained", default="", help="clip: its pretrained tag (open_clip download) or a "
                   "local .safetensors checkpoint")
    a.add_argument("--json", default="")
    a.add_argument("--model", default=str(DEFAULT_DIR))
    a.set_defaults(func=_cmd_attribute)

    c = sub.add_parser("counterfactual", help="remove a method's top-K, retrain the UNet, regenerate, measure")
    c.add_argument("--prompt", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--guidance", type=float, default=None)
    c.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    c.add_argument("--method", default="abu")
    c.add_argument("--k", type=int, default=17)
    c.add_argument("--draw", type=int, default=0, help="which random draw (method random)")
    c.add_argument("--results", default="results/counterfactual")
    c.add_argument("--model", default=str(DEFAULT_DIR))
    c.set_defaults(func=_cmd_counterfactual)

    e = sub.add_parser("evaluate", help="the counterfactual table: many leave-K-out retrains (resumable)")
    e.add_argument("what", choices=["counterfactual"])
    e.add_argument("--queries", required=True, help='JSON list of {"prompt", "seed"[, "steps", "guidance", "box"]}')
    e.add_argument("--methods", default="abu,dtrak,if,clip,pixel,random")
    e.add_argument("--k", default="17", help="comma-separated K values")
    e.add_argument("--draws", type=int, default=2, help="random draws per query")
    e.add_argument("--max-cells", type=int, default=None, help="stop after this many new retrains")
    e.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    e.add_argument("--results", default="results/counterfactual")
    e.add_argument("--assets", default="assets", help="where the table, plot and strips go ('' for none)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--model", default=str(DEFAULT_DIR))
    e.set_defaults(func=_cmd_evaluate)

    o = sub.add_parser("offload", help="leave-K-out retrains on another machine: export here, retrain there "
                       "(e.g. --device cuda), import here")
    o.add_argument("step", choices=["export", "retrain", "import"])
    o.add_argument("--bundle", default="runs/offload", help="folder of plan.json + bundle.safetensors")
    o.add_argument("--lines", default="runs/offload/cells.jsonl", help="the retrains' JSON lines")
    o.add_argument("--queries", default="evaluation/counterfactual_queries.json")
    o.add_argument("--methods", default="abu,dtrak,if,clip,pixel,random")
    o.add_argument("--k", default="17", help="comma-separated K values; the first runs first")
    o.add_argument("--draws", type=int, default=2, help="random draws per query and K")
    o.add_argument("--no-full", action="store_true", help="export: skip the K = 0 retrain (the floor)")
    o.add_argument("--epochs", type=int, default=0, help="export: override the recipe's epochs (smoke tests; "
                   "such results get other keys)")
    o.add_argument("--device", default="cpu")
    o.add_argument("--workers", type=int, default=1, help="retrain: parallel processes")
    o.add_argument("--threads", type=int, default=1, help="retrain: torch threads per process")
    o.add_argument("--stack", type=int, default=1, help="retrain: train up to this many cells of equal K in "
                   "lockstep in one process (one batched model; for a GPU)")
    o.add_argument("--deadline-min", type=float, default=0, help="retrain: stop after this many minutes")
    o.add_argument("--results", default="results/counterfactual")
    o.add_argument("--report", default="", help="import: save the import report (JSON) here")
    o.add_argument("--model", default=str(DEFAULT_DIR))
    o.set_defaults(func=_cmd_offload)

    x = sub.add_parser("examples", help="precompute the app's curated examples (every method's ranking)")
    x.add_argument("--queries", default="evaluation/counterfactual_queries.json")
    x.add_argument("--results", default="results/counterfactual")
    x.add_argument("--quiet", action="store_true")
    x.add_argument("--model", default=str(DEFAULT_DIR))
    x.set_defaults(func=_cmd_examples)

    d = sub.add_parser("dataset", help="render the OpenMoji set into the cache; optionally a contact sheet")
    d.add_argument("--sheet", default="")
    d.set_defaults(func=_cmd_dataset)
    return p


def main(argv: list[str] | None = None) -> int:
    from .artifacts import ArtifactError
    from .tokenizer import PromptError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (PromptError, ArtifactError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
