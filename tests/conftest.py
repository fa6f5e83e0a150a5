"""Tiny seeded components: a 24-image slice of the real dataset and a model small enough to train in
seconds, built through the same code path as the shipped model (``abu_explorer.training.build``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# ABU_TEST_THREADS=1 leaves a core free when a long job runs beside the tests
THREADS = int(os.environ.get("ABU_TEST_THREADS", min(2, os.cpu_count() or 1)))
torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parent.parent
PRECOMPUTED = ROOT / "precomputed"

TINY_AE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 8, 16], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32,
}
TINY_CLIP = {
    "embed_dim": 16, "custom_text": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 8, "width": 16, "heads": 2, "layers": 1, "mlp_ratio": 2.0,
                 "pad_id": 0, "eos_id": 2, "pool_type": "eos", "no_causal_mask": True},
}
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
    "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"] * 2,
    "up_block_types": ["CrossAttnUpBlock2D"] * 2, "cross_attention_dim": 16, "attention_head_dim": 2,
    "norm_num_groups": 8,
}


@pytest.fixture(scope="session", autouse=True)
def _gradient_tables_stay_in_the_session(tmp_path_factory):
    """IF's per-row gradient tables (``attribution.gradient_table``) go to a temporary folder, not the user cache."""
    os.environ.setdefault("ABU_GRADIENT_TABLES", str(tmp_path_factory.mktemp("gradient_tables")))


@pytest.fixture(autouse=True)
def _thread_count_is_left_alone():
    """A test that changes torch's thread count changes the arithmetic of every test after it. The count is read
    here and in a new thread: ``torch.set_num_threads`` called in another thread leaves this one's count alone but
    sets the count every thread started later begins with (a thread pool's workers, the app's handlers)."""
    yield
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        threads = torch.get_num_threads(), pool.submit(torch.get_num_threads).result()
    if threads != (THREADS, THREADS):
        torch.set_num_threads(THREADS)
        pytest.fail(f"this test left torch at {threads[0]} threads here and {threads[1]} in a new thread (the suite "
                    f"runs at {THREADS}); restore it in the thread that changed it or here")


@pytest.fixture(scope="session")
def full_dataset():
    from abu_explorer import data

    return data.build_openmoji(data.DataConfig(), progress=False)


@pytest.fixture(scope="session")
def tiny_dataset(full_dataset):
    from abu_explorer import data

    rows = list(range(300, 2015, 72))[:24]
    images = full_dataset.images[rows]
    captions = [full_dataset.captions[i] for i in rows]
    cfg = data.DataConfig(source="test-slice")
    return data.Dataset(images, captions, [full_dataset.codes[i] for i in rows], cfg,
                        data.content_hash(images, captions))


def tiny_recipes():
    from abu_explorer.training import train

    ae = train.StageConfig(epochs=2, batch_size=8, lr=2e-3, warmup_steps=2,
                           extra={**train.AE_RECIPE.extra, "bf16_autocast": "off", "holdout_every": 6})
    clip = train.StageConfig(epochs=2, batch_size=12, lr=2e-3, warmup_steps=2)
    unet = train.StageConfig(epochs=3, batch_size=8, lr=2e-3, warmup_steps=2, extra=train.UNET_RECIPE.extra)
    return ae, clip, unet


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_dataset):
    from abu_explorer.training import build, train

    out = tmp_path_factory.mktemp("tiny") / "precomputed"
    runs = out.parent / "runs"
    ae, clip, unet = tiny_recipes()
    build.write_dataset_record(tiny_dataset, out)
    decoder = train.StageConfig(epochs=1, batch_size=8, lr=1e-3, warmup_steps=2, max_grad_norm=0.0, seed=1,
                                extra={**train.AE_DECODER_RECIPE.extra, "bf16_autocast": "off", "holdout_every": 6})
    build.build_autoencoder(tiny_dataset, out, runs, ae, progress=False, config=TINY_AE, decoder_recipe=decoder)
    build.build_clip(tiny_dataset, out, runs, clip, progress=False, config=TINY_CLIP)
    build.build_unet(tiny_dataset, out, runs, unet, progress=False, config=TINY_UNET)
    return out


@pytest.fixture(scope="session")
def tiny_explorer(tiny_model_dir, tiny_dataset):
    from abu_explorer.model.embedded import Explorer

    return Explorer.load(tiny_model_dir, dataset=tiny_dataset)


@pytest.fixture(scope="session")
def shipped_explorer():
    from abu_explorer.model.embedded import Explorer

    if not (PRECOMPUTED / "unet" / "train_meta.json").exists():
        pytest.fail(f"shipped model missing under {PRECOMPUTED}; build it with: python -m abu_explorer train --out precomputed --force")
    return Explorer.load(PRECOMPUTED)


@pytest.fixture(scope="session")
def tiny_app(tiny_model_dir, tiny_dataset, tmp_path_factory):
    """An ExplorerApp on the tiny model with every method's tables and a seconds-long retrain recipe."""
    import shutil

    from abu_explorer.app.service import ExplorerApp
    from abu_explorer.attribution import abu_precompute, dtrak, influence, trak
    from abu_explorer.model.embedded import Explorer

    root = tmp_path_factory.mktemp("tiny-app") / "precomputed"
    shutil.copytree(tiny_model_dir, root)
    exp = Explorer.load(root, dataset=tiny_dataset)
    abu_precompute.precompute(exp, abu_precompute.AbUConfig(fisher_passes=1, num_timesteps=2, batch_size=16),
                              progress=False)
    dtrak.precompute(exp, dtrak.DTrakConfig(num_timesteps=2, proj_dim=8, batch_size=8), progress=False)
    trak.precompute(exp, dtrak.DTrakConfig(num_timesteps=2, proj_dim=8, batch_size=8), progress=False)
    influence.precompute(exp, influence.IFConfig(num_timesteps=2, batch_size=8, fit_draws=1), progress=False)
    return ExplorerApp(exp, root.parent / "results", recipe=tiny_recipes()[2])


@pytest.fixture(scope="session")
def tiny_server(tiny_app):
    """The real Gradio app on the tiny model, launched on a free loopback port."""
    import sys

    sys.path.insert(0, str(ROOT))
    import app as app_module

    demo = app_module.build_demo(tiny_app)
    demo.queue(max_size=32, default_concurrency_limit=1)
    # show_error stays off, as in production: only gr.Error messages (our readable ones) reach the client
    from abu_explorer.app.demo import LAUNCH

    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                            **LAUNCH)
    yield url
    demo.close()
