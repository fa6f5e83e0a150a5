"""``python -m abu_explorer bench scale``: what precompute and a query cost as N grows, measured on this machine
and projected to MSCOCO (118k images, 5 captions each) and a LAION subset (100k images, 1 caption each).

1. Sizes: bytes per image of every table that grows with N, at three model shapes (from their configs), and
   the totals at N = 100k and 118k.
2. Stages on the embedded model: seconds per image of each precompute stage on ``--rows`` training rows.
3. The loss scan (AbU's base losses, and every exact query) over N = 500 ... 4,000 rows, one run each, with
   a least-squares line; rows past the training set repeat it (the cost of a row does not depend on which).
4. Denoisers of the two scale models with random weights (nothing downloaded): the AbU paper's MSCOCO
   UNet (16 x 16 x 4 latents, 77 x 1024 text states) and Stable Diffusion 1.x's (64 x 64 x 4, 77 x 768):
   seconds per forward item and per K/V-gradient item, and FLOPs per forward item (torch's FLOP counter).
5. Projections: hours of each stage = items x seconds per item on this CPU; on a GPU by FLOPs at an assumed
   sustained rate (``--gpu-tflops``; an assumption, printed as such, never a measurement).
"""
from __future__ import annotations

import time

import numpy as np
import torch

# the AbU paper's MSCOCO denoiser (its repository's create_model(sample_size=128)) and SD 1.x's
MSCOCO_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(128, 256, 256, 256), cross_attention_dim=1024, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# (name, image side, latent (C, h, w), text tokens x width, captions per image, N, UNet config)
SCALES = [("MSCOCO 118k, AbU paper's LDM", 128, (4, 16, 16), (77, 1024), 5, 118_287, MSCOCO_UNET),
          ("LAION 100k, SD 1.x", 512, (4, 64, 64), (77, 768), 1, 100_000, SD1_UNET)]
TIMESTEPS, FISHER_PASSES, IF_DRAWS, PROJ_DIM = 10, 5, 2, 1024  # the methods' defaults


def table_bytes(side: int, latent: tuple, text: tuple, captions: int, clip_dim: int, flips: int = 1) -> dict:
    """Bytes per image of each table that grows with N (float32 unless said), and where it lives."""
    return {
        "rendered images, uint8 (disk, mapped)": side * side * 3,
        "latents (disk, mapped)": 4 * flips * int(np.prod(latent)),
        "text states (disk, mapped)": 4 * captions * text[0] * text[1],
        "D-TRAK / TRAK features, fp16 (disk, mapped)": 2 * PROJ_DIM,
        "base losses (RAM)": 4 * captions * flips * TIMESTEPS,
        "pixel NN index (RAM)": 4 * 3 * min(side, 64) ** 2 * flips,
        "CLIP NN index (RAM)": 4 * clip_dim * flips,
    }


def sizes(exp) -> list[dict]:
    """Bytes per image of each N-sized table at the embedded, the MSCOCO and the SD 1.x shapes."""
    cache = exp.training_cache()
    clip_dim = exp.clip.visual.output_dim if hasattr(exp.clip.visual, "output_dim") else 128
    shapes = [("embedded", exp.image_size, tuple(cache.latents.shape[1:]), tuple(cache.text_states.shape[1:]), 1,
               clip_dim)]
    shapes += [(name.split(", ")[1] + " (CLIP NN: a 512-d open_clip)", side, lat, text, caps, 512)
               for name, side, lat, text, caps, _, _ in SCALES]
    return [{"model": m, "captions": c, "bytes": table_bytes(side, lat, text, c, d)} for m, side, lat, text, c, d in shapes]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def embedded_stages(exp, rows: int) -> dict:
    """Seconds per image of each precompute stage on the first ``rows`` training rows."""
    from abu_explorer.attribution import dtrak
    from abu_explorer.attribution.ddpm_loss import eval_timesteps, loss_table
    from abu_explorer.attribution.gradients import diagonal_fisher
    from abu_explorer import data
    from abu_explorer.attribution.nearest import PixelNN, featurize

    ds, cache, unet, sched = exp.dataset, exp.training_cache(), exp.unet, exp.scheduler
    sub = torch.arange(rows)
    ts = eval_timesteps(TIMESTEPS)
    out = {
        "encode images + captions": _timed(lambda: (exp.encode_images(ds.tensor(slice(0, rows))),
                                                    exp.encode_text(ds.captions[:rows]))),
        f"loss scan ({TIMESTEPS} timesteps)": _timed(lambda: loss_table(unet, sched, cache.latents, cache.text_states,
                                                                        ts, rows=sub)),
        f"Fisher ({FISHER_PASSES} passes)": _timed(lambda: diagonal_fisher(unet, sched, cache.latents[:rows],
                                                                           cache.text_states[:rows], passes=FISHER_PASSES)),
    }
    dtrak.features(unet, sched, cache.latents, cache.text_states[:4], sub[:4], dtrak.DTrakConfig())  # projection cached
    out[f"D-TRAK features ({TIMESTEPS} timesteps)"] = _timed(
        lambda: dtrak.features(unet, sched, cache.latents, cache.text_states[:rows], sub, dtrak.DTrakConfig()))
    small = data.Dataset(ds.images[:rows], ds.captions[:rows], ds.codes[:rows], ds.config, ds.content_hash)
    pixel = PixelNN.__new__(PixelNN)  # its embedding only; no index over all N
    out["pixel NN features"] = _timed(lambda: featurize(pixel.embed, small))
    clip = torch.no_grad()(exp.image_embedder())  # what ClipNN embeds with
    out["CLIP NN features"] = _timed(lambda: featurize(clip, small))
    return {k: v / rows for k, v in out.items()}


