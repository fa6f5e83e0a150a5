import json
import shutil

import numpy as np
import pytest
import torch

from abu_explorer import artifacts
from abu_explorer.model.embedded import Explorer
from abu_explorer.model.tokenizer import PromptError


def test_tiny_model_generates_deterministically(tiny_explorer):
    a = tiny_explorer.generate("red apple", seed=3, steps=5)
    b = tiny_explorer.generate("red apple", seed=3, steps=5)
    c = tiny_explorer.generate("red apple", seed=4, steps=5)
    assert a.image.size == (32, 32)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert torch.equal(a.latent, b.latent)
    assert not torch.equal(a.latent, c.latent)


def test_batch_and_single_generation_agree(tiny_explorer):
    single = tiny_explorer.generate("red apple", seed=1, steps=4)
    batch = tiny_explorer.generate_batch(["flag: brazil", "red apple"], [0, 1], steps=4)
    # batched matmuls round differently (more so with one thread): equal to 1e-5 of the latent scale
    scale = float(single.latent.abs().max())
    assert float((single.latent - batch[1].latent).abs().max()) < 1e-5 * scale


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "word " * 40}, "at most"),
    ({"prompt": "red apple", "seed": -1}, "seed"),
    ({"prompt": "red apple", "steps": 0}, "steps"),
    ({"prompt": "red apple", "steps": 5000}, "steps"),
    ({"prompt": "red apple", "guidance": -2.0}, "guidance"),
])
def test_bad_generation_input_is_a_clear_error(tiny_explorer, kwargs, match):
    kwargs = {"seed": 0, "steps": 3, **kwargs}
    with pytest.raises((PromptError, ValueError), match=match):
        tiny_explorer.generate(**kwargs)


def test_unknown_words_are_reported(tiny_explorer):
    g = tiny_explorer.generate("zebra crossing", seed=0, steps=2)
    assert "zebra" in g.unknown_words


def test_missing_and_mismatched_artifacts_name_path_and_command(tiny_model_dir, tmp_path):
    broken = tmp_path / "precomputed"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(artifacts.ArtifactError, match=r"unet/train_meta.json.*train --only unet"):
        Explorer.load(broken)
    shutil.copytree(tiny_model_dir / "unet", broken / "unet")
    meta = json.loads((broken / "unet" / "train_meta.json").read_text())
    meta["clip_hash"] = "deadbeef"
    (broken / "unet" / "train_meta.json").write_text(json.dumps(meta))
    with pytest.raises(artifacts.ArtifactError, match="another clip"):
        Explorer.load(broken)
    with pytest.raises(artifacts.ArtifactError, match="not found"):
        Explorer.load(tmp_path / "nowhere")


def test_training_cache_shapes(tiny_explorer):
    cache = tiny_explorer.training_cache()
    n = len(tiny_explorer.dataset)
    assert cache.latents.shape == (n, 4, 8, 8)
    assert cache.text_states.shape == (n, 16, 16) and cache.null_state.shape == (1, 16, 16)


def test_embedded_model_implements_the_backend_interface(tiny_explorer):
    from abu_explorer.model.backend import ModelBackend

    assert isinstance(tiny_explorer, ModelBackend)
    members = [n for n in vars(ModelBackend) if not n.startswith("_")]
    assert {"encode_text", "encode_images", "decode", "generate", "training_cache", "dataset"} <= set(members)


def test_dpm_solver_sampler_is_deterministic(tiny_explorer):
    import numpy as np

    ddim = np.asarray(tiny_explorer.generate("red apple", seed=3, steps=10).image)
    tiny_explorer.sampler = "dpmpp"
    try:
        a = np.asarray(tiny_explorer.generate("red apple", seed=3, steps=10).image)
        b = np.asarray(tiny_explorer.generate("red apple", seed=3, steps=10).image)
    finally:
        tiny_explorer.sampler = "ddim"
    assert np.array_equal(a, b) and not np.array_equal(a, ddim)
    assert np.array_equal(ddim, np.asarray(tiny_explorer.generate("red apple", seed=3, steps=10).image))
