"""What a researcher takes away from one query: every shown method's ranking as JSON and CSV (with the
method's settings and the model's hashes), and how much the methods agree (shared images in every pair's top K)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from abu_explorer import artifacts


def overlap_at_k(tops: dict[str, list[int]]) -> tuple[int, dict[tuple[str, str], float]]:
    """(K, {(a, b): shared indices / K}) for every ordered pair of methods' top-K index lists (K: the shortest)."""
    k = min(len(v) for v in tops.values())
    return k, {(a, b): len(set(tops[a][:k]) & set(tops[b][:k])) / max(1, k) for a in tops for b in tops if a != b}


def agreement(results: list[dict]) -> str:
    """Markdown: how many training images each pair of methods' top K share (one triangle of the symmetric
    matrix; columns numbered so that ten methods fit beside the galleries)."""
    results = [r for r in results if r]
    if len(results) < 2:
        return ""
    tops = {r["method"]: [x["index"] for x in r["results"]] for r in results}
    names = list(tops)
    k, overlap = overlap_at_k(tops)
    lines = [f"**Agreement**: training images shared by each pair's top {k} ({k} = the same set)", "",
             "| | " + " | ".join(str(j + 1) for j in range(len(names))) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = [str(round(overlap[(a, b)] * k)) if j < i else "·" if j == i else "" for j, b in enumerate(names)]
        lines.append(f"| {i + 1} {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_rankings(results: list[dict], model: dict, settings: dict, folder: Path) -> tuple[Path, Path]:
    """``rankings.json`` (query, model hashes, per method: mode, settings, ranking) and ``rankings.csv``
    (method, rank, index, caption, score) in ``folder``; returns their paths."""
    results = [r for r in results if r]
    if not results:
        raise ValueError("nothing to download yet: attribute first")
    doc = {"query": results[0]["query"], "model": model,
           "methods": {r["method"]: {"label": r.get("label", r["method"]), "mode": r["mode"],
                                     "settings": settings.get(r["method"], {}), "results": r["results"]}
                       for r in results}}
    folder = Path(folder)
    artifacts.save_json(folder / "rankings.json", doc)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "mode", "rank", "index", "caption", "score"])
    for r in results:
        for x in r["results"]:
            writer.writerow([r["method"], r["mode"], x["rank"], x["index"], x["caption"], repr(x["score"])])
    artifacts.save_text(folder / "rankings.csv", buf.getvalue())
    return folder / "rankings.json", folder / "rankings.csv"
