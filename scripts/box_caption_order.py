"""Is AbU's box ranking driven by the box or by the caption's word order? For the first P pairs of the box
benchmark's rule (halves layout), rank with AbU (fast mode) under "A and B" and under "B and A", each with the
box over A and over B, and print where A and B land (1 = top).

    PYTHONPATH=. python scripts/box_caption_order.py --pairs 6 [--mode exact] [--selection attn --tables DIR]

``--selection attn --tables DIR`` unlearns every attention projection instead of the cross-attention K/V: its
Fisher and base losses are built into DIR first (a few minutes), never into the shipped ``precomputed/abu``.
"""
import argparse
import json

import torch

from abu_explorer.attribution import query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.evaluation import boxes
from abu_explorer.model import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--selection", default="cross-attn")
    ap.add_argument("--tables", default=None, help="AbU tables of --selection (built here when missing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precomputed", default="precomputed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exp = load(args.precomputed)
    ds = exp.dataset
    if args.selection != "cross-attn" and not args.tables:
        raise SystemExit("--selection other than cross-attn needs --tables DIR (its own Fisher and base losses)")
    if args.tables:
        from abu_explorer.attribution.abu_precompute import AbUConfig, precompute

        precompute(exp, AbUConfig(selection=args.selection), args.tables, progress=True)  # resumes; no-op if built
    abu = AbU.load(exp, args.tables)
    for a, b in boxes.choose_pairs(exp, args.pairs):
        img, parts = boxes.composite(ds, a, b, "halves")
        for first, second in ((a, b), (b, a)):
            caption = f"{ds.captions[first]} and {ds.captions[second]}"
            ranks = {}
            for box, own, _ in parts:
                order = abu.score(q.from_image(exp, img, caption, box), args.mode).order.tolist()
                ranks["box over " + ("A" if own == a else "B")] = {"A": order.index(a) + 1, "B": order.index(b) + 1}
            print(json.dumps({"A": a, "B": b, "caption": caption, "named_first": "A" if first == a else "B", **ranks}),
                  flush=True)


if __name__ == "__main__":
    main()
