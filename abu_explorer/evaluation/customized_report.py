"""The customized-model benchmark's table, plot and command (``customized.py`` has the protocol)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from abu_explorer import artifacts
from abu_explorer.evaluation import customized, customized_concepts


def summarize(results: list[dict], methods: list[str], split: str) -> dict:
    """Mean Recall@10 and mAP with 95% bootstrap intervals over the split's queries, per method and kind."""
    from abu_explorer.evaluation.stats import mean_ci

    out = {"split": split, "methods": {}}
    for name in methods:
        rows = [r for r in results if r["method"] == name and r["split"] == split]
        entry = {}
        for kind in ("single", "family", "all"):
            sel = [r for r in rows if kind == "all" or r["kind"] == kind]
            if not sel:
                continue
            e = {"queries": len(sel), "concepts": len({r["concept"] for r in sel})}
            for metric in ("recall_at_10", "ap"):
                mean, lo, hi = mean_ci(np.array([r[metric] for r in sel], dtype=np.float64))
                e[metric] = {"mean": mean, "ci95": [lo, hi]}
            entry[kind] = e
        out["methods"][name] = entry
    return out


def table(summary: dict, labels: dict[str, str]) -> str:
    kinds = ("single", "family", "all")
    lines = ["| method | " + " | ".join(f"{k}: Recall@10 [95% CI] | {k}: mAP [95% CI]" for k in kinds) + " |",
             "|---|" + "---|" * (2 * len(kinds))]
    for name, entry in summary["methods"].items():
        cells = []
        for k in kinds:
            e = entry.get(k)
            for metric in ("recall_at_10", "ap"):
                cells.append("-" if e is None else f"{e[metric]['mean']:.2f} [{e[metric]['ci95'][0]:.2f}, "
                             f"{e[metric]['ci95'][1]:.2f}] (n={e['queries']})")
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, labels: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in summary["methods"] if summary["methods"][m]]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * len(names), 3.4), dpi=120, sharey=True)
    for ax, metric, label in zip(axes, ("recall_at_10", "ap"), ("Recall@10", "mAP")):
        for j, kind in enumerate(("single", "family")):
            e = [summary["methods"][m].get(kind) for m in names]
            mean = [x[metric]["mean"] if x else np.nan for x in e]
            err = np.array([[x[metric]["mean"] - x[metric]["ci95"][0], x[metric]["ci95"][1] - x[metric]["mean"]]
                            if x else [0, 0] for x in e]).T
            ax.bar(np.arange(len(names)) + (j - 0.5) * 0.4, mean, 0.4, yerr=err, capsize=2, label=kind)
        ax.set_xticks(range(len(names)), [labels.get(m, m) for m in names], rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(path, fig)
    plt.close(fig)


def write_concepts(path: Path, force: bool) -> int:
    """The rule's concepts, with empty category words for a person to name (never over an existing list)."""
    from abu_explorer import data

    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it (its category words are lost)")
    ds = data.build_openmoji(data.DataConfig(), progress=False)
    concepts = customized_concepts.select(np.asarray(ds.images))
    customized_concepts.check_unseen(concepts, ds.images)
    artifacts.save_json(path, [{**c, "word": ""} for c in concepts])
    print(f"{len(concepts)} concepts -> {path}; name each one's category word before evaluating")
    return 0


def user_model(args, methods: list[str], labels: dict) -> int:
    """A user's customized model (``precompute --custom-diffusion --exemplars``): each method's Recall@10 and AP
    of the exemplars for the given prompts."""
    from abu_explorer.machine import kind
    from abu_explorer.model import load

    model = load(args.precomputed)
    if not getattr(model, "exemplars", None):
        raise ValueError(f"{args.precomputed} holds no exemplars: precompute it with --custom-diffusion DIR "
                         "(or --lora FILE) --exemplars IMAGES")
    folder = Path(args.results) / kind() / f"user-{customized.key_of(model.provenance())}"
    docs = customized.score_prompts(model, {"concept": "user", "kind": "all", "split": "user"}, args.prompt,
                                    methods, folder, args.seed)
    lines = ["| prompt | method | Recall@10 | AP | exemplar ranks |", "|---|---|---|---|---|"]
    lines += [f"| {d['prompt']} | {labels[d['method']]} | {d['recall_at_10']:.2f} | {d['ap']:.3f} | "
              f"{', '.join(map(str, d['exemplar_ranks']))} |" for d in docs]
    print("\n".join(lines) + f"\n\n{len(model.exemplars)} exemplars among {len(model.dataset)} rows; results in {folder}")
    return 0


def main(args) -> int:
    import torch

    from abu_explorer.attribution import spec
    from abu_explorer.machine import kind
    from abu_explorer.model import load

    if args.write_concepts:
        return write_concepts(Path(args.concepts), args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    labels = {m: spec(m).label for m in methods}  # unknown names fail before any work
    if args.prompt:
        return user_model(args, methods, labels)
    concepts = customized.load_concepts(args.concepts)
    if args.split != "all":
        concepts = [c for c in concepts if c["split"] == args.split]
    if args.concept:
        concepts = [c for c in concepts if c["id"] in args.concept.split(",")]
    if args.abu_settings:
        import json

        given = json.loads(args.abu_settings)
        if not isinstance(given, dict) or set(given) - set(customized.CUSTOM_ABU):
            raise ValueError(f"--abu-settings takes a JSON object with keys among {sorted(customized.CUSTOM_ABU)}")
        customized.CUSTOM_ABU = {**customized.CUSTOM_ABU, **given}
    base = load(args.precomputed)
    protocol = customized.protocol(base, args.concepts)
    folder = Path(args.results) / kind() / customized.key_of(protocol)
    if not (folder / "protocol.json").exists():
        artifacts.save_json(folder / "protocol.json", protocol)
    work = Path(args.work) / customized.key_of(protocol)
    ident = {"methods": methods, "concepts": [c["id"] for c in concepts if c["split"] == "test"],
             "abu_settings": dict(customized.CUSTOM_ABU), "protocol": customized.key_of(protocol),
             "machine_kind": kind()}
    if args.assets and ident["concepts"]:  # the test split's table: another one stops here, before any work
        from abu_explorer.evaluation import report_guard

        report_guard.claim(Path(args.assets) / "customized_summary.json", ident, args.force)
    results = []
    for c in concepts:
        results += customized.run_concept(base, c, methods, work, folder, not args.quiet)
        if not args.quiet:
            print(f"{c['id']}: done ({len(results)} results)")
    for split in ("tune", "test"):
        summary = summarize(results, methods, split)
        if not any(summary["methods"].values()):
            continue
        summary.update({"machine_kind": kind(), "protocol": customized.key_of(protocol)},
                       **({"table": ident} if split == "test" else {}))
        print(f"\n{split} split:\n" + table(summary, labels))
        if args.assets and split == "test":
            out = Path(args.assets)
            n = summary["methods"][methods[0]].get("all", {}).get("concepts", 0)
            artifacts.save_json(out / "customized_summary.json", summary)
            artifacts.save_text(out / "customized_table.md", table(summary, labels) + f"\n\nTest split: {n} "
                                f"customized models x {len(customized.PROMPTS)} prompts, exact mode, on {kind()}.\n")
            plot(summary, out / "customized_plot.png", labels, f"customized models (test split), {kind()}: "
                 "95% bootstrap intervals over queries")
    return 0
