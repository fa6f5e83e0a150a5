"""A user's LoRA fine-tune (as diffusers' LoRA training scripts save it), merged into a diffusers model's weights.

The scripts (``examples/text_to_image/train_text_to_image_lora.py``, ``examples/dreambooth/train_dreambooth_lora.py``)
write ``pytorch_lora_weights.safetensors``: low-rank factors for some of the UNet's linear layers (``to_k``, ``to_v``,
often ``to_q`` / ``to_out`` too). diffusers reads them (every key format it knows, the adapter's alpha/rank
scale from the file's metadata) into peft LoRA layers; here each LoRA layer is then merged, W <- W + scale * B A,
and the peft wrappers removed, so the model is a plain UNet again: every method finds the fine-tuned K/V where
it always looks, and the model's hash names the merged weights. Only ``.safetensors`` files are read (never a
pickle). Text-encoder LoRA layers (``--train_text_encoder``) are refused in one line: transformers loads them
only with peft >= 0.22, newer than the pinned peft.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER = "user_lora"


def weights_file(path: str | Path) -> Path:
    """The LoRA file: ``path`` itself, or ``pytorch_lora_weights.safetensors`` in the folder ``path``."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} (the output of diffusers' LoRA training scripts)")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: LoRA weights are read from .safetensors only (a {file.suffix} may hold a pickle)")
    return file


def apply(path: str | Path, unet) -> dict:
    """Merge the UNet LoRA in ``path`` into ``unet``, in place. Returns {"file": ..., "modules": [merged layers]}."""
    from diffusers import StableDiffusionPipeline

    file = weights_file(path)
    try:
        state, alphas, meta = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{file}: not a LoRA file diffusers can read ({type(e).__name__}: {str(e)[:200]})") from None
    if any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in state):
        raise ValueError(f"{file}: holds text-encoder LoRA layers, which this version does not load "
                         "(transformers needs peft >= 0.22); a UNet-only LoRA works")
    if not state:
        raise ValueError(f"{file}: holds no LoRA layers")
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=ADAPTER, metadata=meta)
    return {"file": str(file), "modules": _merge(unet)}


def _merge(model) -> list[str]:
    """W <- W + scale * B A in every peft LoRA layer of ``model``, then the wrappers removed."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not names:
        return []
    for _, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return names
