"""Quality against training time: each model's UNet snapshots (kept every ``snapshot_every_epochs``) measured
on the same captions and seeds, and drawn as one line per recipe.

    python -m abu_explorer bench model --curves precomputed=runs/floor-snapshots runs/exp/lr2e3/model \
        --num-captions 100 --json runs/bench/curves.json --plot assets/quality_vs_time.png

An entry is ``MODEL[@SAMPLER:STEPS[:GUIDANCE]][=SNAPSHOTS]``; the snapshots default to the folder a
candidate build writes (``MODEL/../runs/unet-snapshots``). Training minutes are each run's own: recipes
compared on one curve should have been trained on one machine at the same time (one thread each), so
that the ratio of their minutes is the ratio of their retrain costs.
"""
from __future__ import annotations

from pathlib import Path

from abu_explorer import artifacts


def snapshots_of(entry: str) -> tuple[str, Path]:
    model, _, snaps = entry.partition("=")
    folder = Path(model.partition("@")[0])
    return model, Path(snaps) if snaps else folder.parent / "runs" / "unet-snapshots"


def points(exp, folder: Path, count: int, steps: int = 50, guidance: float | None = None, name: str = "") -> list:
    """One point per snapshot in ``folder``: epoch, its run's training minutes, CLIP and pixel-NN hit rates on
    ``count`` captions. The model's own weights are back in place afterwards."""
    from safetensors import safe_open

    from abu_explorer.bench.model import quality

    paths = sorted(Path(folder).glob("epoch*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no UNet snapshots (epochNNNN.safetensors) in {folder}")
    final = {k: v.clone() for k, v in exp.unet.state_dict().items()}
    out = []
    try:
        for path in paths:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            exp.unet.load_state_dict(artifacts.load_safetensors(path))
            q = quality(exp, count, guidance, steps=steps)
            out.append({"epoch": int(meta["epoch"]), "train_minutes": float(meta["seconds"]) / 60,
                        "clip_top1": q["generated"]["top1"], "clip_top10": q["generated"]["top10"],
                        "pixel_nn_top1": q["pixel_nn"]["top1"], "pixel_nn_top5": q["pixel_nn"]["top5"]})
            p = out[-1]
            print(f"  {name}: epoch {p['epoch']:4d} {p['train_minutes']:6.1f} min  pixel-NN top-1 "
                  f"{p['pixel_nn_top1']:.3f} top-5 {p['pixel_nn_top5']:.3f}  CLIP top-10 {p['clip_top10']:.3f}",
                  flush=True)
    finally:
        exp.unet.load_state_dict(final)
    return out


def curve(entry: str, count: int) -> dict:
    """Every snapshot of one model (``MODEL[@SAMPLER:STEPS[:GUIDANCE]][=SNAPSHOTS]``)."""
    from abu_explorer.bench.model import load_entry

    model, folder = snapshots_of(entry)
    if not sorted(folder.glob("epoch*.safetensors")):
        raise FileNotFoundError(f"no UNet snapshots (epochNNNN.safetensors) in {folder}")
    exp, steps, guidance = load_entry(model)
    return {"model": model, "snapshots": str(folder), "recipe": exp.meta["unet"]["recipe"],
            "points": points(exp, folder, count, steps, guidance, name=model)}


def curves(entries: list[str], count: int) -> dict:
    from abu_explorer.machine import machine

    return {"machine": machine(), "num_captions": count, "curves": [curve(e, count) for e in entries]}


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for i, c in enumerate(report["curves"]):
        minutes = [p["train_minutes"] for p in c["points"]]
        r = c["recipe"]
        label = (f"{c['model']} (bs {r['batch_size']}, lr {r['lr']:g}, {r['epochs']} ep"
                 + (f", EMA {r['extra']['ema_decay']}" if r["extra"].get("ema_decay") else "") + ")")
        for ax, (key, other) in zip(axes, (("pixel_nn_top1", "pixel_nn_top5"), ("clip_top10", "clip_top1"))):
            ax.plot(minutes, [p[key] for p in c["points"]], "o-", color=f"C{i}", label=label)
            ax.plot(minutes, [p[other] for p in c["points"]], ":", color=f"C{i}", alpha=0.6)
    m = report["machine"]
    for ax, title in zip(axes, ("pixel-NN top-1 (solid), top-5 (dotted)", "CLIP top-10 (solid), top-1 (dotted)")):
        ax.set_xlabel(f"UNet training minutes ({m['cpu_model']}, {m['kind']})", fontsize=7)
        ax.set_title(f"{title}, {report['num_captions']} captions", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    artifacts.save_figure(out, fig)
    plt.close(fig)
