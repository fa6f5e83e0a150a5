"""The app's gallery of curated examples: every method's ranking precomputed, next to the counterfactuals.

``python -m abu_explorer examples`` writes ``precomputed/examples/examples.json`` (rankings, settings,
model hashes) and one PNG per query; counterfactual results are looked up in the results folder by key,
so the tab fills in as the evaluation runner finishes retrains. ``--box-pairs P`` adds the first P pairs of
the two-concept box benchmark (``evaluation/boxes.py``): a composite of two training images with a box over
each, whose known sources the tab frames wherever they appear.
"""
from __future__ import annotations

import time
from pathlib import Path

from abu_explorer import artifacts
from abu_explorer.attribution import names, spec
from abu_explorer.evaluation import counterfactual
from abu_explorer.evaluation.counterfactual_table import GRID, load_queries, parse_ks, slug

HINT = "python -m abu_explorer examples"
TOP = 12


def build(app, queries_file: Path, out: Path | None = None, methods=None, progress: bool = True,
          box_pairs: int = 0, customized: int = 0, concepts: Path | None = None,
          customized_results: Path = Path("results/customized")) -> Path:
    from abu_explorer.model.backend import provenance

    out = Path(out or Path(app.explorer.root) / "examples")
    items = []
    for d in load_queries(queries_file):
        source = {"type": "generated", "prompt": d["prompt"], "seed": int(d.get("seed", 0)),
                  "steps": int(d.get("steps", 50)), "guidance": float(d.get("guidance", app.explorer.default_guidance))}
        query = app.query(source, d.get("box"))
        name = slug(d["prompt"]) + f"_s{source['seed']}"
        rankings = {}
        for m in methods or names():
            t0 = time.perf_counter()
            rankings[m] = app.attribute(query, m, TOP)
            if progress:
                print(f"  {d['prompt']!r} {m}: {time.perf_counter() - t0:.1f} s", flush=True)
        items.append({"name": name, "source": source, "box": d.get("box"), "rankings": rankings})
        out.mkdir(parents=True, exist_ok=True)
        artifacts.save_png(out / f"{name}.png", app.preview(source, d.get("box")))
    items += box_items(app, out, box_pairs, methods or names(), progress)
    items += customized_items(app, out, customized, methods or names(), progress, concepts, customized_results)
    artifacts.save_json(out / "examples.json", {"provenance": provenance(app.explorer), "top": TOP, "items": items})
    return out


def box_items(app, out: Path, pairs: int, methods: list[str], progress: bool) -> list[dict]:
    """Two items per pair: the halves composite with a box over A, then over B; each method's top ranks and
    where it puts the box's own source and the other one (``known``)."""
    from abu_explorer.evaluation import boxes

    ds, items = app.explorer.dataset, []
    for a, b in boxes.choose_pairs(app.explorer, pairs) if pairs else []:
        img, parts = boxes.composite(ds, a, b, "halves")
        upload = f"composite_{a}_{b}.png"
        out.mkdir(parents=True, exist_ok=True)
        artifacts.save_png(out / upload, img)
        caption = boxes.caption(ds, a, b)
        for i, (box, own, other) in enumerate(parts):
            source = {"type": "upload", "image": str(out / upload), "caption": caption}
            query = app.query(source, box)
            rankings = {}
            for m in methods:
                if not spec(m).generated_only:
                    rankings[m] = app.attribute(query, m, TOP, track=[own, other])
                    if progress:
                        print(f"  box {a}/{b} #{i} {m}: own source at rank {rankings[m]['tracked'][str(own)]}", flush=True)
            name = f"box_{a}_{b}_{'ab'[i]}"
            items.append({"name": name, "source": {"type": "composite", "prompt": caption, "upload": upload,
                                                   "pair": [a, b], "layout": "halves"},
                          "box": list(box), "known": {"own": own, "other": other}, "rankings": rankings})
            artifacts.save_png(out / f"{name}.png", app.preview(source, box))
    return items


def customized_items(app, out: Path, count: int, methods: list[str], progress: bool, concepts: Path | None = None,
                     results_root: Path = Path("results/customized")) -> list[dict]:
    """The first ``count`` concepts of the customized benchmark's tuning split (never reported, chosen before any
    ranking was seen): the first prompt, each method's top ranks as the benchmark computed them (its results are
    shared), the exemplars framed. The customized model's delta and exemplars are kept in ``out/customized/``."""
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.machine import kind

    if count <= 0:
        return []
    concepts_path = Path(concepts or cz.CONCEPTS)
    chosen = [c for c in cz.load_concepts(concepts_path) if c["split"] == "tune"][:count]
    methods = [m for m in methods if m in cz.BENCHMARK_METHODS]
    results = Path(results_root) / kind() / cz.key_of(cz.protocol(app.explorer, concepts_path))
    items = []
    for c in chosen:
        docs = cz.run_concept(app.explorer, c, methods, out / "customized", results, progress)
        custom = cz.model_for(app.explorer, c, out / "customized")
        prompt = cz.prompts(c)[0]
        name = f"custom_{c['id']}"
        artifacts.save_png(out / f"{name}.png", custom.generate(prompt, cz.QUERY_SEED).image)
        shots = []
        for j, row in enumerate(custom.exemplars):
            shots.append(f"{name}_exemplar_{j}.png")
            artifacts.save_png(out / shots[-1], custom.dataset.image(row))
        rankings = {}
        for d in (d for d in docs if d["prompt"] == prompt):
            rankings[d["method"]] = {
                "label": spec(d["method"]).label, "mode": d["settings"]["mode"] or "one",
                "wall_seconds": d["seconds"], "recall_at_10": d["recall_at_10"], "ap": d["ap"],
                "results": [{"rank": r + 1, "index": i, "caption": custom.dataset.captions[i], "score": sc}
                            for r, (i, sc) in enumerate(zip(d["top"], d["top_scores"]))],
                "tracked": {str(e): rank for e, rank in zip(d["exemplars"], d["exemplar_ranks"])}}
        items.append({"name": name, "source": {"type": "customized", "prompt": prompt, "seed": cz.QUERY_SEED,
                                               "concept": c},
                      "known": {"exemplars": custom.exemplars}, "exemplar_images": shots, "rankings": rankings})
        if progress:
            print(f"  customized {c['id']}: " + ", ".join(f"{m} R@10 {r['recall_at_10']:.2f}"
                                                           for m, r in rankings.items()), flush=True)
    return items


