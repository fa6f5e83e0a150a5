"""``python -m abu_explorer bench model``: the embedded model's figures (docs/embedded-model.md), measured and printed, never assumed.

1. Quality: for evenly spaced training captions, one generated image each (seed = row index); CLIP
   retrieval of the true caption among all N captions (top-1 / top-10), next to the real images'.
2. Guidance sweep and, given ``--snapshots``, quality against UNet training time.
3. Speed: one image (50 DDIM steps, CFG batched), no-grad loss throughput at batch 256 (variants),
   training throughput and the implied retrain time of the shipped recipe.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.evaluation.stats import mcnemar_p, p_text
from abu_explorer.machine import cpu_name
from abu_explorer.model import components
from abu_explorer.model.embedded import Explorer
from abu_explorer.training import train


def ae_heldout_psnr(exp) -> float:
    """The autoencoder's reconstruction PSNR (dB) on the images its training held out, measured now."""
    images = exp.dataset.as_tensor()
    _, held = train.holdout_rows(len(images), exp.meta["autoencoder"]["recipe"]["extra"]["holdout_every"])
    return train.reconstruction_psnr(exp.vae, images[held])


@torch.inference_mode()
def clip_embed_images(exp: Explorer, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([exp.clip.encode_image(train.clip_preprocess(x), normalize=True) for x in images.split(256)])


@torch.inference_mode()
def caption_retrieval(exp: Explorer, images: torch.Tensor, true_rows: torch.Tensor) -> dict:
    """Rank of each image's true caption among all training captions under the project's CLIP."""
    ds = exp.dataset
    txt = exp.clip.encode_text(exp.tokenizer(ds.captions), normalize=True)
    sims = clip_embed_images(exp, images) @ txt.T
    true = sims[torch.arange(len(true_rows)), true_rows]
    rank = (sims > true[:, None]).sum(dim=1)  # 0 = best
    return {"top1": (rank < 1).float().mean().item(), "top10": (rank < 10).float().mean().item(),
            "median_rank": float(rank.median().item()), "n": len(true_rows), "ranks": rank.tolist()}


def eval_rows(n_train: int, count: int) -> list[int]:
    count = min(count, n_train)
    return [round(i * (n_train - 1) / max(1, count - 1)) for i in range(count)]


def generate_rows(exp: Explorer, rows: list[int], guidance: float | None = None, batch: int = 25,
                  steps: int = 50) -> torch.Tensor:
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        gens = exp.generate_batch([exp.dataset.captions[r] for r in chunk], chunk, steps=steps, guidance=guidance)
        out.append(torch.stack([_to_tensor(g.image) for g in gens]))
    return torch.cat(out)


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(img, dtype="uint8")).permute(2, 0, 1).float() / 127.5 - 1.0


def pixel_nn(exp: Explorer, images: torch.Tensor, true_rows: torch.Tensor) -> dict:
    """Is the generated image's nearest training image (L2 in pixels) the one its caption names? top-1 / top-5."""
    train_px = exp.dataset.as_tensor().flatten(1)
    dist = torch.cdist(images.flatten(1), train_px)  # (Q, N)
    true = dist[torch.arange(len(true_rows)), true_rows]
    rank = (dist < true[:, None]).sum(dim=1)
    return {"top1": (rank < 1).float().mean().item(), "top5": (rank < 5).float().mean().item(), "n": len(true_rows),
            "ranks": rank.tolist()}


def quality(exp: Explorer, count: int, guidance: float | None = None, steps: int = 50) -> dict:
    rows = eval_rows(len(exp.dataset), count)
    t0 = time.perf_counter()
    gen = generate_rows(exp, rows, guidance, steps=steps)
    seconds = time.perf_counter() - t0
    true = torch.tensor(rows)
    return {"generated": caption_retrieval(exp, gen, true),
            "real": caption_retrieval(exp, exp.dataset.as_tensor()[true], true),
            "pixel_nn": pixel_nn(exp, gen, true), "generation_seconds": seconds, "images": gen}


