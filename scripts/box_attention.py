"""Does the embedded model bind each half of a two-concept composite to its own words?

For the box benchmark's halves composites ("<A> and <B>", A left, B right; the 40 pairs of
``evaluate boxes``), read every cross-attention map of the UNet at a few timesteps (fixed noise) and measure,
per spatial position, the share of the attention that goes to A's word tokens among A's and B's:

    pA(left) - pA(right)   binding: 1 = the left half attends only to A and the right only to B, 0 = no binding
    pA(all)                first-named share: 0.5 = both concepts alike, 1 = the whole image reads A
    spread                 how much the attention over all tokens varies with position (0 = not at all)

and, from the text encoder alone, how close each concept's word states in "<A> and <B>" are to the same words'
states in its own caption (mean cosine over the words): the rows' K/V respond to the query through such states.

A box-masked loss can only tell the halves apart through what differs between them; where the model does not
bind regions to words, unlearning either half moves the same words' K/V. Prints per timestep the mean over
composites with a bootstrap 95% interval; ``--json`` saves everything.

    PYTHONPATH=. python scripts/box_attention.py [--pairs 40] [--json assets/benchmarks/box_attention.json]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from abu_explorer.attribution import query as q
from abu_explorer.evaluation import boxes
from abu_explorer.evaluation.stats import bootstrap_ci
from abu_explorer.model.embedded import Explorer
from abu_explorer.model.tokenizer import split_words

TIMESTEPS = (100, 300, 500, 700, 900)


def attention_maps(unet, latent, t, noise, ctx, scheduler) -> list[torch.Tensor]:
    """Every cross-attention's probabilities, (heads, positions, tokens), for one noisy latent."""
    named = dict(unet.named_modules())
    layers = [n for n in named if n.endswith("attn2")]
    outs: dict[str, dict] = {n: {} for n in layers}
    hooks = []
    for n in layers:
        for part in ("to_q", "to_k"):
            hooks.append(named[f"{n}.{part}"].register_forward_hook(
                lambda mod, inp, out, n=n, part=part: outs[n].__setitem__(part, out.detach())))
    try:
        with torch.no_grad():
            noisy = scheduler.add_noise(latent[None], noise[None], torch.tensor([t]))
            unet(noisy, torch.tensor([t]), ctx)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for n in layers:
        heads = named[n].heads
        qh = outs[n]["to_q"][0].unflatten(-1, (heads, -1)).transpose(0, 1)  # (H, P, d)
        kh = outs[n]["to_k"][0].unflatten(-1, (heads, -1)).transpose(0, 1)  # (H, T, d)
        maps.append(torch.softmax(qh @ kh.transpose(1, 2) * named[n].scale, dim=-1))
    return maps


def spread(maps: list[torch.Tensor]) -> float:
    """How much the attention over all tokens varies with position: the mean total-variation distance between a
    position's distribution and the image's mean one (0 = every position attends alike), over layers and heads."""
    return float(np.mean([float(0.5 * (m - m.mean(1, keepdim=True)).abs().sum(-1).mean()) for m in maps]))


