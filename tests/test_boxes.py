"""The two-concept box benchmark: composites, the pair rule, the statistics, a resumable run and the command."""
import argparse
import json

import numpy as np
import pytest
from PIL import Image

from abu_explorer.evaluation import boxes, boxes_report, stats


BOX = Image.Resampling.BOX


def test_composites_put_each_source_in_its_box(tiny_dataset):
    s = tiny_dataset.config.image_size
    for layout in boxes.LAYOUTS:
        img, parts = boxes.composite(tiny_dataset, 3, 7, layout)
        assert img.size == (s, s) and {(own, other) for _, own, other in parts} == {(3, 7), (7, 3)}
    img, parts = boxes.composite(tiny_dataset, 3, 7, "halves")
    assert np.array_equal(np.asarray(img)[8:24, :16], np.asarray(tiny_dataset.image(3).resize((16, 16), BOX)))
    assert np.array_equal(np.asarray(img)[8:24, 16:], np.asarray(tiny_dataset.image(7).resize((16, 16), BOX)))
    assert parts[0][0] == (0.0, 0.0, 16.0, 32.0) and parts[1][0] == (16.0, 0.0, 32.0, 32.0)
    img, parts = boxes.composite(tiny_dataset, 3, 7, "pasted")
    x0, y0, x1, y1 = (int(v) for v in parts[1][0])
    assert np.array_equal(np.asarray(img)[y0:y1, x0:x1], np.asarray(tiny_dataset.image(7).resize((x1 - x0,) * 2, BOX)))
    with pytest.raises(ValueError, match="unknown layout"):
        boxes.composite(tiny_dataset, 3, 7, "diagonal")


def test_pair_rule_is_fixed_and_skips_near_duplicates(tiny_explorer):
    pairs = boxes.choose_pairs(tiny_explorer, 4)
    assert pairs == boxes.choose_pairs(tiny_explorer, 4) and len(set(sum(pairs, ()))) == 8
    ds = tiny_explorer.dataset
    assert all(float(boxes._pixels(ds, a) @ boxes._pixels(ds, b)) <= boxes.NEAR_DUPLICATE for a, b in pairs)
    with pytest.raises(ValueError, match="pairs pass the rule"):
        boxes.choose_pairs(tiny_explorer, 100)


def test_statistics_by_hand():
    lo, hi = stats.clopper_pearson(5, 10)  # the textbook interval of 5/10: [0.187, 0.813]
    assert abs(lo - 0.1871) < 1e-3 and abs(hi - 0.8129) < 1e-3
    assert stats.clopper_pearson(0, 10)[0] == 0 and abs(stats.clopper_pearson(0, 10)[1] - 0.3085) < 1e-3
    assert stats.mcnemar_p(0, 5) == pytest.approx(2 / 32) and stats.mcnemar_p(3, 3) == 1.0
    scores = np.array([0.1, 0.9, 0.5, 0.9])
    assert boxes.box_result(scores, 2, 0) == {"own_wins": True, "own_rank": 3, "other_rank": 4, "own_score": 0.5,
                                              "other_score": 0.1}
    assert boxes.box_result(scores, 1, 3)["own_wins"] is False  # a tie is not a win


