"""A diffusers text-to-image model behind the model backend (``backend.ModelBackend``).

Two ways to name the model (``PipelineSpec``):

- a pipeline: a folder written by ``save_pretrained`` or a Hub id (Stable Diffusion 1.x / 2.x and their
  fine-tunes), loaded with ``DiffusionPipeline.from_pretrained``;
- UNet weights + named components (the AbU paper's MSCOCO model): a ``UNet2DConditionModel`` config JSON and
  its weights (safetensors, or a ``.bin`` read with ``torch.load(weights_only=True)``), plus a pipeline folder
  or Hub id whose ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` complete it.

The training set is a folder (``data.load_image_folder``) rendered at the model's resolution. The precomputed
folder (``--out``) holds ``backend.json`` (this spec, the data folder and its hash) and every method's tables.

# Notation (code -> paper)
#   encode_images: z = (E(x) - shift) * scale   (shift from the VAE config; 0 when it has none, as in SD)
#   encode_text:   c = last hidden states of the CLIP text encoder, padded to its context length
#   scheduler:     the DDPM schedule of the pipeline's scheduler config; its prediction_type sets the target
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from abu_explorer import artifacts, data
from abu_explorer.model import sampling
from abu_explorer.model import training_cache
from abu_explorer.model.embedded import Generation, image_to_tensor, load_clip, to_pil
from abu_explorer.model.training_cache import TrainingCache
from abu_explorer.model.tokenizer import PromptError, check_text

BACKEND_FILE = "backend.json"
DTYPES = {"fp32": torch.float32}  # the attribution methods' arithmetic is fp32 on the CPU in this version


@dataclass(frozen=True)
class PipelineSpec:
    """How to load a diffusers model; saved as ``backend.json`` beside the tables computed from it."""

    source: str  # pipeline folder or Hub id (with unet_config: where vae/, text_encoder/, ... come from)
    unet_config: str = ""  # a UNet2DConditionModel config.json instead of the pipeline's UNet ...
    unet_weights: str = ""  # ... with these weights (.safetensors, or .bin read with weights_only=True)
    variant: str | None = None  # e.g. "fp16" weight files of a Hub repository
    dtype: str = "fp32"
    device: str = "cpu"
    local_files_only: bool | None = None  # None: offline when source is a folder or HF_HUB_OFFLINE=1
    clip: str = ""  # an open_clip folder in this project's format for the CLIP baseline ("" = none)
    guidance: float = 7.5
    custom_diffusion: str = ""  # a Custom Diffusion fine-tune of the model (diffusers' output folder), applied
    lora: str = ""  # a UNet LoRA fine-tune (diffusers' pytorch_lora_weights.safetensors), merged in

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def offline(self) -> bool:
        if self.local_files_only is not None:
            return self.local_files_only
        return Path(self.source).is_dir() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


class PipelineBackend:
    """A diffusers model + an image folder (``ModelBackend``)."""

    retrain_note = ("remove-and-regenerate retrains the embedded model only: a from-scratch retrain of your "
                    "model needs its full training recipe and data pipeline, which this tool does not run")

    def __init__(self, spec: PipelineSpec, root: Path, vae, text_encoder, tokenizer, unet, scheduler_config,
                 dataset: data.Dataset, data_folder: str, clip=None, exemplars_folder: str = "", num_exemplars: int = 0):
        from diffusers import DDPMScheduler

        self.spec, self.root, self.vae, self.text_encoder, self.tokenizer = spec, Path(root), vae, text_encoder, tokenizer
        self.unet, self.scheduler_config, self.data_folder, self.clip = unet, dict(scheduler_config), data_folder, clip
        self.scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.default_guidance = float(spec.guidance)
        self._dataset = dataset
        self._hashes: dict[str, str] = {}
        self._null = None
        self._training_cache: TrainingCache | None = None
        self.progress = False  # bars while building the training cache (precompute turns them on)
        self.exemplars_folder = exemplars_folder
        self.exemplars = list(range(len(dataset) - num_exemplars, len(dataset)))  # a fine-tune's images: last rows
        self.meta = {"dataset": {"content_hash": dataset.content_hash, "folder": data_folder,
                                 "config": dataset.config.to_dict()}, "backend": spec.to_dict()}

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: PipelineSpec, data_folder: str | Path, root: str | Path,
             exemplars: str | Path = "") -> PipelineBackend:
        """``exemplars``: the images of a fine-tune (``spec.custom_diffusion`` or ``spec.lora``), appended to the
        training rows."""
        from abu_explorer.model import custom_weights, lora_weights

        if spec.dtype not in DTYPES or spec.device != "cpu":
            raise ValueError(f"dtype {spec.dtype} on {spec.device}: this version runs the methods in fp32 on "
                             "the CPU (--dtype fp32 --device cpu)")
        vae, text_encoder, tokenizer, unet, sched = _load_components(spec)
        if spec.custom_diffusion:
            custom_weights.apply(spec.custom_diffusion, unet, text_encoder, tokenizer)
        if spec.lora:
            lora_weights.apply(spec.lora, unet)
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        ds = data.load_image_folder(data_folder, size, store=Path(root) / "data", progress=True,
                                    extra=exemplars or None)
        num = sum(code.startswith("extra:") for code in ds.codes)
        clip = load_clip(Path(spec.clip))[0] if spec.clip else None
        return cls(spec, Path(root), vae, text_encoder, tokenizer, unet, sched, ds, str(Path(data_folder)), clip,
                   str(Path(exemplars)) if exemplars else "", num)

    @classmethod
    def from_precomputed(cls, root: str | Path) -> PipelineBackend:
        """Reload what ``precompute --model ... --out root`` recorded; the data must still hash the same."""
        root = Path(root)
        doc = artifacts.load_json(root / BACKEND_FILE)
        backend = cls.load(PipelineSpec(**doc["spec"]), doc["data_folder"], root, doc.get("exemplars_folder", ""))
        if backend.dataset.content_hash != doc["data_hash"]:
            raise artifacts.ArtifactError(
                f"{doc['data_folder']} now hashes {backend.dataset.content_hash}, but {root} was computed on "
                f"{doc['data_hash']}; rebuild with: python -m abu_explorer precompute --model {doc['spec']['source']} "
                f"--data {doc['data_folder']} --out {root} --force")
        return backend

    def save_record(self) -> None:
        artifacts.save_json(self.root / BACKEND_FILE, {"spec": self.spec.to_dict(), "data_folder": self.data_folder,
                                                       "exemplars_folder": self.exemplars_folder,
                                                       "data_hash": self.dataset.content_hash,
                                                       "provenance": self.provenance()})

    # --- what every method reads -----------------------------------------------------------------

    @property
    def dataset(self) -> data.Dataset:
        return self._dataset

    @property
    def image_size(self) -> int:
        return self.dataset.config.image_size

    def component_hash(self, part: str) -> str:
        if part not in self._hashes:
            module = {"unet": self.unet, "autoencoder": self.vae, "text_encoder": self.text_encoder}[part]
            self._hashes[part] = artifacts.state_hash(module.state_dict())
        return self._hashes[part]

    def provenance(self) -> dict:
        out = {f"{p}_hash": self.component_hash(p) for p in ("unet", "autoencoder", "text_encoder")}
        return {**out, "data_hash": self.dataset.content_hash}

    def training_example(self, index: int):
        return self.dataset.image(index), " | ".join(self.dataset.all_captions()[index])

    def check_prompt(self, prompt: str) -> None:
        check_text(prompt)
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        n = len(self.tokenizer(prompt).input_ids)
        if n > self.tokenizer.model_max_length:
            raise PromptError(f"the prompt has {n} tokens; this model takes at most {self.tokenizer.model_max_length}")

    def unknown_words(self, prompt: str) -> list[str]:
        return []  # a subword tokenizer reads every word

    def image_embedder(self):
        if self.clip is None:
            return None
        from abu_explorer.training.train import clip_preprocess

        clip, size = self.clip, self.clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

        def embed(images: torch.Tensor) -> torch.Tensor:
            if tuple(images.shape[-2:]) != size:  # the model's resolution -> the CLIP's input
                images = torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False)
            return torch.cat([clip.encode_image(clip_preprocess(x), normalize=True) for x in images.split(256)])

        return embed

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0].float()

    @property
    def null_state(self) -> torch.Tensor:
        if self._null is None:
            self._null = self.encode_text([""])
        return self._null

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = torch.cat([self.vae.encode(x).latent_dist.mode() for x in images.split(32)])
        return (z - _shift(cfg)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + _shift(cfg)).sample.clamp(-1, 1)

    def training_cache(self) -> TrainingCache:
        """Latents and caption states, memory-mapped from ``ROOT/training_cache/`` (built there in blocks of
        1,024 images / 256 captions on first use, rebuilt when the model or data hash changes)."""
        if self._training_cache is None:
            cfg = self.vae.config
            key = {"autoencoder": self.component_hash("autoencoder"), "text_encoder": self.component_hash("text_encoder"),
                   "scaling_factor": cfg.scaling_factor, "shift_factor": _shift(cfg),
                   "data": self.dataset.content_hash, "flip": self.dataset.config.flip}
            self._training_cache = training_cache.build(self, 1024, 256, self.root / "training_cache", key,
                                                        progress=self.progress)
        return self._training_cache

    def image_tensor(self, image) -> torch.Tensor:
        return image_to_tensor(image, self.image_size)

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompt: str, seed: int = 0, steps: int = 50, guidance: float | None = None,
                 callback=None, record: list | None = None) -> Generation:
        from diffusers import DDIMScheduler

        self.check_prompt(prompt)
        guidance = self.default_guidance if guidance is None else float(guidance)
        c, h = self.unet.config.in_channels, self.unet.config.sample_size
        noise = sampling.initial_noise(seed, (1, c, h, h))
        sampler = DDIMScheduler.from_config(self.scheduler_config)
        lat = sampling.ddim_sample(self.unet, sampler, self.encode_text([prompt]), self.null_state, noise, steps,
                                   guidance, callback, record)
        return Generation(to_pil(self.decode(lat))[0], lat[0].clone(), prompt, seed, steps, guidance, [])


def _shift(cfg) -> float:
    return getattr(cfg, "shift_factor", None) or 0.0


def _load_components(spec: PipelineSpec):
    """(vae, text_encoder, tokenizer, unet, scheduler config) from a pipeline or from UNet weights + parts."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # per-component loading bars; Hub downloads keep theirs
    transformers_logging.disable_progress_bar()
    opts = {"local_files_only": spec.offline()}
    try:
        if spec.unet_config:
            vae = AutoencoderKL.from_pretrained(spec.source, subfolder="vae", **opts)
            text_encoder = CLIPTextModel.from_pretrained(spec.source, subfolder="text_encoder", **opts)
            tokenizer = CLIPTokenizer.from_pretrained(spec.source, subfolder="tokenizer", **opts)
            sched = DDPMScheduler.load_config(spec.source, subfolder="scheduler", **opts)
        else:
            pipe = DiffusionPipeline.from_pretrained(spec.source, variant=spec.variant, safety_checker=None,
                                                     dtype=DTYPES[spec.dtype], **opts)
    except (OSError, ValueError) as e:  # a missing folder or file, a bad Hub id, no network for a download
        raise ValueError(f"cannot load the diffusers model {spec.source!r}: {str(e).splitlines()[0][:300]}") from None
    if spec.unet_config:
        unet = _unet_from_weights(spec.unet_config, spec.unet_weights)
    else:
        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, p, None) is None]
        if missing or hasattr(pipe, "text_encoder_2"):
            raise ValueError(f"{type(pipe).__name__} is not a one-text-encoder latent diffusion pipeline "
                             f"(missing: {', '.join(missing) or 'none'}; two text encoders are not supported)")
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        sched = pipe.scheduler.config
    if type(unet).__name__ != "UNet2DConditionModel":
        raise ValueError(f"{spec.source}: the denoiser is a {type(unet).__name__}; a UNet2DConditionModel is needed")
    return vae.eval(), text_encoder.eval(), tokenizer, unet.eval(), sched


def _unet_from_weights(config_path: str, weights_path: str):
    """A UNet2DConditionModel from a config JSON and a state dict (safetensors, or a pickle-free .bin)."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads(Path(config_path).read_text())
    unet = UNet2DConditionModel.from_config(cfg)
    path = Path(weights_path)
    if path.suffix == ".safetensors":
        state = artifacts.load_safetensors(path)
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never objects
        except Exception as e:
            raise ValueError(f"{path}: not a plain tensor state dict ({type(e).__name__}: {str(e)[:200]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise ValueError(f"UNet weights must be .safetensors or .bin, got {path.name}")
    result = unet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit {config_path} ({len(result.missing_keys)} missing, "
                         f"{len(result.unexpected_keys)} unexpected, e.g. "
                         f"{(result.missing_keys + result.unexpected_keys)[0]})")
    return unet
