"""The model benchmark's comparison mode on the tiny model: figures for every folder, side by side."""
import pytest

from abu_explorer.bench import model as bench


def test_compare_reports_every_model_side_by_side(tiny_explorer, tiny_model_dir, tmp_path):
    report = bench.compare({str(tiny_model_dir): (tiny_explorer, 50, None), "again": (tiny_explorer, 10, 5.0)}, count=4,
                           out=tmp_path, rounds=1)
    assert list(report["models"]) == [str(tiny_model_dir), "again"]
    row = report["models"][str(tiny_model_dir)]
    for key in ("clip_top1", "clip_top10", "pixel_nn_top1", "pixel_nn_top5", "generate_1_image_50_steps_s",
                "train_img_per_s", "retrain_estimate_min"):
        assert key in row and row[key] >= 0, key
    assert 0 <= row["pixel_nn_top1"] <= row["pixel_nn_top5"] <= 1
    table = bench.compare_table(report)
    assert "pixel-NN top-1" in table and str(tiny_model_dir) in table
    assert list(tmp_path.glob("samples_*.png"))
    assert {r["figure"] for r in report["paired"]} == {"CLIP top-10", "pixel-NN top-1", "pixel-NN top-5"}
    assert all(r["model"] == "again" and 0 <= r["p"] <= 1 for r in report["paired"])


def test_pixel_nn_finds_training_images_themselves(tiny_explorer):
    import torch

    rows = torch.tensor([0, 5, 9])
    out = bench.pixel_nn(tiny_explorer, tiny_explorer.dataset.as_tensor()[rows], rows)
    assert out["top1"] == 1.0 and out["top5"] == 1.0


def test_mcnemar_exact_p():
    assert bench.mcnemar_p(0, 0) == 1.0
    assert abs(bench.mcnemar_p(5, 5) - 1.0) < 1e-12
    assert abs(bench.mcnemar_p(10, 0) - 2 / 2**10) < 1e-12  # all 10 discordant pairs one way
    assert bench.mcnemar_p(30, 10) < 0.01 < bench.mcnemar_p(12, 8)


def test_entry_syntax_is_checked(tmp_path):
    import pytest

    for bad in ("x@euler:10", "x@ddim", "x@ddim:ten", "x@ddim:10:5:1"):
        with pytest.raises(ValueError, match="SAMPLER:STEPS"):
            bench.load_entry(bad)


def test_quality_curve_reads_every_snapshot(tiny_model_dir, tiny_dataset, tmp_path, monkeypatch):
    """The quality-vs-time curve: one point per snapshot, with that snapshot's own training time, and the
    model's final weights back in place afterwards."""
    import torch

    from abu_explorer import artifacts
    from abu_explorer.bench import curves
    from abu_explorer.model.embedded import Explorer

    exp = Explorer.load(tiny_model_dir, dataset=tiny_dataset)
    monkeypatch.setattr(bench, "load_entry", lambda entry: (exp, 5, None))  # the tiny data is not OpenMoji's
    snaps = tmp_path / "snaps"
    final = {k: v.clone() for k, v in exp.unet.state_dict().items()}
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in final.items()}
    artifacts.save_safetensors(snaps / "epoch0001.safetensors", noisy, {"seconds": "6.0", "epoch": "1"})
    artifacts.save_safetensors(snaps / "epoch0003.safetensors", final, {"seconds": "18.0", "epoch": "3"})
    report = curves.curves([f"{tiny_model_dir}={snaps}"], count=4)
    (c,) = report["curves"]
    assert [p["epoch"] for p in c["points"]] == [1, 3] and [p["train_minutes"] for p in c["points"]] == [0.1, 0.3]
    assert all(0 <= p["pixel_nn_top1"] <= p["pixel_nn_top5"] <= 1 for p in c["points"])
    assert all(torch.equal(v, final[k]) for k, v in exp.unet.state_dict().items())
    curves.plot(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="no UNet snapshots"):
        curves.curve(f"{tiny_model_dir}={tmp_path / 'none'}", 4)


def test_bench_scale_pieces_on_the_tiny_model(tiny_explorer):
    from abu_explorer.bench import scale

    sizes = scale.sizes(tiny_explorer)
    emb = sizes[0]["bytes"]
    assert emb["latents (disk, mapped)"] == 4 * 4 * 8 * 8 and emb["rendered images, uint8 (disk, mapped)"] == 32 * 32 * 3
    assert sizes[1]["bytes"]["text states (disk, mapped)"] == 4 * 5 * 77 * 1024  # MSCOCO: five captions
    curve = scale.scan_curve(tiny_explorer, [6, 12, 24, 48])  # rows past N = 24 repeat the set
    assert len(curve["seconds"]) == 4 and curve["seconds_per_row"] > 0 and curve["gflop_per_row"] > 0
    assert 0 < curve["share_before_first_cross_attention"] < 1
    stages = scale.embedded_stages(tiny_explorer, 4)
    assert all(v > 0 for k, v in stages.items() if "pixel" not in k)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
               cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    cost = scale.scale_unet(cfg, (4, 8, 8), (5, 16), batch=2)
    proj = scale.projections(cost, captions=5, n=1000, gpu_tflops=50)
    base = proj["AbU base losses (= one exact AbU query)"]
    assert base["items"] == 1000 * 5 * 10 and abs(base["cpu_hours"] - 50_000 * cost["forward_s"] / 3600) < 1e-9


def test_methods_bench_builds_the_if_table_in_a_throwaway_folder(tiny_app, tiny_dataset, tmp_path, monkeypatch):
    """``bench methods --exact --precompute`` times IF's table build apart, in a folder of its own that is
    removed afterwards; the user's table folder setting is untouched."""
    import os
    from argparse import Namespace

    from abu_explorer.bench import methods
    from abu_explorer.model.embedded import Explorer

    load = Explorer.load.__func__
    monkeypatch.setattr(Explorer, "load", classmethod(lambda cls, path, **k: load(cls, path, dataset=tiny_dataset)))
    monkeypatch.setenv("ABU_GRADIENT_TABLES", str(tmp_path / "kept"))
    args = Namespace(precomputed=str(tiny_app.explorer.root), queries=1, methods=["if"], exact=True, precompute=True,
                     json=str(tmp_path / "bench.json"))
    report = methods.main(args)
    rows = {r["mode"]: r for r in report["methods"]}
    assert rows["fast"]["precompute_seconds"] > 0 and rows["exact"]["exact_setup_seconds"] > 0
    assert rows["exact"]["count"] == 1 and rows["exact"]["median_seconds"] > 0
    assert not (tmp_path / "kept").exists()  # the table was built elsewhere
    assert os.environ["ABU_GRADIENT_TABLES"] == str(tmp_path / "kept")
    assert (tmp_path / "bench.json").exists()
