"""IF's directional derivatives grad L(z) . v: the central difference at several steps against the gradient table.

    PYTHONPATH=. python scripts/if_difference_vs_table.py [--concept c00] [--rows 2015,448,1292] [--threads 1]

On the customized model of ``--concept`` (built under runs/customized/ if missing; its first prompt, seed 0),
prints each row's value by the central difference at fd_step 1e-2 (the default), 3e-3 and 1e-3, and from the
per-row gradient table (exact up to float rounding). The table is deleted afterwards.
"""
import argparse
import dataclasses
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="c00")
    ap.add_argument("--rows", default="2015,448,1292")
    ap.add_argument("--work", default="runs/customized/if_check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from abu_explorer.attribution import gradient_table, spec
    from abu_explorer.attribution import query as q
    from abu_explorer.attribution.influence import directional_derivatives, inverse_hvp, query_gradient
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.model import load

    base = load("precomputed")
    concept = next(c for c in cz.load_concepts() if c["id"] == args.concept)
    custom = cz.model_for(base, concept, Path(args.work))
    cz.prepare_tables(custom, base, ["if"])  # the base model's EK-FAC factors, as the benchmark uses them
    method = spec("if").load(custom, exact_scan="gradients")
    prompt = cz.prompts(concept)[0]
    query = q.from_generation(custom, prompt, cz.QUERY_SEED)
    v = inverse_hvp(query_gradient(custom, query, method.cfg), method.factors, custom.unet, method.cfg)
    rows = torch.tensor([int(r) for r in args.rows.split(",")])
    print(f"{args.concept} {prompt!r}, rows {rows.tolist()}")
    for step in (1e-2, 3e-3, 1e-3):
        cfg = dataclasses.replace(method.cfg, fd_step=step)
        values = directional_derivatives(custom, method.cache, v, rows, cfg)
        print(f"  central difference, fd_step {step:g}: " + ", ".join(f"{x:.3f}" for x in values.tolist()))
    try:
        method.prepare_exact()
        values = gradient_table.directional_derivatives(method._table, v, rows)[:, 0]
        print("  gradient table:                   " + ", ".join(f"{x:.3f}" for x in values.tolist()))
    finally:
        method.discard_exact()


if __name__ == "__main__":
    main()
