"""``python -m abu_explorer evaluate boxes``: does a box attribute what is inside it? Two-concept composites of
training images, so that each part has a known source.

# Protocol (fixed before any attribution was seen)
- Pairs: a permutation of the training rows by ``numpy.random.default_rng(PAIR_SEED)``, taken two at a time:
  pair j = (A, B). A pair is skipped when its two images are near-duplicates (cosine similarity of their
  white-centred pixels > ``NEAR_DUPLICATE``) or when "A's caption and B's caption" does not fit the text
  encoder; the first ``pairs`` pairs kept are the benchmark.
- Layouts, on a white square of the model's size (s, the image side; every placement area-resized):
    halves    A in the left half, B in the right half (each s/2 x s/2, vertically centred); boxes: the halves;
    quadrants A in the top-left quadrant, B in the bottom-right one; boxes: those quadrants;
    pasted    A fills the image, B (3/8 of the side) is pasted over its bottom-right corner; boxes: B's patch,
              and the top-left quadrant for A (B's patch does not reach it).
- Each composite is an upload query captioned "<caption A> and <caption B>" (the AbU paper's own local-attribution
  use); each of its two boxes is one query, whose *own* source is the image inside the box and the *other*
  the other one.
- Per method (exact mode where it has one; ``--mode fast`` for a quick look, recorded) and layout: the share of
  boxes whose own source scores above the other (with a 95% Clopper-Pearson interval), and the mean rank of
  the own source among N (1 = top); and how much the box moves the ranking at all: the Spearman correlation
  between the rankings of a composite's two boxes (1 = the box changes nothing). Between two methods: an exact
  McNemar test on the boxes where one wins and the other does not.
Results are kept per (method, its settings, mode, model, protocol) and box, so a run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from abu_explorer import artifacts

PAIR_SEED, NEAR_DUPLICATE = 2026, 0.9
LAYOUTS = ("halves", "quadrants", "pasted")


def protocol(explorer, pairs: int) -> dict:
    return {"pairs": pairs, "pair_seed": PAIR_SEED, "near_duplicate": NEAR_DUPLICATE, "layouts": list(LAYOUTS),
            "data_hash": explorer.provenance()["data_hash"], "image_size": explorer.image_size}


def choose_pairs(explorer, count: int) -> list[tuple[int, int]]:
    """The first ``count`` pairs kept by the rule above."""
    from abu_explorer.model.tokenizer import PromptError

    ds = explorer.dataset
    order = np.random.default_rng(PAIR_SEED).permutation(len(ds))
    chosen = []
    for j in range(len(order) // 2):
        a, b = int(order[2 * j]), int(order[2 * j + 1])
        pa, pb = _pixels(ds, a), _pixels(ds, b)
        if float(pa @ pb) > NEAR_DUPLICATE:
            continue
        try:
            explorer.check_prompt(caption(ds, a, b))
        except (PromptError, ValueError):
            continue
        chosen.append((a, b))
        if len(chosen) == count:
            return chosen
    raise ValueError(f"only {len(chosen)} pairs pass the rule; ask for fewer")


def caption(ds, a: int, b: int) -> str:
    return f"{ds.captions[a]} and {ds.captions[b]}"


def _pixels(ds, i: int) -> np.ndarray:
    v = np.asarray(ds.images[i], dtype=np.float64).ravel() / 127.5 - 2.0  # white -> 0
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def composite(ds, a: int, b: int, layout: str) -> tuple[Image.Image, list[tuple[tuple, int, int]]]:
    """The composite image and its boxes as (box (x0, y0, x1, y1), own row, other row)."""
    s = ds.config.image_size
    img = Image.new("RGB", (s, s), (255, 255, 255))
    A, B = ds.image(a), ds.image(b)
    h, q = s // 2, s // 4
    if layout == "halves":
        img.paste(A.resize((h, h), Image.Resampling.BOX), (0, q))
        img.paste(B.resize((h, h), Image.Resampling.BOX), (h, q))
        boxes = [((0, 0, h, s), a, b), ((h, 0, s, s), b, a)]
    elif layout == "quadrants":
        img.paste(A.resize((h, h), Image.Resampling.BOX), (0, 0))
        img.paste(B.resize((h, h), Image.Resampling.BOX), (h, h))
        boxes = [((0, 0, h, h), a, b), ((h, h, s, s), b, a)]
    elif layout == "pasted":
        p = 3 * s // 8
        img.paste(A, (0, 0))
        img.paste(B.resize((p, p), Image.Resampling.BOX), (s - p, s - p))
        boxes = [((0, 0, h, h), a, b), ((s - p, s - p, s, s), b, a)]
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    return img, [(tuple(float(v) for v in box), own, other) for box, own, other in boxes]


def box_result(scores: np.ndarray, own: int, other: int) -> dict:
    """Own source above the other? Its rank among N (1 = top; ties count against it)."""
    return {"own_wins": bool(scores[own] > scores[other]), "own_rank": int((scores >= scores[own]).sum()),
            "other_rank": int((scores >= scores[other]).sum()), "own_score": float(scores[own]),
            "other_score": float(scores[other])}


def key_of(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def run_method(explorer, name: str, pairs: list[tuple[int, int]], layouts: list[str], mode: str, folder: Path,
               progress: bool = True, options: dict | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Every box of every composite ranked by one method (loaded with ``options``); cached box by box under the
    method's settings. ``shard`` = (i, n): only composites i, i + n, ... of the list; n processes with different
    i fill one results file together (each composite merged into it under a lock)."""
    from tqdm.auto import tqdm

    from abu_explorer.attribution import query as q
    from abu_explorer.attribution import spec

    ranker = spec(name).load(explorer, **(options or {}))
    mode = mode if mode in spec(name).modes else ""
    settings = {"method": name, "mode": mode, **ranker.settings(), "model": explorer.provenance()}
    path = folder / f"{name}-{key_of(settings)}.json"
    keep_scores = mode == "exact" and name in ("abu", "abuplus")
    ds = explorer.dataset
    todo = [(a, b, lay) for a, b in pairs for lay in layouts]
    for a, b, lay in tqdm(todo[shard[0]::shard[1]], desc=f"{name} composites", disable=not progress):
        ids = [f"{a}-{b}-{lay}-{i}" for i in range(2)]
        if all(k in _filed(path, settings)["boxes"] for k in ids):
            continue
        img, parts = composite(ds, a, b, lay)
        scores, new = [], {}
        for box_id, (box, own, other) in zip(ids, parts):
            query = q.from_image(explorer, img, caption(ds, a, b), box)
            scores.append(ranker.score(query, mode).scores.numpy())
            new[box_id] = {"pair": [a, b], "layout": lay, "box": list(box), "own": own, "other": other,
                           **box_result(scores[-1], own, other)}
            if keep_scores:  # every row's score: what a box contrast's ranks are computed from
                artifacts.save_npy(path.with_suffix("") / f"{box_id}.npy", scores[-1].astype(np.float64))
                new[box_id]["scores_file"] = f"{path.stem}/{box_id}.npy"
        agreement = spearman(scores[0], scores[1])  # does the box change the ranking at all?
        for entry in new.values():
            entry["boxes_spearman"] = agreement
        with artifacts.locked(path):  # atomic, after every composite: an interrupted run resumes here
            doc = _filed(path, settings)
            doc["boxes"].update(new)
            artifacts.save_json(path, doc)
    wanted = {f"{a}-{b}-{lay}-{i}" for a, b, lay in todo for i in range(2)}
    return [r for k, r in _filed(path, settings)["boxes"].items() if k in wanted]


