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
from abu_explorer.evaluation.counterfactual_table import load_queries, slug

HINT = "python -m abu_explorer examples"
TOP = 12


def build(app, queries_file: Path, out: Path | None = None, methods=None, progress: bool = True,
          box_pairs: int = 0) -> Path:
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


def label(item: dict, captions: list[str]) -> str:
    src = item["source"]
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
    return doc["items"]


def counterfactuals(app, item: dict, k: int) -> list[dict]:
    """Every finished counterfactual result for this example at K (any method, any random draw)."""
    # the request key needs only the query's description: no generation, so no wait for the UNet
    from abu_explorer.attribution.query import Query

    src = item["source"]
    if src["type"] != "generated":
        return []  # remove-and-regenerate needs a generated query (its seed)
    query = Query(None, src["prompt"], {"type": "generated", "seed": src["seed"], "steps": src["steps"],
                                        "guidance": src["guidance"]}, app.image_size,
                  tuple(float(v) for v in item["box"]) if item.get("box") else None)
    found = []
    for m in names():
        for draw in range(4 if m == "random" else 1):
            r = app.cached_counterfactual(query, m, k, draw)
            if r is not None:
                found.append(r)
    return found


def counterfactual_tiles(app, item: dict, k: int, size: int = 160):
    """[(image, caption)]: the original, then each finished counterfactual's regenerated image."""
    from PIL import Image

    results = counterfactuals(app, item, k)
    if not results:
        return []
    tiles = [(Image.open(app.result_folder(results[0]["key"]) / "original.png").convert("RGB")
              .resize((size, size), Image.Resampling.NEAREST), "original")]
    for r in results:
        path = app.result_folder(r["key"]) / "regenerated.png"
        if path.exists():
            label = f"-{r['method']}" + (f" (draw {r['draw']})" if r["method"] == "random" else "")
            tiles.append((Image.open(path).convert("RGB").resize((size, size), Image.Resampling.NEAREST),
                          f"{label} K={r['k']}: dL {r['delta_loss']:+.4f}, MSE {r['delta_g_mse']:.3f}, "
                          f"CLIP {r['delta_g_clip']:.2f}"))
    return tiles
