"""A user's fine-tunes of a diffusers model (Custom Diffusion, LoRA) with the images they learned: loaded as
diffusers loads them, compared with diffusers' own loading, and scored by ``evaluate customized``; offline."""
import json
from pathlib import Path

import torch
from PIL import Image

from test_diffusers_backend import build_imagefolder, build_pipeline


def build_custom_diffusion(pipe: Path, out: Path, token: str = "<new1>") -> Path:
    """A fine-tune in the layout of diffusers' Custom Diffusion script: every cross-attention's K/V (moved by
    seeded noise) under processor keys, and the modifier token's embedding in ``<token>.safetensors``."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            head, proj = name.split(".attn2.")[0], name.split(".attn2.")[1].split(".")[0]
            state[f"{head}.attn2.processor.{proj}_custom_diffusion.weight"] = (
                p.detach() + 0.2 * torch.randn(p.shape, generator=g)).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "pytorch_custom_diffusion_weights.safetensors")
    save_file({token: torch.randn(16, generator=g)}, out / f"{token}.safetensors")
    return out


def build_exemplars(folder: Path, dataset, caption: str, n: int = 2) -> Path:
    """A fine-tune's images as an imagefolder: ``n`` training glyphs not among the tiny folder's rows."""
    folder.mkdir(parents=True)
    for j in range(n):
        Image.fromarray(dataset.images[20 + j]).save(folder / f"e{j}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"e{j}.png", "text": caption}) + "\n"
                                                   for j in range(n)))
    return folder


def precompute_fine_tune(tmp_path: Path, dataset, flag: str, fine_tune: Path, caption: str) -> tuple[Path, Path, Path]:
    """``precompute --model PIPE --<flag> FINE_TUNE --exemplars`` on a 6-row image folder plus 2 exemplars
    captioned ``caption``, AbU's tables only. Returns (pipeline, image folder, exemplars); tables in tmp/tables."""
    from abu_explorer import cli

    pipe = tmp_path / "pipe"
    images = build_imagefolder(tmp_path / "images", dataset, 6)
    ex = build_exemplars(tmp_path / "exemplars", dataset, caption)
    assert cli.main(["precompute", "--model", str(pipe), flag, str(fine_tune), "--exemplars", str(ex),
                     "--data", str(images), "--out", str(tmp_path / "tables"), "--method", "abu", "--timesteps",
                     "2", "--fisher-passes", "1", "--quiet"]) == 0
    return pipe, images, ex