def shares(maps: list[torch.Tensor], a_tokens: list[int], b_tokens: list[int]) -> tuple[float, float, float]:
    """pA over the left half, the right half and the whole image, averaged over layers and heads."""
    left, right, whole = [], [], []
    for m in maps:
        side = int(math.isqrt(m.shape[1]))
        ma, mb = m[..., a_tokens].sum(-1), m[..., b_tokens].sum(-1)  # (H, P)
        pa = (ma / (ma + mb).clamp(min=1e-12)).reshape(m.shape[0], side, side)
        left.append(float(pa[:, :, : side // 2].mean()))
        right.append(float(pa[:, :, side // 2:].mean()))
        whole.append(float(pa.mean()))
    return float(np.mean(left)), float(np.mean(right)), float(np.mean(whole))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    exp = Explorer.load("precomputed")
    ds = exp.dataset
    rows, states = [], []
    for a, b in boxes.choose_pairs(exp, args.pairs):
        img, _ = boxes.composite(ds, a, b, "halves")
        caption = boxes.caption(ds, a, b)
        latent = q.from_image(exp, img, caption).latent
        n_a, n_b = len(split_words(ds.captions[a])), len(split_words(ds.captions[b]))
        a_tok, b_tok = list(range(1, 1 + n_a)), list(range(2 + n_a, 2 + n_a + n_b))  # <sot> A and B <eot>
        assert split_words(caption)[n_a] == "and"
        ctx = exp.encode_text([caption])
        own_a, own_b = exp.encode_text([ds.captions[a]])[0], exp.encode_text([ds.captions[b]])[0]
        cos = torch.nn.functional.cosine_similarity
        states.append({"pair": [a, b], "cos_A": float(cos(ctx[0, a_tok], own_a[1:1 + n_a], dim=-1).mean()),
                       "cos_B": float(cos(ctx[0, b_tok], own_b[1:1 + n_b], dim=-1).mean())})
        gen = torch.Generator().manual_seed(a * 10_007 + b)
        for t in TIMESTEPS:
            noise = torch.randn(latent.shape, generator=gen)
            maps = attention_maps(exp.unet, latent, t, noise, ctx, exp.scheduler)
            left, right, whole = shares(maps, a_tok, b_tok)
            rows.append({"pair": [a, b], "t": t, "pA_left": left, "pA_right": right, "pA_all": whole,
                         "spread": spread(maps)})
    print(f"{args.pairs} halves composites, caption '<A> and <B>', pA = attention share of A's words among A's and B's")
    print("| t | binding pA(left) - pA(right), 95% CI | first-named share pA(all), 95% CI | spatial spread |")
    print("|---|---|---|---|")
    summary = {}
    for t in (*TIMESTEPS, "all"):
        sel = [r for r in rows if t == "all" or r["t"] == t]
        by_pair: dict = {}
        for r in sel:  # one value per composite (mean over its timesteps for "all")
            by_pair.setdefault(tuple(r["pair"]), []).append(r)
        bind = [float(np.mean([r["pA_left"] - r["pA_right"] for r in v])) for v in by_pair.values()]
        first = [float(np.mean([r["pA_all"] for r in v])) for v in by_pair.values()]
        summary[str(t)] = {"binding": float(np.mean(bind)), "binding_ci95": list(bootstrap_ci(bind)),
                           "first_named": float(np.mean(first)), "first_named_ci95": list(bootstrap_ci(first)),
                           "spread": float(np.mean([r["spread"] for r in sel]))}
        s = summary[str(t)]
        print(f"| {t} | {s['binding']:+.3f} [{s['binding_ci95'][0]:+.3f}, {s['binding_ci95'][1]:+.3f}] | "
              f"{s['first_named']:.3f} [{s['first_named_ci95'][0]:.3f}, {s['first_named_ci95'][1]:.3f}] | "
              f"{s['spread']:.3f} |")
    for name in ("cos_A", "cos_B"):
        vals = [r[name] for r in states]
        lo, hi = bootstrap_ci(vals)
        summary[name] = {"mean": float(np.mean(vals)), "ci95": [lo, hi]}
        print(f"{name[-1]}'s word states in '<A> and <B>' vs in its own caption: mean cosine "
              f"{np.mean(vals):.3f} [{lo:.3f}, {hi:.3f}]")
    diff = [r["cos_A"] - r["cos_B"] for r in states]
    summary["cos_A_minus_B"] = {"mean": float(np.mean(diff)), "ci95": list(bootstrap_ci(diff)),
                                "a_higher": int(sum(d > 0 for d in diff))}
    lo, hi = bootstrap_ci(diff)
    print(f"A minus B: {np.mean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}], A higher in "
          f"{summary['cos_A_minus_B']['a_higher']} of {len(diff)}")
    if args.json:
        from pathlib import Path

        from abu_explorer import artifacts

        artifacts.save_json(Path(args.json), {"command": "PYTHONPATH=. python scripts/box_attention.py",
                                              "timesteps": list(TIMESTEPS), "summary": summary, "rows": rows,
                                              "states": states})


if __name__ == "__main__":
    main()