def scan_curve(exp, sizes_n: list[int]) -> dict:
    """Seconds of the loss scan over n rows (rows modulo N), one run each, and the least-squares line."""
    from abu_explorer.attribution.ddpm_loss import eval_timesteps, loss_table

    cache = exp.training_cache()
    ts = eval_timesteps(TIMESTEPS)
    secs = []
    for n in sizes_n:
        rows = torch.arange(n) % cache.num_images
        secs.append(_timed(lambda: loss_table(exp.unet, exp.scheduler, cache.latents, cache.text_states, ts, rows=rows)))
    slope, intercept = np.polyfit(np.array(sizes_n, float), np.array(secs), 1)
    pred = slope * np.array(sizes_n) + intercept
    r2 = 1 - float(np.sum((np.array(secs) - pred) ** 2) / np.sum((np.array(secs) - np.mean(secs)) ** 2))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:  # the arithmetic of one row: TIMESTEPS forward items
        loss_table(exp.unet, exp.scheduler, cache.latents, cache.text_states, ts, rows=torch.arange(1))
    gflop_row = fc.get_total_flops() / 1e9
    return {"n": sizes_n, "seconds": secs, "seconds_per_row": float(slope), "intercept": float(intercept), "r2": r2,
            "gflop_per_row": gflop_row, "achieved_gflops": gflop_row / float(slope),
            "share_before_first_cross_attention": prefix_share(exp.unet, cache)}