def test_a_custom_diffusion_fine_tune_matches_diffusers_and_finds_its_exemplars(tmp_path, tiny_dataset, monkeypatch,
                                                                                capsys):
    from diffusers import StableDiffusionPipeline

    from abu_explorer import cli
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.model import load

    cd = build_custom_diffusion(build_pipeline(tmp_path / "pipe"), tmp_path / "cd")
    pipe, images, _ = precompute_fine_tune(tmp_path, tiny_dataset, "--custom-diffusion", cd, "<new1> glyph")
    out = tmp_path / "tables"
    backend = load(out)  # reloaded from backend.json, fine-tune and exemplars included
    assert backend.exemplars == [6, 7] and len(backend.dataset) == 8
    assert backend.dataset.captions[6] == "<new1> glyph" and backend.dataset.codes[6] == "extra:e0.png"
    # the same network as diffusers' own Custom Diffusion loading (attention processors + textual inversion)
    ref = StableDiffusionPipeline.from_pretrained(pipe, safety_checker=None)
    from safetensors.torch import load_file

    procs = ref.unet._process_custom_diffusion(load_file(cd / "pytorch_custom_diffusion_weights.safetensors"))
    assert procs  # diffusers' CustomDiffusionAttnProcessor on every cross-attention, the rest as they were
    ref.unet.set_attn_processor({k: procs.get(k, v) for k, v in ref.unet.attn_processors.items()})
    ref.load_textual_inversion(cd, weight_name="<new1>.safetensors")
    ids = ref.tokenizer(["<new1> glyph"], padding="max_length", max_length=24, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx_ref = ref.text_encoder(ids)[0]
        ctx = backend.encode_text(["<new1> glyph"])
        assert torch.allclose(ctx, ctx_ref, atol=1e-6)
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
        assert torch.allclose(backend.unet(x, t, ctx).sample, ref.unet(x, t, ctx_ref).sample, atol=1e-5)
        assert not torch.allclose(ctx, backend.encode_text(["glyph"])[:, :ctx.shape[1]])
    # evaluate customized on the user's model: every method's Recall@10 and AP of the exemplars
    monkeypatch.setattr(cz, "CUSTOM_ABU", {"alpha": 0.1, "unlearn_steps": 2, "unlearn_samples": 4})
    capsys.readouterr()
    assert cli.main(["evaluate", "customized", "--precomputed", str(out), "--prompt", "<new1> glyph",
                     "--methods", "abu,pixel,random", "--results", str(tmp_path / "res")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| <new1> glyph |") == 3 and "2 exemplars among 8 rows" in printed
    docs = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("user-p0-*.json")]
    assert sorted(d["method"] for d in docs) == ["abu", "pixel", "random"]
    assert all(d["exemplars"] == [6, 7] and 0 <= d["ap"] <= 1 for d in docs)
    # the plain model has no exemplars: one line
    capsys.readouterr()
    assert cli.main(["precompute", "--model", str(pipe), "--custom-diffusion", str(cd), "--data", str(images),
                     "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "go together" in capsys.readouterr().err


def build_lora(pipe: Path, out: Path) -> Path:
    """A UNet LoRA as diffusers' LoRA scripts save it (peft layers -> diffusers keys, the adapter config as
    metadata): rank 2 with alpha 4 (scale 2) on every cross-attention K/V and self-attention Q, B moved off its
    zero start by seeded noise."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    cfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn2.to_k", "attn2.to_v",
                                                                                       "attn1.to_q"])
    unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), unet_lora_adapter_metadata=cfg.to_dict())
    return out


def test_a_lora_fine_tune_matches_diffusers_and_finds_its_exemplars(tmp_path, tiny_dataset, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from abu_explorer import artifacts, cli
    from abu_explorer.model import load

    lora = build_lora(build_pipeline(tmp_path / "pipe"), tmp_path / "lora")
    pipe, images, ex = precompute_fine_tune(tmp_path, tiny_dataset, "--lora", lora, "glyph art")
    out = tmp_path / "tables"
    backend = load(out)  # reloaded from backend.json: the LoRA merged again, the exemplars after the rows
    assert backend.exemplars == [6, 7] and backend.spec.lora == str(lora)
    assert not [k for k in backend.unet.state_dict() if "lora" in k or "base_layer" in k]  # plain modules again
    # the same network as diffusers' own LoRA loading (unmerged peft layers, scale 2 from the metadata)
    ref = StableDiffusionPipeline.from_pretrained(pipe, safety_checker=None)
    plain_unet_hash = artifacts.state_hash(ref.unet.state_dict())
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        ctx = backend.encode_text(["glyph art"])
        plain_out = ref.unet(x, t, ctx).sample
        ref.load_lora_weights(lora)
        assert torch.allclose(backend.unet(x, t, ctx).sample, ref.unet(x, t, ctx).sample, atol=1e-5)
        assert not torch.allclose(backend.unet(x, t, ctx).sample, plain_out, atol=1e-3)  # the LoRA does something
    assert backend.provenance()["unet_hash"] != plain_unet_hash  # every cached result names the merged weights
    capsys.readouterr()
    assert cli.main(["evaluate", "customized", "--precomputed", str(out), "--prompt", "glyph art",
                     "--methods", "pixel,random", "--results", str(tmp_path / "res")]) == 0
    assert "2 exemplars among 8 rows" in capsys.readouterr().out
    # one-line errors: a missing LoRA, a pickle file, text-encoder layers, exemplars without a fine-tune
    (tmp_path / "lora.bin").write_bytes(b"not read")
    state = load_file(lora / "pytorch_lora_weights.safetensors")
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 16)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(16, 2)
    save_file(state, tmp_path / "with_text.safetensors")
    for extra, message in ((["--lora", str(tmp_path / "nope")], "no pytorch_lora_weights.safetensors"),
                           (["--lora", str(tmp_path / "lora.bin")], "from .safetensors only"),
                           (["--lora", str(tmp_path / "with_text.safetensors")], "text-encoder LoRA layers"),
                           (["--exemplars", str(ex)], "images of a fine-tune")):
        capsys.readouterr()
        assert cli.main(["precompute", "--model", str(pipe), "--data", str(images), "--out", str(tmp_path / "o3"),
                         "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
