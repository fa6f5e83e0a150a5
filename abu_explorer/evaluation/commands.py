"""The evaluation commands: ``counterfactual`` (one leave-K-out cell), ``evaluate counterfactual`` (the table,
resumable), ``evaluate lds``, ``evaluate boxes`` (two-concept box queries) and ``evaluate customized`` (customized models). Retrains on other machines (GPUs, a cluster) run as Ray tasks
(``evaluate counterfactual --ray``)."""
from __future__ import annotations

from pathlib import Path

from abu_explorer.cli_options import add_precomputed


def cmd_counterfactual(args) -> int:
    from abu_explorer.attribution import query as q
    from abu_explorer.attribution import spec
    from abu_explorer.evaluation import counterfactual
    from abu_explorer.model import load

    spec(args.method)  # unknown names fail before the model loads
    exp = load(args.precomputed)
    if exp.retrain_note:
        raise ValueError(exp.retrain_note)
    box = tuple(args.box) if args.box else None
    query = q.from_generation(exp, args.prompt, args.seed, args.steps, args.guidance, box)
    result = counterfactual.run(exp, query, args.method, args.k, Path(args.results), draw=args.draw)
    print(counterfactual.show(result))
    print(f"result: {counterfactual.result_dir(Path(args.results), result['key'], result['trained_on']['kind'])}"
          "/result.json")
    return 0


def cmd_evaluate(args) -> int:
    from abu_explorer.evaluation import counterfactual_table

    return counterfactual_table.main(args)


def cmd_lds(args) -> int:
    from abu_explorer.evaluation import lds_table

    return lds_table.main(args)


def cmd_boxes(args) -> int:
    from abu_explorer.evaluation import boxes_report

    return boxes_report.main(args)


def add_native_isa(p) -> None:
    p.add_argument("--native-isa", action="store_true", help="do not pin the math libraries to AVX2 (results are "
                   "then filed under this CPU's own kind; see `bench isa`)")


def add_retrain_options(p, unit: str, results: str) -> None:
    """Where and how the retrains of a leave-K-out or LDS evaluation run (one per ``unit``), and where results go."""
    p.add_argument("--threads", type=int, default=0, help=f"torch threads (0: torch's default); with Ray, the "
                   f"threads (and CPUs reserved) per {unit} task")
    p.add_argument("--device", default="cpu", help="where each UNet retrains: cpu, or cuda (with --ray: each task "
                   "holds one GPU of a worker; work outside the tasks, such as the K = 0 floor, runs where this "
                   "command runs)")
    p.add_argument("--ray", action="store_true", help=f"run the missing {unit}s as tasks on a local Ray instance")
    p.add_argument("--ray-address", default="", help="on a running Ray cluster instead (e.g. ray://head:10001 or "
                   "auto); its workers need this package and --precomputed's folder")
    p.add_argument("--ray-scratch", default="", help="where Ray workers retrain and keep checkpoints (default: "
                   "--results; give a shared folder on a cluster)")
    p.add_argument("--results", default=results)
    p.add_argument("--status", action="store_true", help=f"print which {unit}s are done, running elsewhere or "
                   "missing, and run nothing")
    p.add_argument("--quiet", action="store_true")


def cmd_customized(args) -> int:
    from abu_explorer.evaluation import customized_report

    return customized_report.main(args)