def _timeit(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def speed(exp: Explorer, recipe: train.StageConfig | None = None, steps: int = 50) -> dict:
    """One-image time, loss-scan throughput, and training throughput of ``recipe`` (default: the shipped one)."""
    unet, out = exp.unet, {}
    # 1. one image, 50 DDIM steps, CFG (two branches batched)
    times = _timeit(lambda: exp.generate("red apple", seed=0, steps=steps), 5)
    out["generate_1_image_50_steps_s"] = statistics.median(times)
    # 2. no-grad loss throughput at batch 256 (the AbU scan's inner loop)
    c, h = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(256, c, h, h, generator=g), torch.randn(256, c, h, h, generator=g)
    t = torch.randint(0, 1000, (256,), generator=g)
    ctx = exp.null_state.expand(256, -1, -1).contiguous()

    def loss_pass(channels_last: bool, mode: str):
        xin = exp.scheduler.add_noise(x, eps, t)
        if channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        ctxmgr = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
        with ctxmgr:
            return (unet(xin, t, ctx).sample - eps).pow(2).mean(dim=(1, 2, 3))

    for cl in (False, True):
        for mode in ("no_grad", "inference_mode"):
            if cl:
                unet.to(memory_format=torch.channels_last)
            secs = statistics.median(_timeit(lambda: loss_pass(cl, mode), 5))
            unet.to(memory_format=torch.contiguous_format)
            out[f"loss_throughput_{'channels_last' if cl else 'nchw'}_{mode}"] = 256 / secs
    # 3. training throughput, batch 128, and the retrain time it implies for the recipe
    recipe = recipe or train.UNET_RECIPE
    probe = components.build_unet(dict(unet.config))
    cache_lat = torch.randn(512, c, h, h, generator=g)
    states = exp.null_state.expand(512, -1, -1).contiguous()
    cfg = train.StageConfig(epochs=1, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=1, extra=recipe.extra)
    t0 = time.perf_counter()
    train.train_unet(probe, exp.scheduler, cache_lat, states, exp.null_state, cfg, progress=False)
    ips = 512 / (time.perf_counter() - t0)
    out["train_img_per_s"] = ips
    n = len(exp.dataset)
    out["retrain_estimate_min"] = recipe.epochs * n / ips / 60
    return out


def snapshot_curve(exp: Explorer, folder: Path, count: int) -> list[dict]:
    """``--snapshots``: the CLIP figures of each snapshot, in the rows ``bench/plots.py`` draws."""
    from abu_explorer.bench.curves import points

    return [{"epoch": p["epoch"], "train_minutes": p["train_minutes"], "top1": p["clip_top1"],
             "top10": p["clip_top10"]} for p in points(exp, folder, count)]


def main(args) -> dict:
    from abu_explorer.data.sheet import grid
    from abu_explorer.model.embedded import to_pil

    if args.curves:
        from abu_explorer.bench import curves

        report = curves.curves(args.curves, args.num_captions)
        if args.plot:
            curves.plot(report, Path(args.plot))
        if args.json:
            artifacts.save_json(Path(args.json), report)
        return report
    if args.compare:
        out = Path(args.grids) if args.grids else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        entries = dict.fromkeys([args.precomputed, *args.compare])  # in order, each once
        report = compare({e: load_entry(e) for e in entries}, args.num_captions, out, args.rounds)
        if args.json:
            artifacts.save_json(Path(args.json), report)
        return report
    exp = Explorer.load(args.precomputed)
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_at_start": os.getloadavg()[0],
              "params": {p: exp.meta[p]["params"] for p in ("autoencoder", "clip", "unet")},
              "autoencoder_heldout_psnr_db": ae_heldout_psnr(exp),
              "unet_train_minutes": exp.meta["unet"]["log"]["seconds"] / 60}
    print(f"CPU: {report['cpu']}, torch threads: {report['threads']}, load at start {report['load_avg_at_start']:.2f}")
    if not args.skip_quality:
        q = quality(exp, args.num_captions)
        report["quality"] = {k: v for k, v in q.items() if k != "images"}
        print(f"quality ({args.num_captions} training captions, guidance {exp_default_guidance()}):")
        print(f"  generated  top-1 {q['generated']['top1']:.3f}  top-10 {q['generated']['top10']:.3f}")
        print(f"  real       top-1 {q['real']['top1']:.3f}  top-10 {q['real']['top10']:.3f}")
        rows = eval_rows(len(exp.dataset), args.num_captions)[:60]
        artifacts.save_png(Path(args.precomputed).parent / "assets" / "samples.png",
                           grid(to_pil(q["images"][:60]), [exp.dataset.captions[r] for r in rows], cols=10, scale=3))
        sweep = {}
        for gscale in (1.0, 2.0, 3.0, 5.0, 8.0):
            sweep[gscale] = quality(exp, 100, gscale)["generated"]
            print(f"  guidance {gscale:4.1f}: top-1 {sweep[gscale]['top1']:.3f}  top-10 {sweep[gscale]['top10']:.3f}")
        report["guidance_sweep_100"] = sweep
    if args.snapshots:
        print("quality vs training time (100 captions):")
        report["snapshots"] = snapshot_curve(exp, Path(args.snapshots), 100)
    report["speed"] = speed(exp)
    for k, v in report["speed"].items():
        print(f"  {k}: {v:.2f}")
    if args.json:
        artifacts.save_json(Path(args.json), report)
    return report


def exp_default_guidance() -> float:
    from abu_explorer.model.embedded import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