def _filed(path: Path, settings: dict) -> dict:
    return artifacts.load_json(path) if path.exists() else {"settings": settings, "boxes": {}}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation of two score vectors (ties by average rank)."""
    from abu_explorer.evaluation.lds import spearman as rank_corr

    return rank_corr(np.asarray(x, float), np.asarray(y, float))


def pair_contrast(rows: list[dict], folder: Path | None = None, layout: str = "halves",
                  scaled: bool = False) -> list[dict]:
    """The two boxes of each composite contrasted, from a plain run's exact scores: c(X) = tau_A(X) - tau_B(X).
    Box A's own source wins iff c(A) > c(B); box B's contrast is -c and wins under the same condition, so one entry
    per composite. On halves this *is* AbU's box contrast (the rest of a half is exactly the other half); on the
    other layouts it contrasts the two boxes, not a box and its rest. ``scaled``: each box's scores over their
    median |tau| first (``abu.on_one_scale``; needs every row's scores). Where the run saved every row's scores
    (files relative to ``folder``), also the own sources' ranks among N under the contrast."""
    by_pair = {}
    for r in rows:
        if r["layout"] == layout and "own_score" in r:
            by_pair.setdefault(tuple(r["pair"]), {})[r["own"]] = r
    out = []
    for (a, b), boxes_ in by_pair.items():
        if a not in boxes_ or b not in boxes_:
            continue
        box_a, box_b = boxes_[a], boxes_[b]
        files = [Path(folder or ".") / x["scores_file"] for x in (box_a, box_b) if "scores_file" in x]
        have = folder is not None and len(files) == 2 and all(f.exists() for f in files)
        if scaled and not have:
            continue
        entry = {"pair": [a, b], "plain_wins": [box_a["own_wins"], box_b["own_wins"]]}
        if have:
            ta, tb = (artifacts.load_npy(f) for f in files)
            if scaled:
                ta, tb = on_one_scale(ta), on_one_scale(tb)
            c = ta - tb
            entry.update(margin=float(c[a] - c[b]), own_ranks=[int((c >= c[a]).sum()), int((-c >= -c[b]).sum())])
        else:
            entry["margin"] = (box_a["own_score"] - box_b["other_score"]) - (box_a["other_score"] - box_b["own_score"])
        entry["own_wins"] = bool(entry["margin"] > 0)
        out.append(entry)
    return out


def on_one_scale(t: np.ndarray) -> np.ndarray:
    """``abu.on_one_scale`` (the option's own scale) on a numpy score vector."""
    import torch

    from abu_explorer.attribution.abu import on_one_scale as scale

    return scale(torch.from_numpy(np.asarray(t))).numpy()
