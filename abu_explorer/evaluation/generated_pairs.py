"""Generated two-concept queries: does the model draw "A and B" with both parts recognisable?

The box benchmark (``boxes.py``) builds its composites from training images, so each part has a known source.
A visitor's box is more often drawn on a *generated* image; that has a known answer only when the model drew
both named concepts. This module measures how often it does.

# Protocol (fixed before any image was seen)
- Prompts: the box benchmark's pairs (``boxes.choose_pairs``, same rule and seed), the first ``count``; prompt
  "<caption A> and <caption B>", seed 0, 50 DDIM steps, the model's default guidance.
- A part counts as recognisable when its training image is among the ``TOP`` nearest training images of the
  generated picture by the nearest-neighbour baseline (``clip``: the model's CLIP; ``pixel``: raw pixels).
  A prompt comes out with both parts when both A and B pass, by CLIP (pixel reported beside it).
- Reported: the count with a 95% Clopper-Pearson interval, and a contact sheet of every generation.
"""
from __future__ import annotations

from pathlib import Path

from abu_explorer import artifacts
from abu_explorer.evaluation import boxes
from abu_explorer.evaluation.stats import clopper_pearson

TOP, SEED = 10, 0


def run(explorer, count: int, progress: bool = True) -> dict:
    """Generate the ``count`` prompts and rank A and B among the nearest training images of each picture."""
    from tqdm.auto import tqdm

    from abu_explorer.attribution import query as q
    from abu_explorer.attribution import spec

    rankers = {m: spec(m).load(explorer) for m in ("clip", "pixel")}
    rows, images = [], []
    ds = explorer.dataset
    for a, b in tqdm(boxes.choose_pairs(explorer, count), desc="generated pairs", disable=not progress):
        prompt = boxes.caption(ds, a, b)
        g = explorer.generate(prompt, SEED)
        images.append(g.image)
        query = q.from_image(explorer, g.image, prompt)
        row = {"pair": [a, b], "prompt": prompt}
        for name, ranker in rankers.items():
            order = ranker.score(query, "").order.numpy()
            where = {int(i): r + 1 for r, i in enumerate(order[: max(TOP, 50)])}
            row[name] = {"rank_a": where.get(a), "rank_b": where.get(b)}  # None: below the top 50
            row[name]["both"] = all(r is not None and r <= TOP for r in (where.get(a), where.get(b)))
        rows.append(row)
    return {"prompts": rows, "summary": summarize(rows), "images": images}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in ("clip", "pixel"):
        both = sum(r[name]["both"] for r in rows)
        one = sum(any(x is not None and x <= TOP for x in (r[name]["rank_a"], r[name]["rank_b"])) for r in rows)
        out[name] = {"both": both, "at_least_one": one, "prompts": len(rows),
                     "both_ci95": list(clopper_pearson(both, len(rows)))}
    return out


def sheet(images, rows: list[dict], path: Path, ds) -> None:
    """Each generation beside its two sources, with the CLIP ranks of A and B."""
    from PIL import Image, ImageDraw

    cell, cols = 64, 4
    height = cell + 14
    canvas = Image.new("RGB", (cols * (3 * cell + 8), ((len(rows) + cols - 1) // cols) * (height + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, r) in enumerate(zip(images, rows)):
        x, y = (i % cols) * (3 * cell + 8), (i // cols) * (height + 4)
        for j, tile in enumerate([img, ds.image(r["pair"][0]), ds.image(r["pair"][1])]):
            canvas.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (x + j * cell, y))
        ra, rb = r["clip"]["rank_a"], r["clip"]["rank_b"]
        mark = "both" if r["clip"]["both"] else ""
        draw.text((x, y + cell + 1), f"A#{ra or '>50'} B#{rb or '>50'} {mark}", fill="black")
    artifacts.save_png(path, canvas)


def save(result: dict, out: Path, explorer) -> None:
    artifacts.save_json(out / "boxes_generated.json", {k: v for k, v in result.items() if k != "images"})
    sheet(result["images"], result["prompts"], out / "boxes_generated.png", explorer.dataset)


def line(summary: dict) -> str:
    c, p = summary["clip"], summary["pixel"]
    return (f"{c['both']}/{c['prompts']} prompts drew both parts (CLIP top-{TOP}; 95% CI "
            f"{c['both_ci95'][0]:.2f}-{c['both_ci95'][1]:.2f}), {c['at_least_one']} at least one; by pixels "
            f"{p['both']} and {p['at_least_one']}")