def compare(entries: dict, count: int, out: Path | None, rounds: int = 2) -> dict:
    """Several models ({name: (Explorer, sampling steps, guidance)}) side by side in one run: quality on the same captions and seeds, then speed in
    interleaved rounds (A, B, A, B, ...; the median per model), so machine drift hits every model alike."""
    from abu_explorer.data.sheet import grid
    from abu_explorer.model.embedded import to_pil

    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_at_start": os.getloadavg()[0], "num_captions": count, "models": {}}
    for name, (exp, steps, guidance) in entries.items():
        q = quality(exp, count, guidance, steps=steps)
        meta = exp.meta
        report["models"][name] = {
            "clip_top1": q["generated"]["top1"], "clip_top10": q["generated"]["top10"],
            "pixel_nn_top1": q["pixel_nn"]["top1"], "pixel_nn_top5": q["pixel_nn"]["top5"],
            "ae_heldout_psnr_db": ae_heldout_psnr(exp),
            "recipe": meta["unet"]["recipe"], "sampler": exp.sampler, "steps": steps, "guidance": guidance, "speed_rounds": [],
            "clip_ranks": q["generated"]["ranks"], "pixel_nn_ranks": q["pixel_nn"]["ranks"]}
        if out is not None:
            rows = eval_rows(len(exp.dataset), count)[:60]
            artifacts.save_png(
                out / f"samples_{list(entries).index(name)}_{_label(Path(name.partition('@')[0]))}"
                      f"{name.partition('@')[2].replace(':', '-')}.png",  # numbered: two folders may share a name
                grid(to_pil(q["images"][:60]), [exp.dataset.captions[r] for r in rows], cols=10, scale=3))
        print(f"{name}: CLIP top-1/10 {q['generated']['top1']:.3f}/{q['generated']['top10']:.3f}  pixel-NN "
              f"top-1/5 {q['pixel_nn']['top1']:.3f}/{q['pixel_nn']['top5']:.3f}", flush=True)
    for _ in range(rounds):
        for name, (exp, steps, _) in entries.items():
            recipe = train.StageConfig(**exp.meta["unet"]["recipe"])
            report["models"][name]["speed_rounds"].append(speed(exp, recipe, steps))
    for name, row in report["models"].items():
        for key in ("generate_1_image_50_steps_s", "train_img_per_s", "retrain_estimate_min"):
            if row["speed_rounds"]:  # rounds = 0: quality only (e.g. beside another job)
                row[key] = statistics.median(r[key] for r in row["speed_rounds"])
    report["paired"] = paired_tests(report)
    print(compare_table(report))
    for row in report["paired"]:
        print(f"  {row['model']} vs {row['baseline']}, {row['figure']}: {row['difference']:+.3f} "
              f"({row['wins']} captions gained, {row['losses']} lost; McNemar exact {p_text(row['p'])})")
    return report


def paired_tests(report: dict) -> list[dict]:
    """Every model against the first, caption by caption (same captions and seeds): hit-rate differences."""
    names = list(report["models"])
    base = report["models"][names[0]]
    out = []
    for name in names[1:]:
        row = report["models"][name]
        for figure, key, k in (("CLIP top-10", "clip_ranks", 10), ("pixel-NN top-1", "pixel_nn_ranks", 1),
                               ("pixel-NN top-5", "pixel_nn_ranks", 5)):
            a = [r < k for r in base[key]]
            b = [r < k for r in row[key]]
            wins = sum(1 for x, y in zip(a, b) if y and not x)
            losses = sum(1 for x, y in zip(a, b) if x and not y)
            out.append({"model": name, "baseline": names[0], "figure": figure, "difference": (wins - losses) / len(a),
                        "wins": wins, "losses": losses, "p": mcnemar_p(wins, losses)})
    return out


def load_entry(entry: str) -> tuple[Explorer, int, float | None]:
    """``FOLDER`` (DDIM, 50 steps, default guidance) or ``FOLDER@SAMPLER:STEPS[:GUIDANCE]``, e.g.
    ``precomputed@dpmpp:10`` or ``precomputed@ddim:50:5`` -> (model, steps, guidance or None)."""
    from abu_explorer.model.components import SAMPLERS

    folder, _, how = entry.partition("@")
    parts = (how or "ddim:50").split(":")
    try:
        sampler, steps = parts[0], int(parts[1])
        guidance = float(parts[2]) if len(parts) > 2 else None
    except (IndexError, ValueError):
        sampler = None
    if sampler not in SAMPLERS or len(parts) > 3:
        raise ValueError(f"{entry!r}: expected FOLDER@SAMPLER:STEPS[:GUIDANCE] with SAMPLER in {', '.join(SAMPLERS)}")
    exp = Explorer.load(folder)
    exp.sampler = sampler
    return exp, steps, guidance


def _label(folder: Path) -> str:
    """A model folder's short name: its own, or its parent's when it is called ``model``."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" else folder.name


def compare_table(report: dict) -> str:
    names = list(report["models"])
    figures = [("CLIP caption retrieval top-1", "clip_top1", "{:.3f}"), ("CLIP top-10", "clip_top10", "{:.3f}"),
               ("pixel-NN top-1", "pixel_nn_top1", "{:.3f}"), ("pixel-NN top-5", "pixel_nn_top5", "{:.3f}"),
               ("AE held-out PSNR (dB)", "ae_heldout_psnr_db", "{:.1f}"),
               ("one image (s)", "generate_1_image_50_steps_s", "{:.3f}"),
               ("UNet training (img/s)", "train_img_per_s", "{:.0f}"),
               ("implied retrain (min)", "retrain_estimate_min", "{:.1f}")]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in figures:
        vals = [report["models"][n].get(key) for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")
    return "\n".join(lines)
