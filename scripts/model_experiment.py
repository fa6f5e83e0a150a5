"""Candidate embedded models for the sharper-model study (docs/model-research.md), each in its own folder.

    python scripts/model_experiment.py autoencoder ae16_e150 --latent-channels 16 --epochs 150
    python scripts/model_experiment.py unet ema999_ae16 --autoencoder runs/exp/ae16_e150/autoencoder --ema 0.999
    python scripts/model_experiment.py decoder dec_lr3e4 --autoencoder precomputed/autoencoder --lr 3e-4

An autoencoder candidate is the shipped AE recipe with other latent channels / epochs / widths (and its decoder
phase, unless ``--decoder-epochs 0``); a decoder candidate runs only the decoder phase on a given autoencoder
(the encoder, and so every latent, unchanged); a UNet
candidate is the shipped UNet recipe (plus the given extras) on a candidate autoencoder and the shipped CLIP.
Both are resumable (checkpoints under the candidate's folder) and write ``runs/exp/NAME/``; a UNet candidate's
``model/`` is a complete model folder for ``python -m abu_explorer bench model --compare``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from abu_explorer import data  # noqa: E402
from abu_explorer.model import components  # noqa: E402
from abu_explorer.training import build, train  # noqa: E402


def autoencoder(args) -> None:
    out = Path(args.runs) / args.name
    ds = data.build_openmoji(data.DataConfig(), progress=False)
    cfg = {**components.model_config("autoencoder"), "latent_channels": args.latent_channels}
    if args.widths:
        cfg["block_out_channels"] = args.widths
    extra = {**train.AE_RECIPE.extra, **({"kl_weight": args.kl_weight} if args.kl_weight is not None else {})}
    recipe = dataclasses.replace(train.AE_RECIPE, epochs=args.epochs, extra=extra)
    t0 = time.time()
    build.write_dataset_record(ds, out)
    decoder = dataclasses.replace(train.AE_DECODER_RECIPE, epochs=args.decoder_epochs) if args.decoder_epochs else None
    build.build_autoencoder(ds, out, out / "runs", recipe, progress=True, config=cfg, decoder_recipe=decoder)
    log = json.loads((out / "autoencoder" / "train_meta.json").read_text())["log"]
    print(f"{args.name}: {time.time() - t0:.0f} s, held-out PSNR {log['heldout_psnr_db']:.2f} dB, "
          f"train {log['train_psnr_db']:.2f} dB")


def decoder(args) -> None:
    from diffusers import AutoencoderKL

    from abu_explorer import artifacts

    out = Path(args.runs) / args.name
    ds = data.build_openmoji(data.DataConfig(), progress=False)
    vae = AutoencoderKL.from_pretrained(args.autoencoder)
    meta = json.loads((Path(args.autoencoder) / "train_meta.json").read_text())
    recipe = dataclasses.replace(train.AE_DECODER_RECIPE, epochs=args.epochs, lr=args.lr)
    t0 = time.time()
    log = train.finetune_decoder(vae, ds.as_tensor(), recipe, out / "runs", progress=True)
    meta.update(weights_hash=artifacts.state_hash(vae.state_dict()), encoder_hash=components.encoder_hash(vae),
                decoder_recipe=recipe.to_dict(), decoder_log=log)
    vae.save_pretrained(out / "autoencoder", safe_serialization=True)
    artifacts.save_json(out / "autoencoder" / "train_meta.json", meta)
    print(f"{args.name}: {time.time() - t0:.0f} s, held-out PSNR {log['heldout_psnr_db']:.2f} dB, "
          f"train {log['train_psnr_db']:.2f} dB")


def unet(args) -> None:
    out = Path(args.runs) / args.name
    root = out / "model"
    root.mkdir(parents=True, exist_ok=True)
    ae = Path(args.autoencoder)
    for part, src in (("autoencoder", ae), ("clip", ROOT / "precomputed" / "clip")):
        if not (root / part).exists():
            shutil.copytree(src, root / part)
    shutil.copy(ROOT / "precomputed" / "dataset.json", root / "dataset.json")
    ds = data.build_openmoji(data.DataConfig(), progress=False)
    extra = {**train.UNET_RECIPE.extra, **({"ema_decay": args.ema} if args.ema else {})}
    if args.min_snr is not None:
        extra["min_snr_gamma"] = args.min_snr
    base = train.UNET_RECIPE
    recipe = dataclasses.replace(base, extra=extra, epochs=args.epochs or base.epochs,
                                 batch_size=args.batch_size or base.batch_size, lr=args.lr or base.lr,
                                 warmup_steps=args.warmup if args.warmup is not None else base.warmup_steps)
    print(f"{args.name}: recipe {recipe.to_dict()}")
    channels = json.loads((ae / "config.json").read_text())["latent_channels"]
    cfg = {**components.model_config("unet"), "in_channels": channels, "out_channels": channels}
    t0 = time.time()
    build.build_unet(ds, root, out / "runs", recipe, progress=True, config=cfg)
    log = json.loads((root / "unet" / "train_meta.json").read_text())["log"]
    print(f"{args.name}: {time.time() - t0:.0f} s wall, {log['seconds']:.0f} s of training")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "exp"))
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("autoencoder")
    a.add_argument("name")
    a.add_argument("--latent-channels", type=int, default=8)
    a.add_argument("--epochs", type=int, default=train.AE_RECIPE.epochs)
    a.add_argument("--widths", type=int, nargs=3, default=None)
    a.add_argument("--kl-weight", type=float, default=None, help="default: the shipped recipe's (1e-6)")
    a.add_argument("--decoder-epochs", type=int, default=train.AE_DECODER_RECIPE.epochs, help="0: no decoder phase")
    d = sub.add_parser("decoder")
    d.add_argument("name")
    d.add_argument("--autoencoder", default=str(ROOT / "precomputed" / "autoencoder"))
    d.add_argument("--epochs", type=int, default=train.AE_DECODER_RECIPE.epochs)
    d.add_argument("--lr", type=float, default=train.AE_DECODER_RECIPE.lr)
    u = sub.add_parser("unet")
    u.add_argument("name")
    u.add_argument("--autoencoder", default=str(ROOT / "precomputed" / "autoencoder"))
    u.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off, as shipped)")
    u.add_argument("--epochs", type=int, default=None)
    u.add_argument("--batch-size", type=int, default=None)
    u.add_argument("--lr", type=float, default=None)
    u.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    u.add_argument("--min-snr", type=float, default=None, help="min-SNR gamma (0: unweighted)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"autoencoder": autoencoder, "decoder": decoder, "unet": unet}[args.what](args)


if __name__ == "__main__":
    main()
