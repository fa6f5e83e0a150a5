"""The two-concept box benchmark's table, plot and command (``boxes.py`` has the protocol)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.evaluation import boxes
from abu_explorer.evaluation.stats import clopper_pearson, mcnemar_p, p_text


def summarize(per_method: dict[str, list[dict]], layouts: list[str], n: int) -> dict:
    """Own-source win share (95% Clopper-Pearson) and mean own rank, per method and layout and over all boxes;
    McNemar tests of every method against the first one listed."""
    out = {"num_train": n, "methods": {}}
    for name, rows in per_method.items():
        entry = {}
        for lay in list(layouts) + ["all"]:
            sel = [r for r in rows if lay == "all" or r["layout"] == lay]
            if not sel:
                continue
            wins = sum(r["own_wins"] for r in sel)
            entry[lay] = {"boxes": len(sel), "own_wins": wins, "share": wins / len(sel),
                          "ci95": list(clopper_pearson(wins, len(sel))),
                          "mean_own_rank": float(np.mean([r["own_rank"] for r in sel])),
                          "boxes_spearman": _mean_or_none([r.get("boxes_spearman") for r in sel]),
                          "median_own_rank": float(np.median([r["own_rank"] for r in sel]))}
        out["methods"][name] = entry
    names = list(per_method)
    if names:
        ref = {_box_id(r): r["own_wins"] for r in per_method[names[0]]}
        for name in names[1:]:
            mine = {_box_id(r): r["own_wins"] for r in per_method[name]}
            common = ref.keys() & mine.keys()
            only_ref = sum(ref[k] and not mine[k] for k in common)
            only_me = sum(mine[k] and not ref[k] for k in common)
            out["methods"][name]["versus_first"] = {"first": names[0], "boxes": len(common), "only_first": only_ref,
                                                    "only_this": only_me, "mcnemar_p": mcnemar_p(only_ref, only_me)}
    return out


def top_table(summary: dict, per_method: dict[str, list[dict]], labels: dict[str, str], k: int = 10) -> str:
    """Over all boxes: how often the own source, and how often the other one, is among a method's top ``k`` (a
    method that finds the composite's sources but not the box's puts both there); McNemar of the own-source
    figure against the first method listed."""
    names = list(per_method)
    hit = {m: {_box_id(r): r["own_rank"] <= k for r in rows} for m, rows in per_method.items()}
    lines = [f"| method | own source in top {k} (95% CI) | other source in top {k} | own in top {k} vs first "
             "(McNemar) |", "|---|---|---|---|"]
    for name, rows in per_method.items():
        if not rows:
            continue
        own, other = sum(hit[name].values()), sum(r["other_rank"] <= k for r in rows)
        lo, hi = clopper_pearson(own, len(rows))
        entry = {"k": k, "boxes": len(rows), "own": own, "ci95": [lo, hi], "other": other}
        vs = "-"
        if name != names[0]:
            common = hit[names[0]].keys() & hit[name].keys()
            a = sum(hit[name][b] and not hit[names[0]][b] for b in common)
            b_ = sum(hit[names[0]][b] and not hit[name][b] for b in common)
            entry["versus_first"] = {"only_this": a, "only_first": b_, "mcnemar_p": mcnemar_p(a, b_)}
            vs = f"{a} vs {b_} discordant, {p_text(mcnemar_p(a, b_))}"
        summary["methods"][name][f"top{k}"] = entry
        lines.append(f"| {labels.get(name, name)} | {own}/{len(rows)} = {own / len(rows):.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{other}/{len(rows)} | {vs} |")
    return "\n".join(lines)


def _mean_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _box_id(r: dict) -> str:
    return f"{r['pair'][0]}-{r['pair'][1]}-{r['layout']}-{r['box']}"


def table(summary: dict, labels: dict[str, str]) -> str:
    layouts = [k for k, v in next(iter(summary["methods"].values())).items() if "own_wins" in v]
    head = " | ".join(f"{lay}: own wins (95% CI), mean own rank, box-vs-box Spearman" for lay in layouts)
    lines = [f"| method | {head} | vs first (McNemar) |", "|---|" + "---|" * (len(layouts) + 1)]
    for name, entry in summary["methods"].items():
        cells = []
        for lay in layouts:
            e = entry.get(lay)
            rho = "-" if e is None or e.get("boxes_spearman") is None else f"{e['boxes_spearman']:.3f}"
            cells.append("-" if e is None else f"{e['own_wins']}/{e['boxes']} = {e['share']:.2f} "
                         f"[{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}], {e['mean_own_rank']:.0f}, {rho}")
        v = entry.get("versus_first")
        vs = "-" if v is None else f"{v['only_this']} vs {v['only_first']} discordant, {p_text(v['mcnemar_p'])}"
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + f" | {vs} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, labels: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    layouts = [k for k, v in summary["methods"][names[0]].items() if "own_wins" in v]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) * len(layouts) / 2 + 3, 3.4), dpi=120)
    width = 0.8 / len(layouts)
    for j, lay in enumerate(layouts):
        e = [summary["methods"][m].get(lay) for m in names]
        share = [x["share"] if x else np.nan for x in e]
        err = np.array([[x["share"] - x["ci95"][0], x["ci95"][1] - x["share"]] if x else [0, 0] for x in e]).T
        ax.bar(np.arange(len(names)) + (j - (len(layouts) - 1) / 2) * width, share, width, yerr=err, capsize=2,
               label=lay)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), [labels.get(m, m) for m in names], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("box's own source ranked above the other")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=len(layouts))
    fig.tight_layout()
    artifacts.save_figure(path, fig)
    plt.close(fig)


def contrast_notes(summary: dict, per_method: dict, labels: dict, folder: Path | None = None) -> str:
    """For AbU and AbU+, per layout: the two boxes contrasted (``boxes.pair_contrast``), raw and on one scale,
    derived from the plain run's exact scores, beside the plain boxes of the same composites (an exact McNemar
    test on the composites where the two disagree; a composite's two plain boxes count as one win when both win)."""
    lines = []
    for name in ("abu", "abuplus"):
        for layout in boxes.LAYOUTS:
            for scaled in (False, True):
                derived = boxes.pair_contrast(per_method.get(name, []), folder, layout, scaled)
                if derived:
                    lines.append(_contrast_line(summary, name, layout, scaled, derived, labels))
    return "\n".join(lines)