def test_run_resumes_and_the_command_writes_its_report(tiny_explorer, tmp_path, monkeypatch, capsys):
    pairs = boxes.choose_pairs(tiny_explorer, 2)
    rows = boxes.run_method(tiny_explorer, "pixel", pairs, ["halves"], "exact", tmp_path, progress=False)
    assert len(rows) == 4 and all(1 <= r["own_rank"] <= len(tiny_explorer.dataset) for r in rows)
    assert all(-1 <= r["boxes_spearman"] <= 1 for r in rows)
    assert rows[0]["boxes_spearman"] == rows[1]["boxes_spearman"]  # one value per composite
    from abu_explorer.attribution import query as q

    monkeypatch.setattr(q, "from_image", lambda *a, **k: pytest.fail("a cached box was ranked again"))
    assert boxes.run_method(tiny_explorer, "pixel", pairs, ["halves"], "exact", tmp_path, progress=False) == rows
    monkeypatch.undo()

    import abu_explorer.model as model

    monkeypatch.setattr(model, "load", lambda _: tiny_explorer)
    args = argparse.Namespace(threads=0, layouts="halves,pasted", methods="pixel,random", mode="exact", pairs=2, options="",
                              precomputed="unused", results=str(tmp_path / "r"), assets=str(tmp_path / "a"), quiet=True,
                              force=False)
    assert boxes_report.main(args) == 0
    out = capsys.readouterr().out
    assert "| Pixel NN | " in out and "| Random | " in out and "p = " in out
    summary = json.loads((tmp_path / "a" / "boxes_summary.json").read_text())
    assert summary["methods"]["pixel"]["all"]["boxes"] == 8 and "versus_first" in summary["methods"]["random"]
    assert abs(summary["methods"]["random"]["all"]["boxes_spearman"]) < 0.5  # independent random rankings
    top = summary["methods"]["pixel"]["top10"]
    assert top["boxes"] == 8 and top["own"] == sum(r["own_rank"] <= 10 for r in boxes.run_method(
        tiny_explorer, "pixel", pairs, ["halves", "pasted"], "exact", next((tmp_path / "r").glob("*/*")),
        progress=False)) and "versus_first" in summary["methods"]["random"]["top10"]
    assert "own source in top 10" in out
    assert (tmp_path / "a" / "boxes_plot.png").stat().st_size > 0
    bad = argparse.Namespace(**{**vars(args), "layouts": "diagonal"})
    with pytest.raises(ValueError, match="unknown layout"):
        boxes_report.main(bad)
    for shard in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard takes I/N"):
            boxes_report.main(argparse.Namespace(**{**vars(args), "shard": shard}))
    # the assets folder holds one table per mode: other methods stop before any work unless forced
    before = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    monkeypatch.setattr(boxes, "run_method", lambda *a, **k: pytest.fail("ran before the folder was checked"))
    with pytest.raises(FileExistsError, match=r"methods \['pixel', 'random'\] there, \['pixel'\] here"):
        boxes_report.main(argparse.Namespace(**{**vars(args), "methods": "pixel"}))
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == before
    monkeypatch.undo()
    monkeypatch.setattr(model, "load", lambda _: tiny_explorer)
    assert boxes_report.main(argparse.Namespace(**{**vars(args), "methods": "pixel", "force": True})) == 0
    assert list(json.loads((tmp_path / "a" / "boxes_summary.json").read_text())["methods"]) == ["pixel"]


