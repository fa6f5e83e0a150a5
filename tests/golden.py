"""The golden record of the embedded model: generated pixels and every method's top-20 for fixed queries.

``python tests/golden.py --write [--exact]`` pins the record for this machine kind (one thread, see below);
``tests/test_golden.py`` checks the code against it. A deliberate change of outputs (a new model, another
scan) re-pins it in the same commit, saying why.

Arithmetic is pinned at one torch thread: GEMM reductions may split differently with more threads, and
vector widths (AVX2 vs AVX-512) round differently, so the record names the machine kind it was made on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "golden"
TOP = 20
QUERIES = [  # name, prompt, seed, box (model pixels)
    ("red_apple", "red apple", 0, None),
    ("banana", "banana", 0, None),
    ("red_heart_box", "red heart", 0, (4.0, 4.0, 20.0, 20.0)),
]


def machine_kind() -> dict:
    """What decides float rounding here: architecture, CPU vendor, widest vector ISA, torch build."""
    from abu_explorer.machine import cpu_vendor, vector_isa

    isa = vector_isa().lower().replace("-", "")  # "avx512", "avx2" or the architecture
    return {"arch": platform.machine(), "vendor": cpu_vendor(), "isa": isa, "torch": torch.__version__,
            "threads": 1}


def kind_key(kind: dict) -> str:
    """``abu_explorer.machine.kind()`` (what the leave-K-out results are filed under) plus the thread count."""
    return f"{kind['arch']}-{kind['vendor']}-{kind['isa']}-torch{kind['torch']}-t{kind['threads']}"


def compute(modes=("fast",), progress=print, only: tuple[str, ...] = ()) -> dict:
    """The record for ``modes``: per query the generated pixels' hash and per (method, mode) the top-20
    (of the methods in ``only``, or all)."""
    from abu_explorer.attribution import METHODS, spec
    from abu_explorer.attribution import query as q
    from abu_explorer.model.embedded import Explorer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = Explorer.load(ROOT / "precomputed")
        methods = {m.name: spec(m.name).load(exp) for m in METHODS  # every method offered (the registry's)
                   if not only or m.name in only}
        moded = {m.name for m in METHODS if "exact" in m.modes}  # a fast and an exact mode; the others have one
        out = {}
        for name, prompt, seed, box in QUERIES:
            g = exp.generate(prompt, seed=seed)
            pixels = np.asarray(g.image, dtype=np.uint8)
            query = q.with_box(q.Query(g.latent, prompt, {"type": "generated", "seed": seed, "steps": 50,
                                                          "guidance": g.guidance}, g.image.width), box)
            rec = {"prompt": prompt, "seed": seed, "box": list(box) if box else None,
                   "pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "pixels": pixels, "rankings": {}}
            for m, method in methods.items():
                for mode in (modes if m in moded else ("fast",)):
                    if m not in moded and "fast" not in modes:
                        continue
                    r = method.score(query, mode)
                    rec["rankings"][f"{m}/{mode}"] = [[i, s] for i, s in r.top(TOP)]
                    progress(f"{name} {m}/{mode}: {r.seconds:.1f} s")
            out[name] = rec
        return out
    finally:
        torch.set_num_threads(threads)


def load() -> dict:
    path = GOLDEN / "embedded.json"
    return json.loads(path.read_text()) if path.exists() else {"kinds": {}}


def write(modes, only: tuple[str, ...] = ()) -> None:
    doc = load()
    kind = machine_kind()
    key = kind_key(kind)
    entry = doc["kinds"].setdefault(key, {"machine": kind, "queries": {}})
    for name, rec in compute(modes, only=only).items():
        pixels = rec.pop("pixels")
        png = GOLDEN / f"{name}.png"
        if not png.exists() or list(doc["kinds"]) == [key]:  # the only kind pinned: its pixels are the picture
            from PIL import Image

            Image.fromarray(pixels).save(png)
        old = entry["queries"].get(name, {"rankings": {}})
        rec["rankings"] = {**old["rankings"], **rec["rankings"]}
        entry["queries"][name] = rec
    tmp = GOLDEN / "embedded.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, GOLDEN / "embedded.json")
    print(f"pinned {key}: {', '.join(modes)}" + (f" of {', '.join(only)}" if only else ""))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", required=True)
    ap.add_argument("--exact", action="store_true", help="pin exact mode too (minutes)")
    ap.add_argument("--methods", default="", help="re-pin only these methods (comma-separated; default: all)")
    args = ap.parse_args()
    write(("fast", "exact") if args.exact else ("fast",), tuple(m for m in args.methods.split(",") if m))
