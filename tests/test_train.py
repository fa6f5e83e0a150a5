import pytest
import torch

from abu_explorer.model import components as models
from abu_explorer.training import train
from conftest import TINY_UNET


def _setup(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 4, 8, 8, generator=g)
    states = torch.randn(n, 16, 16, generator=g)
    null = torch.zeros(1, 16, 16)
    sched = models.build_scheduler(models.model_config("scheduler"))
    cfg = train.StageConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, extra=train.UNET_RECIPE.extra)
    return lat, states, null, sched, cfg


def _fresh_unet():
    torch.manual_seed(0)
    return models.build_unet(TINY_UNET)


def test_same_seed_same_weights_bit_for_bit():
    lat, states, null, sched, cfg = _setup()
    a, b = _fresh_unet(), _fresh_unet()
    train.train_unet(a, sched, lat, states, null, cfg, progress=False)
    train.train_unet(b, sched, lat, states, null, cfg, exclude=set(), progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    lat, states, null, sched, cfg = _setup()
    ref = _fresh_unet()
    train.train_unet(ref, sched, lat, states, null, cfg, progress=False)

    def stop(epoch, log):
        if epoch == 1:
            raise KeyboardInterrupt

    first = _fresh_unet()
    with pytest.raises(KeyboardInterrupt):
        train.train_unet(first, sched, lat, states, null, cfg, run_dir=tmp_path, progress=False, on_epoch_end=stop)
    resumed = _fresh_unet()  # a new process would start from fresh weights and read the checkpoint
    log = train.train_unet(resumed, sched, lat, states, null, cfg, run_dir=tmp_path, progress=False)
    assert len(log["loss"]) == 2
    for (k, va), vb in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(va, vb), k


def test_leave_k_out_never_sees_excluded_rows(monkeypatch):
    lat, states, null, sched, cfg = _setup()
    excluded = {3, 7, 11}
    seen = []
    original = train.epoch_batches

    def spy(rows, epoch, c):
        batches = original(rows, epoch, c)
        seen.extend(int(i) for b in batches for i in b)
        return batches

    monkeypatch.setattr(train, "epoch_batches", spy)
    train.train_unet(_fresh_unet(), sched, lat, states, null, cfg, exclude=excluded, progress=False)
    assert len(seen) == 2 * (len(lat) - len(excluded)) and not excluded & set(seen)
    with pytest.raises(ValueError, match="outside"):
        train.train_unet(_fresh_unet(), sched, lat, states, null, cfg, exclude={99}, progress=False)


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = train.StageConfig(epochs=1, batch_size=1, lr=1.0, warmup_steps=10)
    assert train.lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert train.lr_at(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_unet_draws_are_the_ones_the_shipped_model_was_trained_with():
    """Golden values: batch order and per-step draws of the shipped recipe. A leave-K-out retrain only
    reproduces the shipped model (K = 0, bit for bit) while these stay the same; a refactor that reorders
    the draws fails here instead of silently shifting every counterfactual result."""
    cfg = train.UNET_RECIPE
    assert train.epoch_batches(torch.arange(2015), 149, cfg)[0][:8].tolist() == [1613, 443, 99, 1769, 732, 806, 665, 650]
    side, t, noise, drop = train.unet_step_draws(2371, 128, (4, 8, 8), True, 1000, cfg)
    assert side[:8].tolist() == [0, 1, 0, 0, 1, 1, 0, 1]
    assert t[:8].tolist() == [736, 406, 659, 96, 447, 447, 530, 7]
    assert drop.nonzero().flatten()[:6].tolist() == [2, 3, 9, 34, 55, 59]
    assert noise.shape == (128, 4, 8, 8)
    assert noise[0, 0, 0, :3].tolist() == pytest.approx([-0.26868960, 0.29376397, 1.56628001], abs=1e-6)
    assert noise.sum().item() == pytest.approx(61.495674, abs=1e-3)
    side, t, noise, drop = train.unet_step_draws(2371, 128, (4, 8, 8), False, 1000, cfg)
    assert side is None and t[:3].tolist() != [736, 406, 659]  # without flips the timesteps come first


def _with_ema(cfg, decay):
    import dataclasses

    return dataclasses.replace(cfg, extra={**cfg.extra, "ema_decay": decay})


def test_ema_of_the_weights_is_what_training_returns():
    lat, states, null, sched, cfg = _setup()
    raw, tiny_decay, ema = _fresh_unet(), _fresh_unet(), _fresh_unet()
    train.train_unet(raw, sched, lat, states, null, cfg, progress=False)
    train.train_unet(tiny_decay, sched, lat, states, null, _with_ema(cfg, 1e-12), progress=False)
    train.train_unet(ema, sched, lat, states, null, _with_ema(cfg, 0.9), progress=False)
    for (k, a), b, c in zip(raw.state_dict().items(), tiny_decay.state_dict().values(), ema.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k  # decay ~0: the average is the last weights
    moved = [k for (k, a), c in zip(raw.state_dict().items(), ema.state_dict().values()) if not torch.equal(a, c)]
    assert moved, "an EMA with decay 0.9 must differ from the raw weights"


def test_resume_with_ema_equals_uninterrupted_run(tmp_path):
    lat, states, null, sched, cfg = _setup()
    cfg = _with_ema(cfg, 0.9)
    ref = _fresh_unet()
    train.train_unet(ref, sched, lat, states, null, cfg, progress=False)
    seen = []

    def stop(epoch, log):
        seen.append({k: v.clone() for k, v in first.state_dict().items()})  # the EMA weights are swapped in here
        raise KeyboardInterrupt

    first = _fresh_unet()
    with pytest.raises(KeyboardInterrupt):
        train.train_unet(first, sched, lat, states, null, cfg, run_dir=tmp_path, progress=False, on_epoch_end=stop)
    assert any(not torch.equal(seen[0][k], v) for k, v in first.state_dict().items()), "raw weights restored after"
    resumed = _fresh_unet()
    train.train_unet(resumed, sched, lat, states, null, cfg, run_dir=tmp_path, progress=False)
    for (k, va), vb in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(va, vb), k


def test_the_decoder_phase_leaves_the_encoder_and_so_the_unet_valid(tiny_model_dir, tmp_path):
    """Phase 2 trains the decoder alone: every latent (and the UNet trained on them) stays valid; a changed
    encoder is refused at load with the command that rebuilds the UNet."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    from abu_explorer import artifacts
    from abu_explorer.model.embedded import Explorer

    meta = json.loads((tiny_model_dir / "autoencoder" / "train_meta.json").read_text())
    assert meta["decoder_recipe"]["epochs"] >= 1 and "heldout_psnr_db" in meta["decoder_log"]
    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "autoencoder")
    assert models.encoder_hash(vae) == meta["encoder_hash"]
    unet_meta = json.loads((tiny_model_dir / "unet" / "train_meta.json").read_text())
    assert unet_meta["encoder_hash"] == meta["encoder_hash"]

    before = {k: v.clone() for k, v in vae.state_dict().items()}
    images = torch.rand(12, 3, 32, 32) * 2 - 1
    cfg = train.StageConfig(epochs=1, batch_size=4, lr=1e-3, warmup_steps=1, max_grad_norm=0.0,
                            extra={"l1_weight": 0.1, "holdout_every": 6, "bf16_autocast": "off"})
    train.finetune_decoder(vae, images, cfg, progress=False)
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert all(p.requires_grad for p in vae.parameters())  # the frozen encoder is handed back trainable

    other = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    state["encoder.conv_in.bias"] += 0.01
    artifacts.save_safetensors(other / "autoencoder" / "diffusion_pytorch_model.safetensors", state)
    with pytest.raises(artifacts.ArtifactError, match="trained on another encoder.*--only unet"):
        Explorer.load(other)
