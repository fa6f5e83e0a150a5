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
from abu_explorer.machine import cpu_name
from abu_explorer.model import components
from abu_explorer.model.embedded import Explorer
from abu_explorer.training import train


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
            "median_rank": float(rank.median().item()), "n": len(true_rows)}


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

    return torch.from_numpy(np.asarray(img, dtype="uint8")).permute(2, 0, 1).float() / 127.5 - 1.0


def quality(exp: Explorer, count: int, guidance: float | None = None) -> dict:
    rows = eval_rows(len(exp.dataset), count)
    t0 = time.perf_counter()
    gen = generate_rows(exp, rows, guidance)
    seconds = time.perf_counter() - t0
    true = torch.tensor(rows)
    return {"generated": caption_retrieval(exp, gen, true),
            "real": caption_retrieval(exp, exp.dataset.as_tensor()[true], true),
            "generation_seconds": seconds, "images": gen}


def _timeit(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def speed(exp: Explorer) -> dict:
    unet, out = exp.unet, {}
    # 1. one image, 50 DDIM steps, CFG (two branches batched)
    times = _timeit(lambda: exp.generate("red apple", seed=0, steps=50), 5)
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
    # 3. training throughput, batch 128, and the retrain time it implies for the shipped recipe
    recipe = train.UNET_RECIPE
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
    rows = []
    base = {k: v.clone() for k, v in exp.unet.state_dict().items()}
    for path in sorted(Path(folder).glob("epoch*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        exp.unet.load_state_dict(artifacts.load_safetensors(path))
        q = quality(exp, count)
        rows.append({"epoch": int(meta["epoch"]), "train_minutes": float(meta["seconds"]) / 60,
                     "top1": q["generated"]["top1"], "top10": q["generated"]["top10"]})
        print(f"  epoch {rows[-1]['epoch']:4d}  {rows[-1]['train_minutes']:6.1f} min  "
              f"top-1 {rows[-1]['top1']:.3f}  top-10 {rows[-1]['top10']:.3f}", flush=True)
    exp.unet.load_state_dict(base)
    return rows


def main(args) -> dict:
    from abu_explorer.data.sheet import grid
    from abu_explorer.model.embedded import to_pil

    exp = Explorer.load(args.model)
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_at_start": os.getloadavg()[0],
              "params": {p: exp.meta[p]["params"] for p in ("autoencoder", "clip", "unet")},
              "autoencoder_heldout_psnr_db": exp.meta["autoencoder"]["log"].get("heldout_psnr_db"),
              "unet_train_minutes": exp.meta["unet"]["log"]["seconds"] / 60}
    print(f"CPU: {report['cpu']}, torch threads: {report['threads']}, load at start {report['load_avg_at_start']:.2f}")
    if not args.skip_quality:
        q = quality(exp, args.num_captions)
        report["quality"] = {k: v for k, v in q.items() if k != "images"}
        print(f"quality ({args.num_captions} training captions, guidance {exp_default_guidance()}):")
        print(f"  generated  top-1 {q['generated']['top1']:.3f}  top-10 {q['generated']['top10']:.3f}")
        print(f"  real       top-1 {q['real']['top1']:.3f}  top-10 {q['real']['top10']:.3f}")
        rows = eval_rows(len(exp.dataset), args.num_captions)[:60]
        grid(to_pil(q["images"][:60]), [exp.dataset.captions[r] for r in rows], cols=10, scale=3).save(
            Path(args.model).parent / "assets" / "samples.png")
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
