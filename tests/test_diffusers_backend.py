"""A user's own diffusers model and image folder, end to end, offline: tiny Stable-Diffusion-style pipelines
built here from small configs, saved with ``save_pretrained`` and loaded back through ``from_pretrained``."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abu_explorer.attribution import names
from abu_explorer.model.tokenizer import PromptError

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:-'"


def _tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose vocabulary is single characters (no merges): enough for any caption."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=24)


def build_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A seeded tiny StableDiffusionPipeline: 32 px images, 8x8x4 latents, a 1-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tokenizer(folder.parent / f"{folder.name}-tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    vae = AutoencoderKL(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


CAPTION_LISTS = {3: ["a drawing of {}"], 6: ["{} icon", "an emoji of {}"]}  # extra captions of two images


def build_imagefolder(folder: Path, dataset, n: int = 10) -> Path:
    """``metadata.jsonl`` + images in a subfolder; one RGBA image and one non-square image among them, and
    caption lists for images 3 and 6 (when there are that many)."""
    (folder / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = Image.fromarray(dataset.images[i])
        if i == 1:
            img = img.convert("RGBA")
        if i == 2:  # 32 x 48: the centre crop keeps the glyph
            canvas = Image.new("RGB", (32, 48), "white")
            canvas.paste(img, (0, 8))
            img = canvas
        img.save(folder / "train" / f"{i:03d}.png")
        c = dataset.captions[i]
        text = [c] + [e.format(c) for e in CAPTION_LISTS[i]] if i in CAPTION_LISTS else c
        lines.append(json.dumps({"file_name": f"train/{i:03d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def user_model(tmp_path_factory, tiny_dataset, tiny_model_dir):
    """precompute --model PIPELINE --data FOLDER --out DIR --method all, through the CLI."""
    from abu_explorer import cli

    tmp = tmp_path_factory.mktemp("user-model")
    pipe = build_pipeline(tmp / "pipe")
    images = build_imagefolder(tmp / "images", tiny_dataset)
    out = tmp / "tables"
    argv = ["precompute", "--model", str(pipe), "--data", str(images), "--out", str(out), "--method", "all",
            "--clip", str(tiny_model_dir / "clip"), "--timesteps", "2", "--fisher-passes", "1", "--proj-dim", "6", "--quiet"]
    assert cli.main(argv) == 0
    return tmp, out


def test_imagefolder_policy_and_order(user_model, tiny_dataset):
    from abu_explorer import data

    tmp, _ = user_model
    ds = data.load_image_folder(tmp / "images", 32)
    assert ds.captions == tiny_dataset.captions[:10] and ds.codes[0] == "train/000.png"
    assert ds.caption_lists[6] == [tiny_dataset.captions[6]] + [e.format(tiny_dataset.captions[6]) for e in CAPTION_LISTS[6]]
    assert ds.caption_lists[0] == [tiny_dataset.captions[0]]
    assert np.array_equal(ds.images[0], tiny_dataset.images[0])
    assert np.array_equal(ds.images[1], tiny_dataset.images[1])  # RGBA on white = the RGB original
    assert np.array_equal(ds.images[2], tiny_dataset.images[2])  # centre crop of the padded 32 x 48


def test_every_method_ranks_whole_image_and_box(user_model):
    from abu_explorer.app.service import ExplorerApp
    from abu_explorer.model import load
    from abu_explorer.model.diffusers_backend import PipelineBackend

    tmp, out = user_model
    backend = load(out)
    assert isinstance(backend, PipelineBackend) and backend.image_size == 32
    app = ExplorerApp(backend, tmp / "results")
    gen = {"type": "generated", "prompt": "red apple", "seed": 1, "steps": 3, "guidance": 2.0}
    for name in names():
        for box in (None, (0, 0, 16, 20)):
            out_ = app.attribute(app.query(gen, box), name, 4)
            assert [r["rank"] for r in out_["results"]] == [1, 2, 3, 4], name
            assert all(np.isfinite(r["score"]) for r in out_["results"]), name
    a, b = backend.generate("red apple", 1, 3, 2.0), backend.generate("red apple", 1, 3, 2.0)
    assert torch.equal(a.latent, b.latent) and a.image.size == (32, 32)
    from abu_explorer.attribution import query as q

    train = app.attribute(q.from_training_image(backend, 4), "pixel", 1)
    assert train["results"][0]["index"] == 4  # a training image's nearest pixels are its own


def test_caption_lists_average_every_loss(user_model):
    """An image's caption states are rows of the cache; AbU's exact score of an image with three captions is
    the loss change averaged over them, measured here one caption at a time by the reference loop."""
    from abu_explorer.attribution import abu as abu_method
    from abu_explorer.attribution import query as q_
    from abu_explorer.attribution.ddpm_loss import reference_loss_table
    from abu_explorer.model import load

    tmp, out = user_model
    backend = load(out)
    cache = backend.training_cache()
    lists = backend.dataset.caption_lists
    assert len(cache.text_states) == sum(len(c) for c in lists) == 10 + 1 + 2
    rows = cache.caption_rows(torch.tensor([6, 0]))
    assert cache.caption_image[rows].tolist() == [6, 6, 6, 0]
    assert torch.allclose(cache.text_states[rows[1]], backend.encode_text([lists[6][1]])[0])
    values = torch.arange(len(cache.text_states), dtype=torch.float64)[:, None]
    means = cache.per_image(values)[:, 0]
    for i in range(10):
        own = [r for r in range(len(values)) if int(cache.caption_image[r]) == i]
        assert means[i] == pytest.approx(float(values[own].mean()))
    method = abu_method.AbU.load(backend, out / "abu")
    q = q_.from_training_image(backend, 6)
    delta = method.unlearn(q)
    got = method.rescore(delta, torch.tensor([6, 3, 0]))
    own = rows[:3]
    before = reference_loss_table(backend.unet, backend.scheduler, cache.latents, cache.text_states,
                                  method.tables.timesteps, method.cfg.noise_seed, cache.caption_image)
    with method.applied(delta):
        after = reference_loss_table(backend.unet, backend.scheduler, cache.latents, cache.text_states,
                                     method.tables.timesteps, method.cfg.noise_seed, cache.caption_image)
    assert torch.allclose(before, method.tables.base_losses, rtol=1e-4, atol=1e-6)
    expected = (after[own] - before[own]).mean(dim=(0, 2)).max()
    assert float(got[0]) == pytest.approx(float(expected), rel=1e-3, abs=1e-7)
    single = (after[rows[3]] - before[rows[3]]).mean(dim=1).max()
    assert float(got[2]) == pytest.approx(float(single), rel=1e-3, abs=1e-7)


def test_cli_commands_take_the_precomputed_folder(user_model, capsys):
    from abu_explorer import cli

    tmp, out = user_model
    assert cli.main(["attribute", "--precomputed", str(out), "--prompt", "red apple", "--steps", "2",
                     "--method", "abu", "--k", "3", "--json", str(tmp / "r.json")]) == 0
    assert len(json.loads((tmp / "r.json").read_text())["results"]) == 3
    assert cli.main(["generate", "--precomputed", str(out), "--prompt", "red apple", "--steps", "2",
                     "--out", str(tmp / "g.png")]) == 0
    capsys.readouterr()
    assert cli.main(["attribute", "--model", str(out), "--prompt", "x"]) == 2  # the old spelling: a hint
    assert "--precomputed" in capsys.readouterr().err


def test_tables_are_checked_against_the_data(user_model, tmp_path):
    import shutil

    from abu_explorer import artifacts
    from abu_explorer.model import load

    tmp, out = user_model
    copy = tmp_path / "tables"
    shutil.copytree(out, copy)
    images = tmp_path / "images"
    shutil.copytree(tmp / "images", images)
    doc = json.loads((copy / "backend.json").read_text())
    doc["data_folder"] = str(images)
    (copy / "backend.json").write_text(json.dumps(doc))
    Image.new("RGB", (32, 32), "red").save(images / "train" / "000.png")
    with pytest.raises(artifacts.ArtifactError, match="precompute --model"):
        load(copy)


def test_v_prediction_target_is_read_from_the_scheduler(tmp_path, tiny_dataset):
    from abu_explorer.attribution.ddpm_loss import ddpm_losses
    from abu_explorer.model.diffusers_backend import PipelineBackend, PipelineSpec

    pipe = build_pipeline(tmp_path / "pipe-v", "v_prediction")
    backend = PipelineBackend.load(PipelineSpec(str(pipe)), build_imagefolder(tmp_path / "img", tiny_dataset, 3),
                                   tmp_path / "out")
    x0 = backend.training_cache().latents[:2]
    ctx = backend.training_cache().text_states[:2]
    t, noise = torch.tensor([100, 700]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ddpm_losses(backend.unet, backend.scheduler, x0, t, noise, ctx)
        pred = backend.unet(backend.scheduler.add_noise(x0, noise, t), t, ctx).sample
    ab = backend.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.allclose(got, (pred - v).pow(2).mean(dim=(1, 2, 3)), atol=1e-6)
    assert not torch.allclose(got, (pred - noise).pow(2).mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_unet_weights_with_named_components(tmp_path, tiny_dataset, fmt):
    """The MSCOCO-paper layout: a UNet config + weights, the VAE / text encoder / scheduler from a pipeline."""
    from safetensors.torch import save_file

    from abu_explorer.model.diffusers_backend import PipelineBackend, PipelineSpec

    pipe = build_pipeline(tmp_path / "pipe")
    cfg = json.loads((pipe / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    other = UNet2DConditionModel.from_config(cfg)  # other weights than the pipeline's UNet
    (tmp_path / "unet.json").write_text(json.dumps(cfg))
    weights = tmp_path / f"unet.{fmt}"
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(state, str(weights)) if fmt == "safetensors" else torch.save(state, weights)
    spec = PipelineSpec(str(pipe), unet_config=str(tmp_path / "unet.json"), unet_weights=str(weights))
    backend = PipelineBackend.load(spec, build_imagefolder(tmp_path / "img", tiny_dataset, 3), tmp_path / "out")
    for k, v in other.state_dict().items():
        assert torch.equal(backend.unet.state_dict()[k], v), k


def test_bad_model_and_data_are_one_line_errors(tmp_path, tiny_dataset, capsys):
    from abu_explorer import cli

    pipe = build_pipeline(tmp_path / "pipe")
    images = build_imagefolder(tmp_path / "img", tiny_dataset, 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n')
    lists = tmp_path / "lists"
    lists.mkdir()
    Image.new("RGB", (8, 8)).save(lists / "a.png")
    (lists / "metadata.jsonl").write_text('{"file_name": "a.png", "text": ["one", " "]}\n')
    cases = [
        (["--model", str(tmp_path / "missing"), "--data", str(images)], "cannot load the diffusers model"),
        (["--model", str(pipe), "--data", str(bad)], "not found"),
        (["--model", str(pipe), "--data", str(lists)], "non-empty list"),
        (["--model", str(pipe)], "all three"),
    ]
    capsys.readouterr()
    for extra, match in cases:
        code = cli.main(["precompute", *extra, "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and match in err, (extra, err)
    # the embedded recipe trains on one caption per image: a folder with lists is refused, not truncated
    assert cli.main(["train", "--data", str(build_imagefolder(tmp_path / "img7", tiny_dataset, 7)),
                     "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one caption per image" in err and not (tmp_path / "m").exists()
    from abu_explorer.model.diffusers_backend import PipelineBackend, PipelineSpec

    backend = PipelineBackend.load(PipelineSpec(str(pipe)), images, tmp_path / "o2")
    with pytest.raises(PromptError, match="at most 24"):
        backend.check_prompt("a very long prompt " * 3)
    with pytest.raises(PromptError, match="empty"):
        backend.generate("  ")


def test_the_app_serves_a_user_model(user_model):
    """The launched page on the diffusers model: generate and every method through gradio_client; the
    remove-and-regenerate tab says in one line why it is not offered."""
    import sys

    from gradio_client import Client

    from abu_explorer.app.service import ExplorerApp
    from abu_explorer.model import load

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import app as app_module

    tmp, out = user_model
    explorer_app = ExplorerApp(load(out), tmp / "results")
    demo = app_module.build_demo(explorer_app)
    demo.queue(max_size=8, default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(url, verbose=False)
        image, *_ = client.predict("red apple", 2, 3, 2.0, api_name="/generate")
        assert image.endswith(".png")
        for name in names():
            head, gallery = client.predict("red apple", 2, 3, 2.0, None, "", 0, 0, 16, 16, 3, names(), "fast",
                                           api_name=f"/attribute_{name}")
            assert len(gallery) == 3, name
        page = demo.config["components"]
        texts = " ".join(str(c.get("props", {}).get("value", "")) for c in page)
        assert "Not available for this model" in texts and "No examples were built" in texts
        assert "OpenMoji" not in texts and str(tmp / "images") in texts  # the About tab credits the user's data
        assert "binds no region to a word" not in texts  # the box caveat is the embedded model's finding
    finally:
        demo.close()
    with pytest.raises(Exception, match="retrains the embedded model only"):
        explorer_app.request_counterfactual(explorer_app.query(
            {"type": "generated", "prompt": "red apple", "seed": 2, "steps": 3, "guidance": 2.0}), "abu", 2)