def add_commands(sub, default_model: str) -> None:
    from abu_explorer.attribution import names

    all_methods = ",".join(names())
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
    add_precomputed(c, default_model)
    c.set_defaults(func=cmd_counterfactual)

    ev = sub.add_parser("evaluate", help="evaluations (resumable): counterfactual | lds | boxes | customized")
    group = ev.add_subparsers(dest="what", required=True)
    e = group.add_parser("counterfactual", help="the leave-K-out table: one retrain per (query, method, K)")
    e.add_argument("--queries", required=True, help='JSON list of {"prompt", "seed"[, "steps", "guidance", "box"]}')
    e.add_argument("--methods", default=all_methods)
    e.add_argument("--k", default="0.84%", help="comma-separated K values: counts or shares of N "
                   "(0.4%%,0.84%%,3.37%% are 8,17,68 at N = 2,015)")
    e.add_argument("--no-floor", action="store_true", help="skip the K = 0 retrain (the arithmetic floor)")
    e.add_argument("--draws", type=int, default=2, help="random draws per query")
    e.add_argument("--max-cells", type=int, default=None, help="stop after this many new retrains")
    add_retrain_options(e, "cell", "results/counterfactual")
    e.add_argument("--assets", default="assets", help="where the table, plot and strips go ('' for none); "
                   "a folder holds one table (queries, methods, Ks, draws)")
    e.add_argument("--force", action="store_true", help="replace the report of another table in --assets")
    add_precomputed(e, default_model)
    add_native_isa(e)
    e.set_defaults(func=cmd_evaluate)

    lds_cmd = group.add_parser("lds", help="the linear datamodeling score: models on random halves, every method")
    lds_cmd.add_argument("--queries", default="evaluation/lds_queries.json", help="the test and tuning splits")
    lds_cmd.add_argument("--split", default="test", help="test (reported) or tune (for choosing settings)")
    lds_cmd.add_argument("--num-queries", type=int, default=0, help="the first N queries of the split (0: all)")
    lds_cmd.add_argument("--methods", default=all_methods)
    lds_cmd.add_argument("--subsets", type=int, default=24, help="M: subset models, each on half of N; the table uses the finished ones among the first M")
    lds_cmd.add_argument("--max-subsets", type=int, default=None, help="stop after this many new subset models")
    lds_cmd.add_argument("--train-only", action="store_true", help="train the missing subset models and stop "
                         "(no scores, no table)")
    lds_cmd.add_argument("--options", default="", help='method settings instead of the defaults, as JSON, e.g. '
                         '\'{"abu": {"alpha": 0.003}}\' (scores are filed under their settings); with --sweep, the '
                         "centre of the grid (an earlier round, after the default moved)")
    lds_cmd.add_argument("--sweep", default="", help="with --split tune: the LDS of each setting, one factor at a "
                         'time, e.g. \'{"abu": {"alpha": [0.003, 0.03], "unlearn_samples": [2048]}}\', each paired '
                         "against the default (assets/lds_tuning.*); trains no subset model")
    lds_cmd.add_argument("--stability", action="store_true", help="with --sweep: score each setting again with the "
                         "next draw seed and report the top-10 overlap of the two rankings (twice the scoring)")
    add_retrain_options(lds_cmd, "subset model", "results/lds")
    lds_cmd.add_argument("--assets", default="assets", help="where the table and plot go ('' for none); a folder "
                         "holds one table (split, methods, options, queries, subsets)")
    lds_cmd.add_argument("--force", action="store_true", help="replace the report of another table in --assets")
    add_precomputed(lds_cmd, default_model)
    add_native_isa(lds_cmd)
    lds_cmd.set_defaults(func=cmd_lds)

    bx = group.add_parser("boxes", help="two-concept composites: does a box rank its own source above the other?")
    bx.add_argument("--pairs", type=int, default=40, help="pairs of training images (chosen by a fixed rule)")
    bx.add_argument("--layouts", default="halves,quadrants,pasted")
    from abu_explorer.attribution import METHODS

    bx.add_argument("--methods", default=",".join(m.name for m in METHODS if not m.generated_only),
                    help="default: every method that takes uploads (not Journey-TRAK)")
    bx.add_argument("--options", default="", help='method options as JSON, e.g. \'{"abu": {"box_contrast": true}}\' '
                    "(results are filed under the method's settings)")
    bx.add_argument("--generated", type=int, default=0, help="instead: generate the first N pairs' \"A and B\" "
                    "prompts and count those drawn with both parts recognisable (assets/boxes_generated.*)")
    bx.add_argument("--mode", default="exact", help="exact (the benchmark) or fast (a quick look; filed apart)")
    bx.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bx.add_argument("--results", default="results/boxes")
    bx.add_argument("--assets", default="assets", help="where the table and plot go ('' for none); a folder holds "
                    "one table per mode (methods, options, pairs, layouts)")
    bx.add_argument("--force", action="store_true", help="replace the report of another table in --assets")
    bx.add_argument("--shard", default="0/1", help="I/N: only composites I, I+N, ... (0 <= I < N), so that N "
                    "processes fill the same results together; the table then counts what is filed so far")
    bx.add_argument("--quiet", action="store_true")
    add_precomputed(bx, default_model)
    add_native_isa(bx)
    bx.set_defaults(func=cmd_boxes)

    cz = group.add_parser("customized", help="customized models (Custom Diffusion on held-out glyphs): does each "
                          "method find the exemplars? Recall@10 and mAP")
    cz.add_argument("--concepts", default="evaluation/customized_concepts.json")
    cz.add_argument("--write-concepts", action="store_true", help="write the concept rule's list to --concepts "
                    "(category words left empty) and stop")
    cz.add_argument("--force", action="store_true", help="with --write-concepts: overwrite the list; else: replace "
                    "the report of another table in --assets (a folder holds one: methods, test concepts, settings)")
    cz.add_argument("--prompt", action="append", default=[], help="your own customized model (--precomputed of "
                    "precompute --custom-diffusion --exemplars): a prompt to attribute (repeatable); prints each "
                    "method's Recall@10 and AP of the exemplars")
    cz.add_argument("--seed", type=int, default=0, help="with --prompt: the generation seed")
    cz.add_argument("--split", default="all", help="tune, test or all")
    cz.add_argument("--concept", default="", help="comma-separated concept ids (default: every concept of the split)")
    from abu_explorer.evaluation.customized import BENCHMARK_METHODS

    cz.add_argument("--methods", default=",".join(m for m in BENCHMARK_METHODS if m in all_methods.split(",")))
    cz.add_argument("--abu-settings", default="", help='AbU (and AbU+) settings instead of the chosen one for '
                    'customized models, as JSON, e.g. the paper\'s \'{"alpha": 0.1, "unlearn_steps": 100, '
                    '"unlearn_samples": 160}\' (tuning; results are filed under their settings)')
    cz.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    cz.add_argument("--work", default="runs/customized", help="where the customized models and their tables go")
    cz.add_argument("--results", default="results/customized")
    cz.add_argument("--assets", default="assets", help="where the table and plot go ('' for none)")
    cz.add_argument("--quiet", action="store_true")
    add_precomputed(cz, default_model)
    add_native_isa(cz)
    cz.set_defaults(func=cmd_customized)
