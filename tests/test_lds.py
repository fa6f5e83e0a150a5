"""The linear datamodeling score: its arithmetic on hand-checked cases, and the resumable runner (tiny model)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from abu_explorer.evaluation import lds, lds_table


def test_spearman_and_ranks_match_hand_cases():
    assert lds.rankdata(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert lds.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert lds.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1, 3, 2): 1 - 6 * 2 / (3 * 8) = 0.5
    assert lds.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert lds.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # a constant prediction carries no ranking


def test_caption_row_rank_counts_from_one():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    got = lds_table.caption_row(scores, [{"row": 1}, {"row": 2}])  # first of 3, then last of 3
    assert got == {"in_top10": 2, "queries": 2, "median_rank": 2.0}
    assert lds_table.caption_row(scores, [{"row": 1}, {"prompt": "x"}]) is None


def test_lds_sign_convention():
    """A subset holding the images a method scores high should give the query a lower loss: LDS +1."""
    scores = np.array([[5.0, 1.0, 0.0, 0.0]])
    masks = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=float)
    sums = masks @ scores[0]  # 5, 1, 0, 6
    losses = (10.0 - sums)[:, None]  # more of the helpful images -> lower loss
    assert lds.lds_per_query(scores, masks, losses)[0] == pytest.approx(1.0)
    assert lds.lds_per_query(-scores, masks, losses)[0] == pytest.approx(-1.0)


def test_the_other_query_control_separates_specific_from_shared_scores():
    g = np.random.default_rng(0)
    masks = (g.random((60, 200)) < 0.5).astype(float)
    specific = g.normal(size=(3, 200))
    losses = -(masks @ specific.T)  # each query's loss made by its own scores: LDS 1
    assert np.allclose(lds.lds_per_query(specific, masks, losses), 1.0)
    assert abs(lds.other_query_control(specific, masks, losses)) < 0.3
    shared = np.tile(g.normal(size=200), (3, 1))  # one ranking for every query
    losses = -(masks @ shared.T)
    assert lds.other_query_control(shared, masks, losses) == pytest.approx(1.0)
    assert lds.other_query_control(shared[:1], masks, losses[:, :1]) is None


def test_the_source_image_is_measured_apart_from_what_a_method_adds():
    """Losses made by the source row (a large step) plus a second row (a small one): scoring the source alone
    reaches a high LDS but nothing within its strata; scoring the second row alone is the reverse."""
    g = np.random.default_rng(1)
    masks = (g.random((40, 30)) < 0.5).astype(float)
    source, other = 3, 7
    losses = (1.0 - 0.5 * masks[:, source] - 0.01 * masks[:, other] + 0.001 * g.normal(size=40))[:, None]
    effect = lds.source_effect(masks, losses, [source])
    assert effect["lds_source_only"] > 0.7 and effect["loss_change_with_source"] == pytest.approx(-0.5, abs=0.01)
    assert effect["loss_sd_within_side"] < 0.01
    only_other = np.zeros((1, 30))
    only_other[0, other] = 1.0
    assert lds.lds_within_source(only_other, masks, losses, [source])[0] > 0.7
    assert lds.lds_per_query(only_other, masks, losses)[0] < effect["lds_source_only"]
    only_source = np.zeros((1, 30))
    only_source[0, source] = 1.0
    assert lds.lds_within_source(only_source, masks, losses, [source])[0] == 0.0  # constant within a stratum
    assert np.isnan(lds.lds_within_source(only_other, masks[:6], losses[:6], [source], min_models=7)[0])
    assert lds.source_rows([{"row": 4}, {"row": 2}]) == [4, 2] and lds.source_rows([{"prompt": "x"}]) is None


def test_the_table_shows_the_source_reference_and_each_methods_within_figure(tmp_path):
    row = {"label": "AbU", "lds": 0.2, "ci95": [0.1, 0.3], "lds_half": 0.25, "lds_other_query": 0.0, "note": "",
           "caption_row": None, "lds_within_source": 0.14, "within_ci95": [0.08, 0.2], "lds_by_m": {"3": 0.1}}
    report = {"num_queries": 50, "half": 12, "methods": {"abu": row}, "num_subsets": 3, "machine_kind": "k",
              "source_effect": {"lds_source_only": 0.79, "loss_change_with_source": -0.038,
                                "loss_sd_within_side": 0.0032}}
    md = lds_table.table(report)
    assert "+0.140 [+0.080, +0.200]" in md and "| *the source image alone" in md and "+0.790" in md
    assert "source image alone" not in lds_table.table({**report, "source_effect": None})
    lds_table.plot(report, tmp_path / "plot.png")  # both bars and the reference line
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_subsets_and_splits_follow_the_written_rule():
    a, b = lds.subset_rows(0, 100), lds.subset_rows(1, 100)
    assert len(a) == 50 and a == sorted(a) and a == lds.subset_rows(0, 100) and a != b
    captions = [f"c{i % 40}" for i in range(200)]  # repeated captions: the splits must not share one
    doc = lds.split_queries(captions, test=10, tune=6)
    test_caps = {d["prompt"] for d in doc["test"]}
    assert [d["row"] for d in doc["test"]] == [int((k + 0.5) * 20) for k in range(10)]
    assert not test_caps & {d["prompt"] for d in doc["tune"]} and len(doc["tune"]) == 6


def test_shipped_query_splits_are_the_rule_applied_to_the_data(full_dataset):
    from pathlib import Path

    shipped = json.loads((Path(__file__).resolve().parent.parent / "evaluation" / "lds_queries.json").read_text())
    doc = lds.split_queries(full_dataset.captions)
    assert shipped["test"] == doc["test"] and shipped["tune"] == doc["tune"] and shipped["rule"] == doc["rule"]


def test_runner_is_resumable_and_reports_every_method(tiny_app, tmp_path):
    from abu_explorer.attribution import names
    from abu_explorer.attribution.abu_precompute import AbUConfig
    from conftest import tiny_recipes

    exp = tiny_app.explorer
    queries = [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3} for i in (2, 9, 17)]
    recipe = tiny_recipes()[2]
    first = lds_table.run(exp, queries, ["pixel"], 4, tmp_path / "r", None, recipe, max_subsets=2, progress=False)
    assert first["subsets_done"] == 2 and "methods" not in first  # fewer than 3 subsets: no LDS yet
    folder = tmp_path / "r"
    files = sorted(folder.glob("*/*/subset_*.json"))
    stamp = [f.stat().st_mtime_ns for f in files]
    out = lds_table.run(exp, queries, list(names()), 4, folder, tmp_path / "assets", recipe, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamp  # finished subsets are never retrained
    assert out["num_subsets"] == 4 and set(out["methods"]) == set(names()) | {"abu@before"}
    before = out["methods"]["abu@before"]  # AbU again with the defaults the tuning replaced, filed under them
    assert "before tuning (alpha = 0.01)" in before["label"] and before["per_query"] != out["methods"]["abu"]["per_query"]
    alphas = {json.loads(p.read_text())["settings"]["config"]["alpha"] for p in folder.glob("*/*/scores/abu-*.json")}
    assert alphas == {0.01, AbUConfig().alpha}
    for r in out["methods"].values():
        assert -1 <= r["lds"] <= 1 and r["ci95"][0] <= r["lds"] <= r["ci95"][1] and len(r["per_query"]) == 3
    assert out["methods"]["pixel"]["note"] and not out["methods"]["abu"]["note"]
    for r in out["methods"].values():  # LDS with the first M subsets, M = 3 .. 4; the last is the table's figure
        assert list(r["lds_by_m"]) == ["3", "4"] and r["lds_by_m"]["4"] == pytest.approx(r["lds"])
    for r in out["methods"].values():  # the control scores query 0 with query 2's row, 1 with 0's, 2 with 1's
        assert -1 <= r["lds_other_query"] <= 1
    abu = np.array(out["methods"]["abu"]["per_query"])
    for name, r in out["methods"].items():  # each other method minus AbU, query by query
        assert ("versus_abu" in r) == (name != "abu")
        if name != "abu":
            diff = np.array(r["per_query"]) - abu
            assert r["versus_abu"]["diff"] == pytest.approx(diff.mean())
            assert (r["versus_abu"]["wins"], r["versus_abu"]["losses"]) == ((diff > 0).sum(), (diff < 0).sum())
    assert out["methods"]["abu"]["mode"] == "exact"
    assert (tmp_path / "assets" / "lds_plot.png").exists()
    assert "AbU" in (tmp_path / "assets" / "lds_table.md").read_text()
    first3 = lds_table.run(exp, queries, ["pixel"], 3, folder, None, recipe, progress=False)  # the first M only
    assert first3["num_subsets"] == 3 and first3["methods"]["pixel"]["lds_by_m"]["3"] == pytest.approx(
        out["methods"]["pixel"]["lds_by_m"]["3"])
    proto = json.loads(next(folder.glob("*/*/protocol.json")).read_text())
    assert proto["subset_seed"] == lds.SUBSET_SEED and proto["queries"] == queries


def test_one_set_of_subset_models_serves_both_splits(tiny_app, tmp_path):
    from conftest import tiny_recipes

    exp = tiny_app.explorer
    queries = [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3, "split": s}
               for i, s in ((2, "test"), (9, "tune"), (17, "test"), (23, "tune"))]
    recipe = tiny_recipes()[2]
    trained = lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, progress=False, report=False)
    assert trained["subsets_done"] == 3 and "methods" not in trained and not list(tmp_path.rglob("scores"))
    test = lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, progress=False, split="test")
    tune = lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, progress=False, split="tune")
    assert test["folder"] == tune["folder"] and test["num_queries"] == tune["num_queries"] == 2
    first = lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, progress=False, split="tune",
                          num_queries=1)
    assert first["num_queries"] == 1
    assert first["methods"]["pixel"]["per_query"] == tune["methods"]["pixel"]["per_query"][:1]
    # each split's LDS equals the evaluation of its own columns alone
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/*/subset_*.json"))]
    assert len(docs) == 3 and all(len(d["losses"]) == 4 for d in docs)
    built = lds.query_latents(exp, [queries[1], queries[3]])
    alone = lds_table.evaluate(exp, ["pixel"], built, Path(test["folder"]), docs, [1, 3], [queries[1], queries[3]])
    assert alone["methods"]["pixel"]["per_query"] == tune["methods"]["pixel"]["per_query"]
    # the assets folder holds one table: another split (or other methods) stops before any work unless forced
    assets = tmp_path / "assets"
    lds_table.run(exp, queries, ["pixel"], 3, tmp_path, assets, recipe, progress=False, split="test")
    lds_table.run(exp, queries, ["pixel"], 3, tmp_path, assets, recipe, progress=False, split="test")  # the same
    before = {f.name: f.read_bytes() for f in assets.iterdir()}
    with pytest.raises(FileExistsError, match="split 'test' there, 'tune' here"):
        lds_table.run(exp, queries, ["pixel"], 3, tmp_path, assets, recipe, progress=False, split="tune")
    with pytest.raises(FileExistsError, match=r"methods \['pixel'\] there, \['random'\] here"):
        lds_table.run(exp, queries, ["random"], 3, tmp_path, assets, recipe, progress=False, split="test")
    assert {f.name: f.read_bytes() for f in assets.iterdir()} == before
    lds_table.run(exp, queries, ["pixel"], 3, tmp_path, assets, recipe, progress=False, split="tune", force=True)
    assert json.loads((assets / "lds_summary.json").read_text())["split"] == "tune"


def test_scores_resume_query_by_query(tiny_app, tmp_path, monkeypatch):
    """A scoring run stopped after its first query keeps that row; the rerun scores only the rest and gathers
    the same matrix as an uninterrupted run."""
    from abu_explorer.attribution import spec
    from abu_explorer.evaluation import progress

    exp = tiny_app.explorer
    built = lds.query_latents(exp, [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3} for i in (2, 9)])
    whole = lds.method_scores(exp, "pixel", built, tmp_path / "whole")
    ranker_cls = type(spec("pixel").load(exp))
    real, calls = ranker_cls.score, []

    def flaky(self, query, mode=None):
        calls.append(query.describe()["prompt"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped during the second query
        return real(self, query, mode) if mode else real(self, query)

    monkeypatch.setattr(ranker_cls, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        lds.method_scores(exp, "pixel", built, tmp_path / "stopped")
    assert len(list((tmp_path / "stopped").glob("scores/*.parts/*.npy"))) == 1
    pixel_default = {"pixel": spec("pixel").load(exp).settings().get("config", {})}
    seen = progress.filed_scores(tmp_path / "stopped", pixel_default)  # what --status lists meanwhile
    assert [(f["method"], f["changed"], f["queries"]) for f in seen] == [("pixel", {}, "1/2")]
    again = lds.method_scores(exp, "pixel", built, tmp_path / "stopped")
    assert calls == [built[0].describe()["prompt"], built[1].describe()["prompt"], built[1].describe()["prompt"]]
    assert np.array_equal(again, whole) and not list((tmp_path / "stopped").glob("scores/*.parts"))
    assert json.loads(next((tmp_path / "stopped").glob("scores/*.json")).read_text())["computed_on"]["kind"]
    assert [f["queries"] for f in progress.filed_scores(tmp_path / "stopped", pixel_default)] == ["2/2"]


def test_two_processes_share_one_scoring_run(tiny_app, tmp_path, monkeypatch):
    """A query claimed elsewhere is skipped, then waited for: each query is scored once, the gathered matrix is
    the one a single process makes."""
    import threading
    import time

    from abu_explorer import artifacts
    from abu_explorer.attribution import spec

    exp = tiny_app.explorer
    built = lds.query_latents(exp, [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3} for i in (2, 9)])
    whole = lds.method_scores(exp, "pixel", built, tmp_path / "whole")
    name = next((tmp_path / "whole" / "scores").glob("pixel-*.npy")).name
    first = tmp_path / "shared" / "scores" / name.replace(".npy", ".parts") / "000.npy"
    ranker_cls = type(spec("pixel").load(exp))
    real, calls = ranker_cls.score, []
    monkeypatch.setattr(ranker_cls, "score", lambda self, q, mode=None: (calls.append(q.describe()["prompt"]),
                                                                         real(self, q))[1])
    out = []
    with artifacts.claimed(first) as held:  # the other process is scoring query 0
        assert held
        worker = threading.Thread(target=lambda: out.append(lds.method_scores(exp, "pixel", built,
                                                                              tmp_path / "shared")))
        worker.start()
        for _ in range(600):
            if calls:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        assert worker.is_alive() and not out  # query 1 scored, now waiting for query 0
        artifacts.save_npy(first, whole[0])  # the other process files its row and lets go
    worker.join(60)
    assert calls == [built[1].describe()["prompt"]]
    assert np.array_equal(out[0], whole)


def test_scoring_stops_when_another_process_has_gathered(tiny_app, tmp_path, monkeypatch):
    """The other process filed the whole matrix (and removed the parts) while this one scored its first query:
    nothing more is scored, and the filed matrix is what comes back."""
    from abu_explorer import artifacts
    from abu_explorer.attribution import spec

    exp = tiny_app.explorer
    built = lds.query_latents(exp, [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3} for i in (2, 9, 17)])
    whole = lds.method_scores(exp, "pixel", built, tmp_path / "whole")
    name = next((tmp_path / "whole" / "scores").glob("pixel-*.npy")).name
    ranker_cls = type(spec("pixel").load(exp))
    real, calls = ranker_cls.score, []

    def score(self, q, mode=None):
        calls.append(q.describe()["prompt"])
        artifacts.save_npy(tmp_path / "late" / "scores" / name, whole)  # the other process gathers meanwhile
        return real(self, q)

    monkeypatch.setattr(ranker_cls, "score", score)
    got = lds.method_scores(exp, "pixel", built, tmp_path / "late")
    assert len(calls) == 1 and np.array_equal(got, whole)


def test_sweep_pairs_every_setting_with_the_default(tiny_app, tmp_path, capsys):
    from abu_explorer import cli
    from abu_explorer.evaluation import lds_tuning
    from conftest import tiny_recipes

    exp = tiny_app.explorer
    queries = [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3, "split": "tune"} for i in (2, 9, 17)]
    recipe = tiny_recipes()[2]
    lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, progress=False, split="tune")  # 3 subsets
    built, calls = [], []

    def evaluate_setting(name, combo):
        calls.append(combo)
        out = lds_table.run(exp, queries, [name], 3, tmp_path, None, recipe, max_subsets=0, progress=False,
                            split="tune", options={name: combo}, built=built)
        return out["methods"][name]

    default = lds_tuning.defaults(exp, "abu", ["alpha"])["alpha"]
    rows = lds_tuning.sweep(evaluate_setting, exp, {"abu": {"alpha": [default * 5, default]}})
    assert [r["settings"]["alpha"] for r in rows] == [default, default * 5]  # the default first, once
    assert rows[0]["default"] and rows[0]["versus_default"] is None
    v = rows[1]["versus_default"]
    diff = np.array(rows[1]["per_query"]) - np.array(rows[0]["per_query"])
    assert v["diff"] == pytest.approx(diff.mean()) and v["wins"] == int((diff > 0).sum()) and 0 < v["sign_p"] <= 1
    saved = [json.loads(p.read_text())["settings"]["config"]["alpha"] for p in tmp_path.glob("*/*/scores/abu-*.json")]
    assert sorted(saved) == sorted([default, default * 5])  # each setting scored, and filed under its settings
    assert len(built) == 3  # the queries' latents made once for the whole sweep
    md = lds_tuning.table(rows, 3, 3)
    assert "(default)" in md and md.count("\n") == 3
    # an earlier round re-made after the default moved: the grid centred where it was (both settings cached)
    again = lds_tuning.sweep(evaluate_setting, exp, {"abu": {"alpha": [default]}}, around={"abu": {"alpha": default * 5}})
    assert [(r["settings"]["alpha"], r["default"]) for r in again] == [(default * 5, True), (default, False)]
    assert again[1]["versus_default"]["diff"] == pytest.approx(-v["diff"])
    # one factor at a time, not every combination; the default once
    assert lds_tuning.combos({"alpha": [1, 2], "unlearn_steps": [1, 3]}, {"alpha": 1, "unlearn_steps": 1}) == [
        {"alpha": 1, "unlearn_steps": 1}, {"alpha": 2, "unlearn_steps": 1}, {"alpha": 1, "unlearn_steps": 3}]
    # rank stability: every setting again with the next draw seed, the top-10 overlap of the two rankings
    calls.clear()
    rows = lds_tuning.sweep(evaluate_setting, exp, {"abu": {"alpha": [default * 5]}}, stability=True)
    assert [c.get("unlearn_seed") for c in calls] == [None, 1, None, 1]
    assert all(0 <= r["stability"]["top10_overlap"] <= 1 for r in rows)
    seeds = [json.loads(p.read_text())["settings"]["config"]["unlearn_seed"] for p in tmp_path.glob("*/*/scores/abu-*.json")]
    assert sorted(seeds) == [0, 0, 1, 1]  # both settings scored with both draw seeds, each filed apart
    assert lds_tuning.top_overlap([[1, 2, 3, 4]], [[4, 3, 9, 8]]) == 0.5
    # a setting fixed by AbU's tables (the loss timesteps) gets tables of its own, built under the results folder
    row = evaluate_setting("abu", {"num_timesteps": 3})
    (tables,) = tmp_path.glob("*/*/tables/abu-*")
    assert json.loads((tables / "meta.json").read_text())["config"]["num_timesteps"] == 3
    assert len(row["per_query"]) == 3
    assert "next draw seed" in lds_tuning.table(rows, 3, 3)
    with pytest.raises(ValueError, match="no setting"):
        lds_tuning.defaults(exp, "abu", ["alhpa"])
    for bad in ['{"abu": {"alpha": 0.01}}', '{"nope": {"alpha": [1]}}', "[]"]:
        with pytest.raises(ValueError, match="--sweep takes"):
            lds_tuning.parse_grid(bad, ["abu"])
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"test": queries[:1], "tune": queries[1:]}))
    code = cli.main(["evaluate", "lds", "--queries", str(q), "--precomputed", str(exp.root), "--methods", "abu",
                     "--sweep", '{"abu": {"alpha": [0.1]}}', "--results", str(tmp_path / "r"), "--assets", ""])
    err = capsys.readouterr().err
    assert code == 2 and "--split tune" in err and err.count("\n") == 1


def test_a_subset_claimed_by_another_process_is_left_to_it(tiny_app, tmp_path):
    """Two training loops on one folder: each skips the subset the other holds, so none is trained twice."""
    from abu_explorer import artifacts
    from abu_explorer.evaluation import progress
    from conftest import tiny_recipes

    exp = tiny_app.explorer
    queries = [{"prompt": exp.dataset.captions[2], "seed": 2, "steps": 3}]
    recipe = tiny_recipes()[2]
    folder = lds.results_folder(tmp_path, lds.protocol(exp, queries, recipe))
    from abu_explorer.training import checkpoint

    net = torch.nn.Linear(2, 2)  # the other process's epoch checkpoint
    checkpoint.save(folder / "ckpt" / "subset_000" / "unet-ckpt.safetensors", net,
                    torch.optim.AdamW(net.parameters()), {"epoch": 2, "config": recipe.to_dict()})
    with artifacts.claimed(folder / "subset_000.json") as held:  # as another process would hold it
        assert held
        out = lds_table.run(exp, queries, ["pixel"], 3, tmp_path, None, recipe, max_subsets=1, progress=False,
                            report=False)
        seen = progress.lds_status(exp, queries, ["pixel"], 3, tmp_path, recipe=recipe)
    assert seen["subsets"] == ["running", "done", "missing"] and seen["scores"] == {"pixel": "0/1 queries"}
    assert progress.show(seen).startswith("subset models: 1 of 3 done, 1 running")
    assert f"running  subset 0 (epoch 2/{recipe.epochs} at " in progress.show(seen)
    assert out["subsets_done"] == 1
    assert [p.name for p in folder.glob("subset_*.json")] == ["subset_001.json"]


def test_tuning_rule_and_report_keep_every_sweep(tmp_path):
    from abu_explorer.evaluation import lds_tuning

    def row(method, alpha, per_query, base=None):
        v = None if base is None else lds_tuning.compare(np.array(per_query), np.array(base))
        return {"method": method, "settings": {"alpha": alpha}, "default": base is None, "lds": float(np.mean(per_query)),
                "ci95": [0.0, 1.0], "per_query": per_query, "versus_default": v}

    base = [0.1, 0.2, 0.3, 0.2, 0.1, 0.3]
    up_small = [x + 0.05 + 0.01 * i for i, x in enumerate(base)]  # better on every query
    up_big = [x + 0.2 + 0.01 * i for i, x in enumerate(base)]
    mixed = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]  # interval straddles 0
    rows = [row("abu", 0.01, base), row("abu", 0.03, up_small, base), row("abu", 0.003, up_big, base),
            row("abuplus", 15, base), row("abuplus", 5, mixed, base)]
    assert lds_tuning.choose(rows) == {"abu": {"alpha": 0.003}, "abuplus": None}  # largest of those above 0
    text = lds_tuning.choice_text(rows)
    assert "abu: alpha = 0.003" in text and "abuplus: keep the default" in text
    report = {"num_subsets": 24, "num_queries": 6, "machine_kind": "kind", "folder": "f"}
    lds_tuning.write(rows, report, tmp_path)
    around = [row("abu", 0.003, up_big), row("abu", 0.001, base, up_big)]  # the grid again around the new default
    lds_tuning.write(around, report, tmp_path)
    few = [row("abu", 0.01, base[:5]), row("abu", 0.02, base[:5], base[:5])]
    lds_tuning.write(few, {**report, "num_queries": 5}, tmp_path)  # a costly setting on fewer queries
    sweeps = lds_tuning.write(rows, report, tmp_path)  # the first sweep again: replaced, not added
    assert len(sweeps) == 3 and [s["num_queries"] for s in sweeps] == [6, 5, 6]
    assert sweeps[-1]["choice"] == {"abu": {"alpha": 0.003}, "abuplus": None}
    saved = json.loads((tmp_path / "lds_tuning.json").read_text())
    assert len(saved["sweeps"]) == 3
    md = (tmp_path / "lds_tuning.md").read_text()
    assert md.count("### Sweep") == 3 and md.count("The rule's choice") == 3 and "around abu: alpha = 0.003" in md