def test_shards_fill_one_results_file_together(tiny_explorer, tmp_path):
    """Two shards run at once (threads here, processes in use) file every composite once, under a lock, and the
    file equals a single run's."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = boxes.choose_pairs(tiny_explorer, 3)
    layouts = ["halves", "pasted"]
    whole = boxes.run_method(tiny_explorer, "pixel", pairs, layouts, "exact", tmp_path / "one", progress=False)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: boxes.run_method(tiny_explorer, "pixel", pairs, layouts, "exact", tmp_path / "two",
                                                 False, None, (i, 2)), (0, 1)))
    together = boxes.run_method(tiny_explorer, "pixel", pairs, layouts, "exact", tmp_path / "two", progress=False)
    assert len(whole) == 12 and together == whole
    files = [next((tmp_path / d).glob("pixel-*.json")) for d in ("one", "two")]
    assert json.loads(files[0].read_text()) == json.loads(files[1].read_text())


def test_generated_pairs_count_prompts_drawn_with_both_parts(tiny_explorer, tmp_path):
    from abu_explorer.evaluation import generated_pairs as gp

    result = gp.run(tiny_explorer, 2, progress=False)
    rows = result["prompts"]
    assert [r["prompt"] for r in rows] == [boxes.caption(tiny_explorer.dataset, a, b)
                                           for a, b in boxes.choose_pairs(tiny_explorer, 2)]
    for r in rows:
        for m in ("clip", "pixel"):
            ranks = [r[m]["rank_a"], r[m]["rank_b"]]
            assert all(x is None or 1 <= x <= len(tiny_explorer.dataset) for x in ranks)
            assert r[m]["both"] == all(x is not None and x <= gp.TOP for x in ranks)
    gp.save(result, tmp_path, tiny_explorer)
    assert (tmp_path / "boxes_generated.png").exists()
    # hand-made rows: both / at least one, by method
    made = [{"clip": {"rank_a": 1, "rank_b": 3, "both": True}, "pixel": {"rank_a": 12, "rank_b": None, "both": False}},
            {"clip": {"rank_a": None, "rank_b": 10, "both": False}, "pixel": {"rank_a": 2, "rank_b": 9, "both": True}}]
    s = gp.summarize(made)
    assert (s["clip"]["both"], s["clip"]["at_least_one"]) == (1, 2)
    assert (s["pixel"]["both"], s["pixel"]["at_least_one"]) == (1, 1)


def test_abu_box_contrast_is_the_box_minus_the_rest(tiny_app, tmp_path):
    """Exact AbU with box_contrast on a halves composite: tau(box A) - tau(box B), bit for bit (the rest of a
    half is the other half), and the contrast computed from a plain run's stored scores agrees with it."""
    import torch

    from abu_explorer.attribution import query as q
    from abu_explorer.attribution import spec

    exp = tiny_app.explorer
    (a, b), = boxes.choose_pairs(exp, 1)
    img, parts = boxes.composite(exp.dataset, a, b, "halves")
    caption = boxes.caption(exp.dataset, a, b)
    plain = spec("abu").load(exp)
    contrast = spec("abu").load(exp, box_contrast=True)
    qa, qb = (q.from_image(exp, img, caption, box) for box, _, _ in parts)
    ta, tb = plain.score(qa, "exact").scores, plain.score(qb, "exact").scores
    ca = contrast.score(qa, "exact")
    assert torch.equal(ca.scores, ta - tb) and "box contrast" in ca.notes
    assert "box_contrast" not in plain.settings()["config"]  # off: earlier results keep their keys
    assert contrast.settings()["config"]["box_contrast"] is True
    whole = q.from_image(exp, img, caption, (0, 0, exp.image_size, exp.image_size))
    assert torch.equal(contrast.score(whole, "exact").scores, plain.score(whole, "exact").scores)  # nothing outside
    rows = [{"layout": "halves", "pair": [a, b], "own": own, "other": other,
             **boxes.box_result(s.numpy(), own, other)} for (_, own, other), s in zip(parts, (ta, tb))]
    derived, = boxes.pair_contrast(rows)
    assert derived["own_wins"] == bool(ca.scores[a] > ca.scores[b]) and "own_ranks" not in derived
    # with every row's scores saved (as exact runs of AbU do), the contrast's own ranks follow too
    from abu_explorer import artifacts

    for r, s in zip(rows, (ta, tb)):
        r["scores_file"] = f"v/{r['own']}.npy"
        artifacts.save_npy(tmp_path / r["scores_file"], s.numpy().astype(np.float64))
    derived, = boxes.pair_contrast(rows, tmp_path)
    c = (ta - tb).double().numpy()
    assert derived["own_ranks"] == [int((c >= c[a]).sum()), int((-c >= -c[b]).sum())]
    run = boxes.run_method(exp, "abu", [(a, b)], ["halves"], "exact", tmp_path / "run", progress=False)
    assert all((tmp_path / "run" / r["scores_file"]).exists() for r in run)
    again, = boxes.pair_contrast(run, tmp_path / "run")
    assert again["own_ranks"] == derived["own_ranks"] and again["own_wins"] == derived["own_wins"]
    # on one scale: each side over its median |tau| (exact mode only), and the derived figure agrees with it
    from abu_explorer.attribution.abu import on_one_scale

    both = spec("abu").load(exp, box_contrast=True, box_contrast_scaled=True)
    sa = both.score(qa, "exact")
    assert torch.equal(sa.scores, on_one_scale(ta) - on_one_scale(tb)) and "median" in sa.notes
    assert not torch.equal(sa.scores, ca.scores)
    assert both.settings()["config"]["box_contrast_scaled"] is True
    assert "box_contrast_scaled" not in contrast.settings()["config"]
    with pytest.raises(ValueError, match="exact mode"):
        both.score(qa, "fast")
    with pytest.raises(ValueError, match="needs box_contrast"):
        spec("abu").load(exp, box_contrast_scaled=True)
    scaled, = boxes.pair_contrast(rows, tmp_path, scaled=True)
    c = on_one_scale(ta).double().numpy() - on_one_scale(tb).double().numpy()
    assert scaled["own_wins"] == bool(sa.scores[a] > sa.scores[b])
    assert scaled["own_ranks"] == [int((c >= c[a]).sum()), int((-c >= -c[b]).sum())]
    assert boxes.pair_contrast(rows, None, scaled=True) == []  # the scale needs every row's scores


