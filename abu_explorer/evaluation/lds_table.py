"""``python -m abu_explorer evaluate lds``: train the subset models (resumable, one result file per subset),
score every method on the split's queries, and write the LDS table and plot (``lds.py`` has the protocol).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts
from abu_explorer.attribution.settings import BEFORE_TUNING, variant_label
from abu_explorer.evaluation import lds, stats
from abu_explorer.training import train

NN_NOTE = "similarities, not additive by design"
# Published LDS for context, not a comparison of equals (D-TRAK paper, CIFAR-2, 5,000 images, M = 64 half
# subsets, outputs averaged over 3 training x 3 evaluation seeds, generated queries): 10 / 100 timesteps.
PUBLISHED = {"dtrak": (0.162, 0.226), "trak": (0.051, 0.121)}
def report_rows(methods: list[str], options: dict | None) -> list[tuple[str, str, dict | None]]:
    """(row id, method, its options) per row: each method as asked, then each tuned method with the defaults
    the tuning split replaced (``settings.BEFORE_TUNING``; unless ``options`` set that method's settings), so the
    test split says what the choice changed."""
    options = options or {}
    rows = [(name, name, options.get(name)) for name in methods]
    return rows + [(f"{name}@before", name, dict(old)) for name, old in BEFORE_TUNING.items()
                   if name in methods and name not in options]


def run(explorer, queries: list[dict], methods: list[str], subsets: int, results_dir: Path,
        assets_dir: Path | None, recipe: train.StageConfig = train.UNET_RECIPE, max_subsets: int | None = None,
        progress: bool = True, split: str = "test", ray: dict | None = None, device: str = "cpu",
        num_queries: int = 0, options: dict | None = None, built: list | None = None, report: bool = True,
        force: bool = False) -> dict:
    """Train what is missing of subsets 0..subsets-1 (at most ``max_subsets`` in this call), then the report.
    Every subset model measures all of ``queries`` (both splits, each tagged with its ``split``); the report
    covers those of ``split`` (untagged queries count as any split), the first ``num_queries`` of them if > 0.
    ``ray`` ({"address", "threads", "scratch", "num_cpus"}): the missing subsets run as Ray tasks; ``device``:
    where each subset UNet trains (the table is that machine kind's); ``options``: {method: settings} the methods
    are scored with instead of their defaults; ``built``: a list the queries' latents are kept in between calls;
    ``report=False``: train only (no scores, no table); ``force``: replace another table's report in
    ``assets_dir`` (``report_guard``)."""
    from tqdm.auto import tqdm

    from abu_explorer.evaluation import report_guard
    from abu_explorer.machine import kind

    doc = lds.protocol(explorer, queries, recipe)
    folder = lds.results_folder(results_dir, doc, kind(device))
    ident = {"split": split, "methods": list(methods), "options": options or {}, "num_queries": num_queries,
             "subsets": subsets, "protocol": folder.name, "machine_kind": kind(device)}
    if report and assets_dir is not None:
        report_guard.claim(Path(assets_dir) / "lds_summary.json", ident, force)
    if not (folder / "protocol.json").exists():
        artifacts.save_json(folder / "protocol.json", doc)
    built = built if built is not None else []  # the latents, made when a subset trains here or the report runs

    def latents() -> list:
        if not built:
            built.extend(lds.query_latents(explorer, queries))
        return built

    missing = [j for j in range(subsets) if not (folder / f"subset_{j:03d}.json").exists()]
    if ray is not None:
        missing = missing[:max_subsets] if max_subsets is not None else missing
        from abu_explorer.evaluation import ray_cells

        scratch = str(Path(ray.get("scratch") or results_dir).resolve())
        tasks = [ray_cells.SubsetTask(str(Path(explorer.root).resolve()), queries, j, recipe.to_dict(), scratch,
                                      int(ray.get("threads") or 1), lds.key_of(doc), device) for j in missing]
        ray_cells.run_subsets(tasks, results_dir, ray.get("address"), ray.get("num_cpus"), progress)
        missing = []
    wanted = min(len(missing), max_subsets) if max_subsets is not None else len(missing)
    bar, trained = tqdm(total=wanted, desc="LDS subset models", disable=not progress), 0
    for j in missing:  # a subset another process is training (its claim held) is left to it
        if trained >= wanted:
            break
        with artifacts.claimed(folder / f"subset_{j:03d}.json") as mine:
            if mine:
                lds.train_subset(explorer, j, latents(), folder, recipe, progress=progress, device=device)
                trained += 1
                bar.update(1)
    bar.close()
    finished = [folder / f"subset_{j:03d}.json" for j in range(subsets)]  # the table uses subsets 0 .. M-1 only
    finished = [p for p in finished if p.exists()]
    out = {"subsets_done": len(finished), "subsets_planned": subsets, "folder": str(folder)}
    chosen = [i for i, q in enumerate(queries) if q.get("split", split) == split]
    chosen = chosen[:num_queries] if num_queries else chosen
    if report and len(finished) >= 3 and chosen:
        out.update(evaluate(explorer, methods, [latents()[i] for i in chosen], folder,
                            [artifacts.load_json(p) for p in finished], chosen, [queries[i] for i in chosen],
                            progress, options))
        out.update(split=split, table=ident)
        if assets_dir is not None:
            write(out, Path(assets_dir), len(explorer.dataset))
    return out


def evaluate(explorer, methods: list[str], built: list, folder: Path, subset_docs: list[dict],
             columns: list[int] | None = None, described: list[dict] | None = None, progress: bool = False,
             options: dict | None = None) -> dict:
    """LDS per method (mean over queries, bootstrap 95% interval), with all M subsets and with the first M/2.
    ``columns``: which of each subset's losses ``built`` are (default: all, in order); ``described``: the
    query records, part of the score cache's key."""
    from abu_explorer.attribution import spec

    n = len(explorer.dataset)
    masks = np.zeros((len(subset_docs), n))
    for row, d in enumerate(subset_docs):
        masks[row, lds.subset_rows(d["subset"], n)] = 1.0
    losses = np.array([d["losses"] for d in subset_docs])  # (M, all queries)
    losses = losses[:, columns] if columns is not None else losses  # (M, Q)
    kinds = {d["trained_on"]["kind"] for d in subset_docs}
    if len(kinds) > 1:
        raise ValueError(f"one LDS table holds one machine kind; these subsets come from {sorted(kinds)}")
    rows, half = {}, max(3, len(subset_docs) // 2)
    sources = lds.source_rows(described)
    for row_id, name, opts in report_rows(methods, options):
        scores = lds.method_scores(explorer, name, built, folder, described, progress, opts)
        per_query = lds.lds_per_query(scores, masks, losses)
        mean, lo, hi = stats.mean_ci(per_query)
        by_m = {str(m): float(lds.lds_per_query(scores, masks[:m], losses[:m]).mean())  # how it settles with M
                for m in range(3, len(subset_docs) + 1)}
        m = spec(name)
        label = m.label if row_id == name else variant_label(row_id, m.label.split(" (")[0])
        rows[row_id] = {"label": label, "lds": mean, "ci95": [lo, hi], "lds_half": by_m[str(half)], "lds_by_m": by_m,
                      "lds_other_query": lds.other_query_control(scores, masks, losses),
                      "per_query": per_query.tolist(), "mode": "exact" if "exact" in m.modes else "",
                      "top10": [np.argsort(-row, kind="stable")[:10].tolist() for row in scores],
                      "note": NN_NOTE if m.module.endswith(".nearest") else "",
                      "caption_row": caption_row(scores, described)}
        if sources is not None:  # what the method predicts beyond the query's source image
            within = lds.lds_within_source(scores, masks, losses, sources)
            within = within[~np.isnan(within)]
            mean_w, lo_w, hi_w = stats.mean_ci(within) if len(within) else (float("nan"),) * 3
            rows[row_id].update({"lds_within_source": mean_w, "within_ci95": [lo_w, hi_w],
                               "within_per_query": within.tolist()})
    if "abu" in rows:  # every other method against AbU, paired by query: the claims the report may make
        from abu_explorer.evaluation.lds_tuning import compare

        for name, r in rows.items():
            if name != "abu":
                r["versus_abu"] = compare(r["per_query"], rows["abu"]["per_query"])
    return {"methods": rows, "num_subsets": len(subset_docs), "half": half, "num_queries": len(built),
            "machine_kind": next(iter(kinds)), "num_train": n,
            "source_effect": lds.source_effect(masks, losses, sources) if sources is not None else None}


def caption_row(scores: np.ndarray, described: list[dict] | None) -> dict | None:
    """A sanity check with a likely answer, not part of LDS: each query was generated from the caption of training
    row ``row``; where does that row's image rank (1 = first)? None when the queries do not record their row."""
    rows = lds.source_rows(described)
    if rows is None:
        return None
    ranks = [int((s > s[row]).sum()) + 1 for s, row in zip(scores, rows)]
    return {"in_top10": sum(r <= 10 for r in ranks), "queries": len(ranks), "median_rank": float(np.median(ranks))}


def table(report: dict) -> str:
    lines = [f"| method | LDS (mean over {report['num_queries']} queries) | 95% interval | with M/2 = "
             f"{report['half']} subsets | another query's scores (control) | minus AbU, paired by query (better / "
             "worse, sign test) | within the source image's strata [95%] | caption's own image: top 10 / median "
             "rank | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        lo, hi = r["ci95"]
        pub = PUBLISHED.get(name)
        paper = f"D-TRAK paper, CIFAR-2: {pub[0]:.3f} / {pub[1]:.3f} (10 / 100 timesteps)" if pub else ""
        note = "; ".join(x for x in (r["note"], paper) if x)
        c = r.get("caption_row")
        own = f"{c['in_top10']}/{c['queries']} / {c['median_rank']:g}" if c else "-"
        v = r.get("versus_abu")
        vs = "-"
        if v:
            vs = (f"{v['diff']:+.3f} [{v['diff_ci95'][0]:+.3f}, {v['diff_ci95'][1]:+.3f}] "
                  f"({v['wins']} / {v['losses']}, {stats.p_text(v['sign_p'])})")
        ctrl = "-" if r.get("lds_other_query") is None else f"{r['lds_other_query']:+.3f}"
        w = r.get("lds_within_source")
        within = "-" if w is None else f"{w:+.3f} [{r['within_ci95'][0]:+.3f}, {r['within_ci95'][1]:+.3f}]"
        lines.append(f"| {r['label']} | {r['lds']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {r['lds_half']:+.3f} | {ctrl} | {vs} "
                     f"| {within} | {own} | {note} |")
    src = report.get("source_effect")
    if src:  # a reference that reads the query's provenance, not a method
        lines.append(f"| *the source image alone (reads the query's provenance: a reference, not a method)* | "
                     f"{src['lds_source_only']:+.3f} | | | | | 0 by construction | all / 1 | a subset holding it changes the "
                     f"query's loss by {src['loss_change_with_source']:+.4f}; models on the same side spread by "
                     f"{src['loss_sd_within_side']:.4f} (sd) |")
    return "\n".join(lines)


def write(report: dict, assets_dir: Path, n: int) -> None:
    assets_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_json(assets_dir / "lds_summary.json", report)
    artifacts.save_text(assets_dir / "lds_table.md", table(report) + f"\n\nM = {report['num_subsets']} subset models "
                        f"(half of N = {n} each), {report['split']} split, all trained on {report['machine_kind']}.\n")
    plot(report, assets_dir / "lds_plot.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    r = report["methods"]
    means = [r[m]["lds"] for m in names]
    err = np.array([[r[m]["lds"] - r[m]["ci95"][0], r[m]["ci95"][1] - r[m]["lds"]] for m in names]).T
    fig, (ax, curve) = plt.subplots(1, 2, figsize=(1.2 * len(names) + 6.5, 3.4),
                                    gridspec_kw={"width_ratios": [1.2 * len(names) + 2, 4.5]})
    within = [r[m].get("lds_within_source") for m in names]
    paired = all(w is not None for w in within)
    x, width = np.arange(len(names)), 0.4 if paired else 0.8
    ax.bar(x - (width / 2 if paired else 0), means, width, yerr=err, capsize=3, color="#4c72b0", label="LDS")
    if paired:  # what each method predicts beyond the query's source image
        werr = np.array([[w - r[m]["within_ci95"][0], r[m]["within_ci95"][1] - w] for m, w in zip(names, within)]).T
        ax.bar(x + width / 2, within, width, yerr=werr, capsize=3, color="#a1c9f4",
               label="LDS within the source image's strata")
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    ax.axhline(0, color="black", lw=0.8)
    src = report.get("source_effect")
    if src:
        ax.axhline(src["lds_source_only"], color="#c44e52", lw=1, ls="--")
        ax.text(-0.5, src["lds_source_only"], " source image alone (reference)", color="#c44e52",
                fontsize=7, ha="left", va="bottom")
        ax.set_ylim(top=max(ax.get_ylim()[1], src["lds_source_only"] + 0.12))  # room for the line's label
    ax.set_xticks(range(len(names)), [r[m]["label"] for m in names], rotation=20, ha="right")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"LDS, {report['num_queries']} queries x {report['num_subsets']} subset models "
                 f"({report['machine_kind']}), 95% bootstrap intervals", fontsize=8)
    for name in names:  # the mean LDS with the first M subset models: has it settled?
        ms = sorted(int(m) for m in r[name].get("lds_by_m", {}))
        curve.plot(ms, [r[name]["lds_by_m"][str(m)] for m in ms], marker=".", label=r[name]["label"])
    curve.axhline(0, color="black", lw=0.8)
    curve.set_xlabel("subset models used (the first M)")
    curve.set_ylabel("mean LDS")
    curve.set_title("LDS against M", fontsize=8)
    curve.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    artifacts.save_figure(path, fig)
    plt.close(fig)


def main(args) -> int:
    from abu_explorer.machine import use_device
    from abu_explorer.model.embedded import Explorer

    if not (args.ray or args.ray_address):
        use_device(args.device)  # a missing GPU is one line before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = Explorer.load(args.precomputed)
    doc = artifacts.load_json(Path(args.queries))
    if args.split not in ("test", "tune"):
        raise ValueError(f"--split must be test or tune, got {args.split!r}")
    # every subset model measures both splits' queries: one set of models serves tuning and the report
    queries = [{**q, "split": name} for name in ("test", "tune") for q in doc[name]]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict) or set(options) - set(methods):
        raise ValueError("--options takes a JSON object keyed by method names of --methods, e.g. "
                         '\'{"abu": {"alpha": 0.003}}\'')
    ray = {"address": args.ray_address or None, "threads": args.threads or 1,
           "scratch": args.ray_scratch or None} if (args.ray or args.ray_address) else None
    if args.status:
        from abu_explorer.evaluation import progress

        print(progress.show(progress.lds_status(exp, queries, methods, args.subsets, Path(args.results), args.split,
                                                device=args.device)))
        return 0
    common = dict(progress=not args.quiet, split=args.split, device=args.device, num_queries=args.num_queries)
    if args.sweep:
        return sweep(exp, queries, methods, options, args, common)
    out = run(exp, queries, methods, args.subsets, Path(args.results), Path(args.assets) if args.assets else None,
              max_subsets=args.max_subsets, ray=ray, options=options, report=not args.train_only, force=args.force,
              **common)
    if "methods" in out:
        print(table(out))
    print(f"{out['subsets_done']}/{out['subsets_planned']} subset models done ({out['folder']})")
    return 0


def sweep(exp, queries: list[dict], methods: list[str], options: dict, args, common: dict) -> int:
    """``--sweep``: LDS of every setting in the grid on the tuning split, with the subset models trained so far."""
    from abu_explorer.evaluation import lds_tuning

    if args.split != "tune":
        raise ValueError("--sweep chooses settings on the tuning split: pass --split tune")
    grid = lds_tuning.parse_grid(args.sweep, methods)
    built, last = [], {}

    def evaluate_setting(name: str, combo: dict) -> dict:
        out = run(exp, queries, [name], args.subsets, Path(args.results), None, max_subsets=0,
                  options={name: {**options.get(name, {}), **combo}}, built=built, **common)
        if "methods" not in out:
            raise ValueError(f"the sweep needs at least 3 subset models; {out['subsets_done']} are trained "
                             "(run evaluate lds without --sweep first)")
        last.update(out)
        return out["methods"][name]

    rows = lds_tuning.sweep(evaluate_setting, exp, grid, stability=args.stability, around=options)
    report = {k: last[k] for k in ("num_subsets", "num_queries", "machine_kind", "folder")}
    if args.assets:
        lds_tuning.write(rows, report, Path(args.assets))
    print(lds_tuning.table(rows, report["num_queries"], report["num_subsets"]))
    print(lds_tuning.choice_text(rows))
    return 0