# what runs before the first cross-attention of a UNet2DConditionModel whose first block is a CrossAttnDownBlock2D:
# the part of a forward pass that the unlearned K/V cannot change (cacheable per row and timestep)
PREFIX = ("conv_in", "time_embedding", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0.norm",
          "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.norm1",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
          "down_blocks.0.attentions.0.transformer_blocks.0.norm2",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")


def prefix_share(unet, cache) -> float:
    """FLOP share of one forward item spent before the first cross-attention (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        unet(cache.latents[:1], torch.tensor([500]), cache.text_states[:1])
    counts = fc.get_flop_counts()
    root = type(unet).__name__
    total = sum(counts[root].values())
    return sum(sum(counts.get(f"{root}.{m}", {}).values()) for m in PREFIX) / total


def scale_unet(config: dict, latent: tuple, text: tuple, batch: int) -> dict:
    """A randomly initialised UNet of ``config``: seconds per forward item and per K/V-gradient item (the DDPM
    loss, as the loss scan and the Fisher take them), and FLOPs per forward item."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from abu_explorer.attribution.ddpm_loss import ddpm_losses
    from abu_explorer.attribution.gradients import PerExampleGradients

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(batch, *latent, generator=g), torch.randn(batch, *latent, generator=g)
    ctx, t = torch.randn(batch, *text, generator=g), torch.full((batch,), 500)
    with torch.inference_mode():
        ddpm_losses(unet, sched, x0[:1], t[:1], noise[:1], ctx[:1])  # warm-up
        fwd = _timed(lambda: ddpm_losses(unet, sched, x0, t, noise, ctx)) / batch
        with FlopCounterMode(display=False) as fc:
            ddpm_losses(unet, sched, x0[:1], t[:1], noise[:1], ctx[:1])
    pex = PerExampleGradients(unet, "cross-attn")
    grad = _timed(lambda: pex(lambda: ddpm_losses(unet, sched, x0, t, noise, ctx), batch)) / batch
    params = sum(p.numel() for p in unet.parameters())
    return {"params": params, "forward_s": fwd, "gradient_s": grad, "forward_gflop": fc.get_total_flops() / 1e9,
            "batch": batch}


def projections(unet_cost: dict, captions: int, n: int, gpu_tflops: float) -> dict:
    """Hours of each stage at N = n: items per image x seconds per item (CPU) or x FLOPs (GPU, assumed rate;
    a gradient item is taken as 3 forward FLOPs)."""
    fwd, grad, gflop = unet_cost["forward_s"], unet_cost["gradient_s"], unet_cost["forward_gflop"]
    stages = {  # (items per image, forward or gradient)
        "AbU base losses (= one exact AbU query)": (captions * TIMESTEPS, "fwd"),
        "Fisher": (captions * FISHER_PASSES, "grad"),
        "D-TRAK features": (captions * TIMESTEPS, "grad"),
        "EK-FAC fit": (captions * IF_DRAWS, "grad"),
    }
    out = {}
    for name, (per, kind) in stages.items():
        items = per * n
        cpu = items * (fwd if kind == "fwd" else grad) / 3600
        gpu = items * gflop * (1 if kind == "fwd" else 3) / (gpu_tflops * 1e3) / 3600
        out[name] = {"items": items, "cpu_hours": cpu, "gpu_hours_assumed": gpu}
    return out


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB" if b >= 1e8 else f"{b / 1e6:,.1f} MB"


def main(args) -> dict:
    from abu_explorer import artifacts
    from abu_explorer.machine import machine
    from abu_explorer.model.embedded import Explorer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    exp = Explorer.load(args.precomputed)
    report = {"machine": machine(torch.get_num_threads()), "threads": torch.get_num_threads(),
              "gpu_tflops_assumed": args.gpu_tflops}
    # 1. sizes
    report["sizes"] = sizes(exp)
    print("1. bytes per image of the tables that grow with N, and their totals")
    for row in report["sizes"]:
        print(f"   {row['model']} ({row['captions']} caption(s) per image)")
        for name, b in row["bytes"].items():
            print(f"     {name:44s} {b:>10,} B/image   N=100k: {_gb(b * 1e5):>10s}   N=118,287: {_gb(b * 118_287):>10s}")
    if args.sizes_only:
        return report
    # 2. stages on the embedded model
    report["embedded_stages"] = embedded_stages(exp, args.rows)
    print(f"2. embedded model, seconds per image ({args.rows} rows, {report['threads']} threads)")
    for name, s in report["embedded_stages"].items():
        print(f"     {name:36s} {s * 1e3:8.2f} ms   N=2,015: {s * 2015:7.1f} s")
    # 3. the loss scan over N
    report["scan_curve"] = c = scan_curve(exp, args.curve)
    print("3. loss scan over N (one run each): " + ", ".join(f"{n}: {s:.1f} s" for n, s in zip(c["n"], c["seconds"]))
          + f"\n   fit: {c['seconds_per_row'] * 1e3:.2f} ms per row + {c['intercept']:.2f} s (R^2 {c['r2']:.4f}); "
          f"{c['gflop_per_row']:.2f} GFLOP per row, so {c['achieved_gflops']:.0f} GFLOP/s achieved; "
          f"{100 * c['share_before_first_cross_attention']:.1f}% of a forward item comes before the first "
          "cross-attention (what caching could skip)")
    # 4. / 5. the scale models' denoisers and the projections
    report["scale"] = []
    for name, side, latent, text, caps, n, config in SCALES:
        cost = scale_unet(config, latent, text, args.unet_batch)
        proj = projections(cost, caps, n, args.gpu_tflops)
        report["scale"].append({"name": name, "n": n, "captions": caps, "unet": cost, "projections": proj})
        print(f"4. {name}: UNet {cost['params'] / 1e6:.0f}M params, {cost['forward_gflop']:.1f} GFLOP per forward item; "
              f"{cost['forward_s']:.3f} s per forward item, {cost['gradient_s']:.3f} s per K/V-gradient item "
              f"(batch {cost['batch']})")
        for stage, p in proj.items():
            print(f"     {stage:42s} {p['items']:>11,} items  {p['cpu_hours']:9,.1f} h here   "
                  f"{p['gpu_hours_assumed']:7.2f} h on a GPU at an assumed {args.gpu_tflops:g} TFLOP/s")
    if args.json:
        artifacts.save_json(args.json, report)
    if args.plot:
        plot_curve(report, args.plot)
    return report


def plot_curve(report: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abu_explorer import artifacts

    c = report["scan_curve"]
    n = np.array(c["n"])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(n, c["seconds"], "o", label="measured (one run each)")
    ax.plot(n, c["seconds_per_row"] * n + c["intercept"], "-", label=f"fit: {c['seconds_per_row'] * 1e3:.1f} ms per row")
    ax.set_xlabel("training rows scanned (N)")
    ax.set_ylabel("seconds")
    ax.set_title(f"AbU loss scan, {TIMESTEPS} timesteps, {report['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(out, fig)
    plt.close(fig)