def test_box_contrast_on_the_command_line_is_checked(capsys):
    from abu_explorer import cli
    from conftest import PRECOMPUTED

    base = ["attribute", "--precomputed", str(PRECOMPUTED), "--prompt", "red apple", "--steps", "2"]
    for extra, match in ((["--method", "abu", "--box-contrast"], "needs a --box"),
                         (["--method", "pixel", "--box-contrast", "--box", "0", "0", "16", "32"], "abu or abuplus"),
                         (["--method", "if", "--box-contrast", "--box", "0", "0", "16", "32"], "abu or abuplus"),
                         (["--method", "abu", "--box-contrast", "scaled", "--box", "0", "0", "16", "32"],
                          "needs --mode exact")):
        capsys.readouterr()
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, (extra, err)


def test_contrast_notes_report_every_layout_raw_and_scaled(tmp_path):
    """The two-box contrast, raw and on one scale, per layout, from saved score vectors (hand-made: in the scaled
    contrast box A's large steps no longer swamp box B's)."""
    from abu_explorer import artifacts

    a, b = 0, 1
    ta = np.array([10.0, 8.0, 6.0, 4.0, 2.0])  # box A's step is large: every change is big
    tb = np.array([0.5, 0.1, 0.2, 0.3, 0.4])  # box B's is small, and it ranks A above B too
    rows = []
    for layout in ("halves", "pasted"):
        for own, other, t in ((a, b, ta), (b, a, tb)):
            r = {"layout": layout, "pair": [a, b], "own": own, "other": other, **boxes.box_result(t, own, other),
                 "scores_file": f"s/{layout}-{own}.npy"}
            artifacts.save_npy(tmp_path / r["scores_file"], t)
            rows.append(r)
    summary = {"methods": {"abu": {}}}
    text = boxes_report.contrast_notes(summary, {"abu": rows}, {"abu": "AbU"}, tmp_path)
    assert text.count("\n") == 3 and "pasted" in text and "med|tau_A|" in text
    got = summary["methods"]["abu"]["contrasts"]
    # raw c = ta - tb: c(A) = 9.5 > c(B) = 7.9, a win; over the medians 6 and 0.3: c(A) = 0 < c(B) = 1, a loss
    for layout in ("halves", "pasted"):
        assert got[layout]["raw"]["own_wins"] == 1 and got[layout]["scaled"]["own_wins"] == 0
        assert got[layout]["raw"]["plain_both_win"] == 0 and got[layout]["raw"]["composites"] == 1
    assert "quadrants" not in got
