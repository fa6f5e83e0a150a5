"""One factory for the three parts of the latent text-to-image model, described by small JSON configs.

- ``autoencoder.json``: a diffusers ``AutoencoderKL`` (32x32x3 <-> 8x8x8);
- ``emoji-clip.json``: an open_clip CLIP (ViT image tower + text transformer) trained contrastively;
  its text tower's per-token states condition the UNet, its image tower is the CLIP baseline/metric;
- ``unet.json``: a diffusers ``UNet2DConditionModel`` with cross-attention (``attn2.to_k/to_v``);
- ``scheduler.json``: the DDPM noise schedule (1000 steps, epsilon prediction) used for training,
  DDIM sampling and every loss measurement.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from importlib import resources
from pathlib import Path

import torch

CONFIG_NAMES = ("autoencoder", "unet", "emoji-clip", "scheduler")


def model_config(name: str) -> dict:
    """A registered JSON config by name (see ``abu_explorer/model/configs``)."""
    if name not in CONFIG_NAMES:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(CONFIG_NAMES)}")
    text = resources.files("abu_explorer.model.configs").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def encoder_hash(vae) -> str:
    """Hash of what the latents depend on: the encoder's weights (with quant_conv), shift and scale."""
    from abu_explorer import artifacts

    state = {k: v for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    state["latent_stats"] = torch.tensor([vae.config.shift_factor, vae.config.scaling_factor], dtype=torch.float64)
    return artifacts.state_hash(state)


def build_autoencoder(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def build_unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


SAMPLERS = ("ddim", "dpmpp")  # deterministic samplers a generation may use


def build_scheduler(config: dict, kind: str = "ddpm"):
    """The training schedule (``ddpm``) or a sampler over it: ``ddim`` (eta = 0) or ``dpmpp`` (DPM-Solver++,
    2nd-order multistep), both from diffusers and both deterministic given the initial noise."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddpm":
        return DDPMScheduler(**config)
    if kind == "ddim":
        return DDIMScheduler(**config, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    if kind == "dpmpp":
        solver = {k: v for k, v in config.items() if k != "clip_sample"}  # DPM-Solver has thresholding instead
        return DPMSolverMultistepScheduler(**solver, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True)
    raise ValueError(f"unknown scheduler kind {kind!r}; known: ddpm, {', '.join(SAMPLERS)}")


_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def seeded_global_rng(seed: int):
    """torch's global generator seeded for what draws from it (the modules' weight initialisers), one thread
    at a time and restored afterwards: concurrent requests never move each other's draws. Everything else
    in a request path draws from its own seeded ``torch.Generator``."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_config(vocab_size: int, base: dict | None = None) -> dict:
    cfg = copy.deepcopy(base or model_config("emoji-clip"))
    cfg["text_cfg"]["vocab_size"] = int(vocab_size)
    return cfg


class _NoRandomInitNote(logging.Filter):
    """open_clip says "No pretrained weights loaded ... initialized randomly" when it builds an architecture;
    the project's own weights are loaded right after, so the note only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_clip(config: dict, name: str = "emoji-clip"):
    """Build an open_clip model from a config dict through open_clip's own registry and factory."""
    import tempfile

    import open_clip

    note = _NoRandomInitNote()
    root = logging.getLogger()
    root.addFilter(note)
    try:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}.json"
            path.write_text(json.dumps(config))
            open_clip.add_model_config(path)
            model = open_clip.create_model(name, pretrained=None, device="cpu")
    finally:
        root.removeFilter(note)
    return model


def text_hidden_states(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token states (B, L, width) of an open_clip text tower, after its final LayerNorm."""
    text = clip_model.text if hasattr(clip_model, "text") else None
    if text is None:  # standard (non custom-text) CLIP
        x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
        x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
        return clip_model.ln_final(x)
    x, attn_mask = text._embeds(tokens)
    x = text.transformer(x, attn_mask=attn_mask)
    return text.ln_final(x)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul units (AVX512-BF16 or AMX). fp32 stays the default."""
    from abu_explorer.machine import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