def _contrast_line(summary: dict, name: str, layout: str, scaled: bool, derived: list, labels: dict) -> str:
    ranks = [r for d in derived for r in d.get("own_ranks", [])]
    n, wins = len(derived), sum(d["own_wins"] for d in derived)
    plain = sum(all(d["plain_wins"]) for d in derived)
    only_c = sum(d["own_wins"] and not all(d["plain_wins"]) for d in derived)
    only_p = sum(all(d["plain_wins"]) and not d["own_wins"] for d in derived)
    lo, hi = clopper_pearson(wins, n)
    p = mcnemar_p(only_c, only_p)
    variant = "scaled" if scaled else "raw"
    summary["methods"][name].setdefault("contrasts", {}).setdefault(layout, {})[variant] = {
        "composites": n, "own_wins": wins, "share": wins / n, "ci95": [lo, hi], "plain_both_win": plain,
        "mcnemar_p": p, "mean_own_rank": float(np.mean(ranks)) if ranks else None, "ranked_boxes": len(ranks)}
    what = ("tau_A - tau_B" if not scaled else "tau_A / med|tau_A| - tau_B / med|tau_B|")
    return (f"{labels.get(name, name)}, {layout}, the two boxes contrasted ({what}): own sources win in {wins}/{n} "
            f"composites = {wins / n:.2f} [{lo:.2f}, {hi:.2f}]; plain boxes: both win in {plain}/{n} "
            f"(McNemar {p_text(p)})" + (f"; mean own rank {np.mean(ranks):.0f} ({len(ranks)} boxes)" if ranks else ""))


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"--shard takes I/N with 0 <= I < N, e.g. 1/2; got {text!r}")
    return i, n


def main(args) -> int:
    import torch

    from abu_explorer.attribution import spec
    from abu_explorer.evaluation import report_guard
    from abu_explorer.machine import kind
    from abu_explorer.model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "generated", 0):
        from abu_explorer.evaluation import generated_pairs

        exp = load(args.precomputed)
        result = generated_pairs.run(exp, args.generated, not args.quiet)
        print(generated_pairs.line(result["summary"]))
        if args.assets:
            generated_pairs.save(result, Path(args.assets), exp)
        return 0
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for lay in layouts:
        if lay not in boxes.LAYOUTS:
            raise ValueError(f"unknown layout {lay!r}; one of {', '.join(boxes.LAYOUTS)}")
    shard = parse_shard(getattr(args, "shard", "0/1"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    labels = {m: spec(m).label for m in methods}  # unknown names fail before any work
    if args.mode not in ("exact", "fast"):
        raise ValueError(f"--mode must be exact or fast, got {args.mode!r}")
    exp = load(args.precomputed)
    doc = boxes.protocol(exp, args.pairs)
    folder = Path(args.results) / kind() / boxes.key_of(doc)
    if not (folder / "protocol.json").exists():
        artifacts.save_json(folder / "protocol.json", {**doc, "pairs_chosen": boxes.choose_pairs(exp, args.pairs)})
    pairs = [tuple(p) for p in artifacts.load_json(folder / "protocol.json")["pairs_chosen"]]
    options = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict) or set(options) - set(methods):
        raise ValueError("--options takes a JSON object keyed by method names of --methods, e.g. "
                         "'{\"abu\": {\"box_contrast\": true}}'")
    ident = {"methods": methods, "options": options, "mode": args.mode, "pairs": len(pairs), "layouts": layouts,
             "protocol": folder.name, "machine_kind": kind()}
    stem = "boxes" if args.mode == "exact" else "boxes_fast"
    if args.assets:  # the folder holds one table per mode: another one stops here, before any work
        report_guard.claim(Path(args.assets) / f"{stem}_summary.json", ident, args.force)
    per_method = {m: boxes.run_method(exp, m, pairs, layouts, args.mode, folder, not args.quiet, options.get(m), shard)
                  for m in methods}
    summary = summarize(per_method, layouts, len(exp.dataset))
    print(table(summary, labels))
    tops = top_table(summary, per_method, labels)
    print(tops)
    notes = contrast_notes(summary, per_method, labels, folder)
    if notes:
        print(notes)
    summary.update({"machine_kind": kind(), "mode": args.mode, "pairs": len(pairs), "layouts": layouts,
                    "table": ident})
    if args.assets:
        out = Path(args.assets)
        artifacts.save_json(out / f"{stem}_summary.json", summary)
        artifacts.save_text(out / f"{stem}_table.md", table(summary, labels) + f"\n\n{tops}"
                            + (f"\n\n{notes}" if notes else "")
                            + f"\n\n{len(pairs)} pairs x "
                            f"{len(layouts)} layouts x 2 boxes, {args.mode} mode where a method has it, on {kind()}.\n")
        plot(summary, out / f"{stem}_plot.png", labels,
             f"{len(pairs)} pairs, {args.mode} mode, {kind()}: 95% Clopper-Pearson intervals")
    return 0
