"""Command line: ``python -m abu_explorer COMMAND``; ``--help`` lists them (``bench`` is the benchmark group).

Errors a user can cause (bad prompt, bad numbers, missing artifacts) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from abu_explorer.cli_options import add_precomputed

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "precomputed"


def _cmd_train(args) -> int:
    from abu_explorer.training import build

    build.build(Path(args.out), Path(args.run_dir), only=args.only, progress=not args.quiet,
                data_folder=Path(args.data) if args.data else None, force=args.force)
    return 0


def _cmd_generate(args) -> int:
    from abu_explorer.model import load

    exp = load(args.precomputed)
    t0 = time.perf_counter()
    result = exp.generate(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)
    seconds = time.perf_counter() - t0
    img = result.image
    if args.size and args.size != img.width:
        from PIL import Image

        img = img.resize((args.size, args.size), Image.Resampling.NEAREST)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    from abu_explorer import artifacts

    artifacts.save_png(out, img)
    unknown = exp.unknown_words(args.prompt)
    if unknown:
        print(f"note: words the model does not know (read as <unk>): {', '.join(unknown)}")
    print(f"wrote {out} ({img.width}x{img.height}) in {seconds:.2f} s")
    return 0


def _cmd_examples(args) -> int:
    from abu_explorer.app import examples
    from abu_explorer.app.service import ExplorerApp
    from abu_explorer.model import load

    app = ExplorerApp(load(args.precomputed), Path(args.results))
    out = examples.build(app, Path(args.queries), progress=not args.quiet, box_pairs=args.box_pairs,
                         customized=args.customized)
    print(f"wrote {out / 'examples.json'}")
    if args.figure:
        from abu_explorer.app.figures import about_figure

        ds = app.explorer.dataset
        about_figure(out, Path(args.figure), [ds.image(i) for i in range(len(ds))])
        print(f"wrote {args.figure}")
    return 0


def _cmd_methods(args) -> int:
    from abu_explorer.attribution import METHODS, registry

    if args.markdown:
        print(registry.markdown_table())
        return 0
    for m in METHODS:
        modes = "/".join(m.modes) or "one mode"
        print(f"{m.name:7} {m.label:20} {modes:11} {m.description}")
    return 0


def _cmd_dataset(args) -> int:
    from abu_explorer import data
    from abu_explorer.data import sheet as contact_sheet

    ds = data.build_openmoji(data.DataConfig())
    print(f"{len(ds)} images, content hash {ds.content_hash}, cached at {data.cache_path(ds.config)}")
    if args.sheet:
        contact_sheet.dataset_sheet(ds, Path(args.sheet))
        print(f"wrote {args.sheet}")
    return 0


def _cmd_precompute(args) -> int:
    """Tables of a precomputed folder's model (``--precomputed DIR``), or a diffusers model's whole folder
    (``--model M --data D --out DIR``: backend.json, then every method's tables)."""
    from abu_explorer.attribution import METHODS, distributed, spec
    from abu_explorer.model import load

    distributed.init_from_env()
    if args.model or args.data or args.out:
        if not (args.model and args.data and args.out):
            raise ValueError("a diffusers model needs all three of --model M --data FOLDER --out DIR; "
                             "the tables of an existing folder: --precomputed DIR")
        exp = _new_pipeline_folder(args)
    else:
        exp = distributed.rank0_first(lambda: load(args.precomputed))
    exp.progress = not args.quiet
    distributed.rank0_first(exp.training_cache)  # built once (memory-mapped where the backend stores it)
    names = [m.name for m in METHODS if m.tables] if args.method == "all" else [spec(args.method).name]
    for name in names:
        t0 = time.perf_counter()
        folder = spec(name).precompute(exp, _tables_config(args, name), None, progress=not args.quiet)
        if distributed.rank_world()[0] == 0:
            print(f"{name} tables in {folder} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _new_pipeline_folder(args):
    from abu_explorer.model.diffusers_backend import (
        BACKEND_FILE,
        PipelineBackend,
        PipelineSpec,
    )

    from abu_explorer.attribution import distributed

    out = Path(args.out)
    exists = (out / BACKEND_FILE).exists()
    distributed.barrier()  # every rank looks before rank 0 writes
    if exists and not args.force:
        raise FileExistsError(f"{out} already holds a model's tables; pass --force to rebuild them")
    spec = PipelineSpec(args.model, unet_config=args.unet_config, unet_weights=args.unet_weights,
                        variant=args.variant or None, clip=args.clip, guidance=args.guidance,
                        custom_diffusion=args.custom_diffusion, lora=args.lora)
    if bool(spec.unet_config) != bool(spec.unet_weights):
        raise ValueError("--unet-config and --unet-weights go together")
    if bool(args.custom_diffusion) and not args.exemplars:
        raise ValueError("--custom-diffusion and --exemplars go together (the fine-tune and the images it learned)")
    if args.exemplars and not (args.custom_diffusion or args.lora):
        raise ValueError("--exemplars are the images of a fine-tune: give it with --custom-diffusion or --lora")
    backend = distributed.rank0_first(lambda: PipelineBackend.load(spec, args.data, out, args.exemplars))
    if distributed.rank_world()[0] != 0:
        return backend
    out.mkdir(parents=True, exist_ok=True)
    backend.save_record()
    print(f"{args.model}: {len(backend.dataset)} images of {args.data} at {backend.image_size} px -> {out}")
    return backend


def _tables_config(args, method: str):
    """The precompute flags as the method's own config dataclass (saved beside its tables)."""
    if method == "if":
        from abu_explorer.attribution.influence import IFConfig

        return IFConfig(selection=args.selection, num_timesteps=args.timesteps, damping=args.damping)
    if method in ("dtrak", "trak"):
        from abu_explorer.attribution.dtrak import DTrakConfig

        return DTrakConfig(selection=args.selection, num_timesteps=args.timesteps, proj_dim=args.proj_dim,
                           output="loss" if method == "trak" else "square")
    from abu_explorer.attribution.abu_precompute import AbUConfig

    return AbUConfig(selection=args.selection, fisher_passes=args.fisher_passes, num_timesteps=args.timesteps)


def _cmd_attribute(args) -> int:
    from abu_explorer.attribution import distributed, spec
    from abu_explorer.model import load

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.mode not in ("fast", "exact"):
        raise ValueError(f"--mode must be fast or exact, got {args.mode!r}")
    method_spec = spec(args.method)
    distributed.init_from_env()  # under torchrun the exact scan is sharded; rank 0 prints and writes
    exp = load(args.precomputed)
    n = len(exp.dataset)
    if args.k > n:
        raise ValueError(f"--k {args.k} exceeds the training set ({n} images)")
    query = _query_from_args(exp, args)
    method = method_spec.load_class().load(exp, **_method_options(args))
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"{args.method} scan", disable=not method_spec.modes or distributed.rank_world()[0] != 0)
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
        from abu_explorer.artifacts import save_json

        save_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def _query_from_args(exp, args):
    from abu_explorer.attribution import query as q

    box = tuple(args.box) if args.box else None
    if args.train_index is not None:
        return q.from_training_image(exp, args.train_index, box)
    if args.image:
        if not args.caption:
            raise ValueError("--image needs --caption")
        return q.from_image(exp, args.image, args.caption, box)
    if args.prompt is None:
        raise ValueError("give --prompt (with --seed), --image with --caption, or --train-index")
    return q.from_generation(exp, args.prompt, args.seed, args.steps, args.guidance, box)


def _method_options(args) -> dict:
    """The per-query settings a method takes from the command line; a flag for another method is an error."""
    if args.method == "if":
        if any(v is not None for v in (args.alpha, args.unlearn_steps, args.unlearn_samples)) or args.box_contrast:
            raise ValueError("--alpha, --unlearn-steps, --unlearn-samples and --box-contrast only apply to --method "
                             "abu or abuplus")
        return {k: v for k, v in (("damping", args.damping), ("screen_candidates", args.candidates)) if v is not None}
    damping = "damping" if args.method == "abuplus" else "fisher_damping"  # AbU+: of the EK-FAC curvature
    options = {k: v for k, v in (("alpha", args.alpha), ("unlearn_steps", args.unlearn_steps),
                                 ("unlearn_samples", args.unlearn_samples), (damping, args.damping),
                                 ("screen_candidates", args.candidates),
                                 ("box_contrast", True if args.box_contrast else None),
                                 ("box_contrast_scaled", True if args.box_contrast == "scaled" else None))
               if v is not None}
    if args.box_contrast and not args.box:
        raise ValueError("--box-contrast needs a --box")
    if args.box_contrast == "scaled" and args.mode != "exact":
        raise ValueError("--box-contrast scaled needs --mode exact (its scale is the median over every row)")
    if options and args.method not in ("abu", "abuplus"):
        raise ValueError(f"{', '.join(options)} only apply to --method abu or abuplus (and --damping, --candidates "
                         "to if)")
    if args.clip_model:
        if args.method != "clip":
            raise ValueError("--clip-model applies to --method clip")
        options = {"model_name": args.clip_model, "pretrained": args.clip_pretrained or None}
    if args.dino_model:
        if args.method != "dino":
            raise ValueError("--dino-model applies to --method dino")
        options = {"model": args.dino_model}
    return options


def parser() -> argparse.ArgumentParser:
    from abu_explorer.bench import add_commands as bench_commands
    from abu_explorer.evaluation.commands import add_commands as evaluation_commands

    p = argparse.ArgumentParser(prog="python -m abu_explorer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _model_commands(sub)
    _attribution_commands(sub)
    evaluation_commands(sub, str(DEFAULT_DIR))
    bench_commands(sub, str(DEFAULT_DIR))
    return p


def _model_commands(sub) -> None:
    t = sub.add_parser("train", help="reproduce the embedded model's weights from scratch")
    t.add_argument("--only", choices=["autoencoder", "clip", "unet"], help="one stage (the others must exist)")
    t.add_argument("--out", required=True, help="the model folder to write (the shipped one is precomputed/)")
    t.add_argument("--force", action="store_true", help="replace what --out already holds")
    t.add_argument("--run-dir", default="runs", help="resumable checkpoints")
    t.add_argument("--data", default="", help="your own images instead of OpenMoji: an imagefolder (metadata.jsonl, one caption per image) or NAME.png + NAME.txt pairs")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate one image from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--size", type=int, default=0, help="upscale (nearest) to this many pixels for display")
    g.add_argument("--out", required=True)
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_precomputed(g, str(DEFAULT_DIR))
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("dataset", help="render the OpenMoji set into the cache; optionally a contact sheet")
    d.add_argument("--sheet", default="")
    d.set_defaults(func=_cmd_dataset)


def _attribution_commands(sub) -> None:
    from abu_explorer.attribution import METHODS

    pc = sub.add_parser("precompute", help="build the methods' tables (torchrun-able): of a precomputed folder, "
                        "or of your diffusers model and image folder")
    pc.add_argument("--precomputed", default=str(DEFAULT_DIR), help="a folder whose model is already set up")
    pc.add_argument("--method", default="abu", choices=["all"] + [m.name for m in METHODS if m.tables])
    pc.add_argument("--model", default="", help="a diffusers pipeline folder or Hub id (with --data and --out)")
    pc.add_argument("--data", default="", help="its training images: an imagefolder (metadata.jsonl) or NAME.png + "
                    "NAME.txt folder")
    pc.add_argument("--out", default="", help="the precomputed folder to write for --model")
    pc.add_argument("--unet-config", default="", help="a UNet2DConditionModel config.json (with --unet-weights): "
                    "--model then supplies only vae/, text_encoder/, tokenizer/, scheduler/")
    pc.add_argument("--unet-weights", default="", help=".safetensors, or .bin (read with weights_only=True)")
    pc.add_argument("--variant", default="", help="weight variant of the pipeline (e.g. fp16)")
    pc.add_argument("--custom-diffusion", default="", help="a Custom Diffusion fine-tune of --model (the folder "
                    "diffusers' training script writes), applied to it; with --exemplars")
    pc.add_argument("--lora", default="", help="a LoRA fine-tune of --model (pytorch_lora_weights.safetensors, or "
                    "the folder holding it, as diffusers' LoRA scripts write), merged into its weights; "
                    "--exemplars optional")
    pc.add_argument("--exemplars", default="", help="the fine-tune's images (an image folder): training rows after "
                    "--data's, the known answer of evaluate customized --precomputed")
    pc.add_argument("--clip", default="", help="an open_clip folder (this project's format) for the CLIP baseline")
    pc.add_argument("--guidance", type=float, default=7.5, help="--model: its default guidance scale")
    pc.add_argument("--force", action="store_true", help="rebuild an --out folder that exists")
    pc.add_argument("--selection", default="cross-attn", choices=["cross-attn", "attn", "all"])
    pc.add_argument("--fisher-passes", type=int, default=5)
    pc.add_argument("--timesteps", type=int, default=10)
    pc.add_argument("--damping", type=float, default=None, help="if: EK-FAC damping (default 0.1 x mean eigenvalue)")
    pc.add_argument("--proj-dim", type=int, default=1024, help="dtrak, trak: random projection size (below N)")
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
                   "if, abuplus: EK-FAC damping (default 0.1 x mean eigenvalue)")
    a.add_argument("--candidates", type=int, help="fast mode: rows rescored exactly (default 200)")
    a.add_argument("--box-contrast", nargs="?", const="raw", choices=("raw", "scaled"),
                   help="abu, abuplus: rank a box by its loss change minus that of the rest of the image (twice the "
                   "time); 'scaled': each side over its median |change| first (exact mode); see docs/evaluation.md")
    a.add_argument("--clip-model", default="", help="clip: any open_clip model name instead of the project's CLIP")
    a.add_argument("--dino-model", default="", help="dino: a DINO / DINOv2 folder or Hub id (else ABU_DINO_MODEL)")
    a.add_argument("--clip-pretrained", default="", help="clip: its pretrained tag (open_clip download) or a "
                   "local .safetensors checkpoint")
    a.add_argument("--json", default="")
    add_precomputed(a, str(DEFAULT_DIR))
    a.set_defaults(func=_cmd_attribute)

    x = sub.add_parser("examples", help="precompute the app's curated examples (every method's ranking)")
    x.add_argument("--queries", default="evaluation/counterfactual_queries.json")
    x.add_argument("--box-pairs", type=int, default=1, help="two-concept box examples: the first pairs of the "
                   "box benchmark's rule (0: none)")
    x.add_argument("--customized", type=int, default=1, help="customized-model examples: the first concepts of "
                   "the customized benchmark's tuning split (0: none)")
    x.add_argument("--results", default="results/counterfactual")
    x.add_argument("--figure", default=None, help="also draw the About tab's figure from the first example "
                   "(assets/about_abu.png)")
    x.add_argument("--quiet", action="store_true")
    add_precomputed(x, str(DEFAULT_DIR))
    x.set_defaults(func=_cmd_examples)

    ls = sub.add_parser("methods", help="list the attribution methods (the registry)")
    ls.add_argument("--markdown", action="store_true", help="as the table in docs/methods.md")
    ls.set_defaults(func=_cmd_methods)


def pins_isa(argv: list[str]) -> bool:
    """Evaluations (and ``bench isa``) run pinned to AVX2 unless ``--native-isa`` is given (see ``machine``)."""
    head = [a for a in argv if not a.startswith("-")][:2]
    return bool(head) and (head[0] == "evaluate" or head == ["bench", "isa"]) and "--native-isa" not in argv


def main(argv: list[str] | None = None) -> int:
    from abu_explorer import machine

    argv = sys.argv[1:] if argv is None else list(argv)
    if pins_isa(argv) and ("torch" not in sys.modules or machine.isa_pinned()):  # in-process callers: as loaded
        machine.pin_isa()
    from abu_explorer.artifacts import ArtifactError
    from abu_explorer.cli_options import OLD_MODEL_HINT
    from abu_explorer.model.tokenizer import PromptError

    args = parser().parse_args(argv)
    if getattr(args, "old_model", None):
        print(f"error: {OLD_MODEL_HINT}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (PromptError, ArtifactError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