def extra_rows(item: dict, folder: Path) -> dict:
    """{row: (image, caption)} of an example's rows that are not training rows (a customized model's exemplars)."""
    from PIL import Image

    rows = item.get("known", {}).get("exemplars", [])
    caption = f"exemplar of \"{item['source'].get('prompt', '')}\""
    return {row: (Image.open(Path(folder) / shot).convert("RGB"), caption)
            for row, shot in zip(rows, item.get("exemplar_images", []))}


def label(item: dict, captions: list[str]) -> str:
    src = item["source"]
    if src["type"] == "customized":
        n = len(item["known"]["exemplars"])
        return f"customized model: \"{src['prompt']}\" (its {n} exemplar{'s' * (n > 1)} framed)"
    if src["type"] == "composite":
        return f"two-concept box: \"{src['prompt']}\", box over the {captions[item['known']['own']]}"
    return f"{src['prompt']} (seed {src['seed']})"


def load(app, folder: Path | None = None) -> list[dict]:
    """The curated examples; [] when none were built; an error when they belong to another model."""
    from abu_explorer.model.backend import provenance

    folder = Path(folder or Path(app.explorer.root) / "examples")
    if not (folder / "examples.json").exists():
        return []
    doc = artifacts.load_json(folder / "examples.json", HINT)
    if doc["provenance"] != provenance(app.explorer):
        raise artifacts.ArtifactError(f"{folder / 'examples.json'} was built for another model; rebuild: {HINT}")
    for item in doc["items"]:
        item["image_path"] = str(folder / f"{item['name']}.png")
        item["folder"] = str(folder)
    return doc["items"]


def stale(app, item: dict, name: str) -> bool:
    """Was this example's ranking of ``name`` made with other settings or tables than the method has now? (Only
    the embedded model's items; a customized item's rankings are its fine-tune's.)"""
    r = item["rankings"].get(name)
    if r is None or item.get("source", {}).get("type") == "customized":
        return False
    return r.get("settings") != app.method(name).settings()


def counterfactuals(app, item: dict, k: int) -> list[dict]:
    """Every finished counterfactual result for this example at K (any method, any random draw), then the
    source reference (only the training image captioned with the prompt removed, K = 1) when it was retrained."""
    # the request key needs only the query's description: no generation, so no wait for the UNet
    from abu_explorer.attribution.query import Query

    src = item["source"]
    if src["type"] != "generated":
        return []  # remove-and-regenerate needs a generated query (its seed)
    query = Query(None, src["prompt"], {"type": "generated", "seed": src["seed"], "steps": src["steps"],
                                        "guidance": src["guidance"]}, app.image_size,
                  tuple(float(v) for v in item["box"]) if item.get("box") else None)
    from abu_explorer.attribution.settings import BEFORE_TUNING

    found = []
    rows = names() + [f"{m}@before" for m in BEFORE_TUNING if m in names()]  # also cells of replaced defaults
    for m in rows:
        for draw in range(4 if m == "random" else 1):
            r = app.cached_counterfactual(query, m, k, draw)
            if r is not None:
                found.append({**r, "row": m})
    source = app.cached_counterfactual(query, counterfactual.SOURCE, 1) if found else None
    return found + ([{**source, "row": counterfactual.SOURCE}] if source else [])  # the K = 1 reference, at every K


def grid_ks(n_train: int) -> list[int]:
    """The leave-K-out evaluation's Ks at this N (its shares of N), the choices the Examples tab offers."""
    return sorted(set(parse_ks(GRID, n_train)))


def counterfactual_tiles(app, item: dict, k: int, size: int = 160):
    """[(image, caption)]: the original, then each finished counterfactual's regenerated image."""
    from PIL import Image

    from abu_explorer.evaluation.counterfactual_summary import label as label_of

    results = counterfactuals(app, item, k)
    if not results:
        return []
    kind = results[0].get("trained_on", {}).get("kind")  # that kind's K = 0 retrain, when it measured this query
    floor = counterfactual.floor_delta(app.explorer, app.results_dir, results[0]["query"], kind, app.recipe) \
        if kind else None
    tiles = [(Image.open(app.result_folder(results[0]["key"]) / "original.png").convert("RGB")
              .resize((size, size), Image.Resampling.NEAREST),
              "original" + ("" if floor is None else f" (K = 0 retrain: dL {floor:+.4f})"))]
    for r in results:
        path = app.result_folder(r["key"]) / "regenerated.png"
        if path.exists():
            label = f"-{label_of(r.get('row', r['method']))}" + (f" (draw {r['draw']})" if r["method"] == "random" else "")
            tiles.append((Image.open(path).convert("RGB").resize((size, size), Image.Resampling.NEAREST),
                          f"{label} K={r['k']}: dL {r['delta_loss']:+.4f}, MSE {r['delta_g_mse']:.3f}, "
                          f"CLIP {r['delta_g_clip']:.2f}"))
    return tiles
