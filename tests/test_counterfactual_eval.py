"""The evaluation runner on the tiny model: rounds, resume after a stop, summary statistics, report files."""
import json
import math
import statistics

import pytest
import torch

from abu_explorer.evaluation import counterfactual, counterfactual_table as ce, stats
from conftest import tiny_recipes

QUERIES = [{"prompt": "red apple", "seed": 1, "steps": 3}, {"prompt": "banana", "seed": 2, "steps": 3}]


def test_plan_runs_every_method_before_the_second_random_draw():
    cells = ce.plan(2, ["abu", "random", "pixel"], [17], draws=2)
    assert len(cells) == 2 * (1 + 2 + 1)
    order = [(c.method, c.draw) for c in cells]
    assert order.index(("random", 1)) > order.index(("pixel", 0))
    assert [c.query for c in cells[:2]] == [0, 1]


def test_mean_and_standard_error():
    m, se = stats.mean_se([1.0, 2.0, 6.0])
    assert m == 3.0 and se == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]) / math.sqrt(3))
    assert math.isnan(stats.mean_se([4.0])[1]) and math.isnan(stats.mean_se([])[0])


def test_table_sets_each_method_beside_random_and_the_paper():
    # 17 of 2015 is 0.84% of N: the paper's K = 1000 (0.85%) column; 200 of 2015 (9.9%) matches no setting
    rows = [{"method": "abu", "k": 17, "n": 3, "delta_loss_vs_random": (0.01, 0.003)},
            {"method": "random", "k": 17, "n": 3, "delta_loss_per_draw": {0: 0.008}},
            {"method": "if", "k": 17, "n": 3, "delta_loss_vs_random": (0.004, 0.001)},
            {"method": "abu", "k": 200, "n": 1, "delta_loss_vs_random": (math.nan, math.nan)}]
    for r, dl in zip(rows, (0.018, 0.008, 0.012, 0.03)):
        r.update({"delta_loss": (dl, 0.002), "delta_g_mse": (0.05, 0.01), "delta_g_clip": (0.9, 0.01)})
    lines = ce.table({"rows": rows}, 2015).splitlines()
    abu, rand, inf, far = (dict(zip(lines[0].split("|"), line.split("|"))) for line in lines[2:])
    assert abu[" dL / random "].strip() == "2.25" and rand[" dL / random "].strip() == "1.00"
    assert abu[" paper dL x1e-3 (/ random) "].strip() == "6.7 (1.91)"
    assert rand[" paper dL x1e-3 (/ random) "].strip() == "3.5 (1.00)"
    assert inf[" paper dL x1e-3 (/ random) "].strip() == "-"  # IF is not in the paper's table
    assert far[" paper dL x1e-3 (/ random) "].strip() == "-" and far[" dL / random "].strip() == "-"
    assert ce.paper_dl("pixel", 68, 2015) == 4.0 and ce.paper_dl("dtrak", 8, 2015) == 5.4


def test_each_row_counts_the_cells_that_removed_the_source_image():
    """A query made from a training caption has a source image; the table says how many cells removed it."""
    def cell(method, prompt, removed, draw=0):
        return {"method": method, "k": 2, "draw": draw, "query": {"prompt": prompt}, "removed": removed,
                "delta_loss": 0.01, "delta_g_mse": 0.0, "delta_g_clip": 1.0}

    results = [cell("abu", "apple", [4, 1]), cell("abu", "pear", [3, 5]), cell("abu", "made up", [0, 1]),
               cell("random", "apple", [7, 8]), cell("random", "pear", [5, 9])]
    rows = {r["method"]: r for r in ce.summarize(results, ["abu", "random"], {"apple": 4, "pear": 5})["rows"]}
    assert rows["abu"]["source_removed"] == [2, 2] and rows["random"]["source_removed"] == [1, 2]
    assert "source_removed" not in ce.summarize(results, ["abu"])["rows"][0]
    line = ce.table({"rows": list(rows.values())}, 2015).splitlines()[2]
    assert line.rstrip().endswith("| 2/2 |")


def test_runner_resumes_and_never_retrains_a_finished_cell(tiny_explorer, tmp_path, monkeypatch):
    recipe = tiny_recipes()[2]
    results, assets = tmp_path / "results", tmp_path / "assets"
    retrained = []
    original = counterfactual.train.train_unet

    def spy(*args, **kwargs):
        retrained.append(set(kwargs.get("exclude", ())))
        return original(*args, **kwargs)

    monkeypatch.setattr(counterfactual.train, "train_unet", spy)
    # 1. a run stopped after 3 retrains, after the K = 0 retrain (the floor) that comes first
    first = ce.run(tiny_explorer, QUERIES, ["pixel", "random"], [2], 2, results, assets, progress=False,
                   max_cells=3, recipe=recipe)
    assert first["cells"] == 6 and first["done"] == 3 and len(retrained) == 4 and retrained[0] == set()
    # on the machine that trained the model, the K = 0 retrain gives back its weights: a floor of exactly 0
    assert first["floor"]["identical_to_shipped_weights"]
    assert all(v["delta_loss"] == 0.0 for v in first["floor"]["queries"].values())
    # 2. the same command again: only the 3 missing cells retrain, in plan order
    second = ce.run(tiny_explorer, QUERIES, ["pixel", "random"], [2], 2, results, assets, progress=False, recipe=recipe)
    assert second["done"] == 6 and len(retrained) == 7
    assert len({json.dumps(sorted(e)) for e in retrained}) == len(retrained)  # every cell removed its own rows
    # 3. the summary: per method and K, mean over queries (and draws) of the cells' own numbers
    rows = {(r["method"], r["k"]): r for r in second["report"]["rows"]}
    cells = second["report"]["cells"]
    for method, n in (("pixel", 2), ("random", 4)):
        mine = [c["delta_loss"] for c in cells if c["method"] == method]
        assert rows[(method, 2)]["n"] == n == len(mine)
        assert rows[(method, 2)]["delta_loss"][0] == pytest.approx(statistics.mean(mine))
    assert set(rows[("random", 2)]["delta_loss_per_draw"]) == {0, 1}
    paired = []  # pixel minus the mean of the same query's two random draws
    for qi in range(len(QUERIES)):
        rand = [c["delta_loss"] for c in cells if c["method"] == "random" and c["query_index"] == qi]
        paired += [c["delta_loss"] - statistics.mean(rand) for c in cells if c["method"] == "pixel" and c["query_index"] == qi]
    assert len(paired) == 2 and rows[("pixel", 2)]["delta_loss_vs_random"][0] == pytest.approx(statistics.mean(paired))
    # 4. the report files: table with one line per method, plot, one strip per query
    table = (assets / "counterfactual_table.md").read_text()
    assert "| pixel | 2 (" in table and "| random | 2 (" in table and table.count("| banana |") == 3
    assert "per draw: " in table and "| K = 0 retrain (floor) | 0 | 1 | 0.000" in table
    assert not any("source_removed" in r for r in second["report"]["rows"])  # no query is a caption of this set
    assert "2/2: p = 0.250" in table or "1/2: p = 0.750" in table or "0/2: p = 1.000" in table
    assert all(c["mode"] == "" for c in cells)  # neither pixel nor random has an exact mode
    assert all(c["trained_on"]["device"].startswith("cpu (") for c in cells)  # each cell's own machine record
    assert (assets / "counterfactual_plot.png").stat().st_size > 0
    for d in QUERIES:
        assert (assets / f"counterfactual_strip_{ce.slug(d['prompt'])}.png").exists()
    # 5. nothing left: a third run only reads
    third = ce.run(tiny_explorer, QUERIES, ["pixel", "random"], [2], 2, results, None, progress=False, recipe=recipe)
    assert third["done"] == 6 and len(retrained) == 7
    # 6. a query added later: --status says the floor lacks it; the run measures it from the kept floor weights
    from abu_explorer.evaluation import progress

    more = QUERIES + [{"prompt": "red heart", "seed": 4, "steps": 3}]
    status = progress.counterfactual_status(tiny_explorer, more, ["pixel"], [2], 1, results, recipe)
    assert status["floor"] == ("done for 2 of 3 queries (the next run measures the rest from its kept weights, "
                               "no retrain)")
    fourth = ce.run(tiny_explorer, more, ["pixel"], [2], 1, results, None, progress=False, max_cells=0, recipe=recipe)
    assert len(fourth["floor"]["queries"]) == 3 and len(retrained) == 7
    assert progress.counterfactual_status(tiny_explorer, more, ["pixel"], [2], 1, results, recipe)["floor"] == "done"
    # 7. a table of fewer queries: its floor row is over its own queries, the filed floor keeps all three
    fifth = ce.run(tiny_explorer, QUERIES[:1], ["pixel"], [2], 1, results, None, progress=False, max_cells=0,
                   recipe=recipe)
    assert len(fifth["floor"]["queries"]) == 1 and len(retrained) == 7
    assert fifth["floor"]["queries"].items() <= fourth["floor"]["queries"].items()
    assert len(ce.run(tiny_explorer, more, ["pixel"], [2], 1, results, None, progress=False, max_cells=0,
                      recipe=recipe)["floor"]["queries"]) == 3
    # 8. the report folder holds one table. A run of a part of it rewrites the whole table's report from the cache;
    # a run of another table stops before any work and changes nothing there, unless forced: then the old table's
    # files go (no strip of a query it lacks stays beside the new one)
    whole = ce.table_id(QUERIES, ["pixel", "random"], [2], 2)
    assert second["report"]["table"] == whole
    (assets / "counterfactual_table.md").unlink()
    part = ce.run(tiny_explorer, QUERIES[:1], ["pixel"], [2], 1, results, assets, progress=False, recipe=recipe)
    assert part["done"] == 1 and part["report"]["table"] == whole and len(part["report"]["cells"]) == 6
    assert (assets / "counterfactual_table.md").read_text() == table
    before = {f.name: f.read_bytes() for f in assets.iterdir()}
    other = [QUERIES[0], {"prompt": "red heart", "seed": 4, "steps": 3}]
    with pytest.raises(FileExistsError, match=r"a table this run is not part of \(2 queries, K = 2, pixel, random\)"):
        ce.run(tiny_explorer, other, ["pixel"], [2], 1, results, assets, progress=False, recipe=recipe)
    assert {f.name: f.read_bytes() for f in assets.iterdir()} == before
    ce.run(tiny_explorer, other, ["pixel"], [2], 1, results, assets, progress=False, recipe=recipe, force=True)
    assert not (assets / "counterfactual_strip_banana.png").exists() and len(retrained) == 8
    assert (assets / "counterfactual_strip_red_heart.png").exists()
    assert "| banana |" not in (assets / "counterfactual_table.md").read_text()
    # a table that holds the folder's grows it, no --force needed (nothing of the old one is lost)
    grown = ce.run(tiny_explorer, other, ["pixel", "random"], [2], 1, results, assets, progress=False, recipe=recipe,
                   max_cells=0)
    assert grown["report"]["table"] == ce.table_id(other, ["pixel", "random"], [2], 1) and len(retrained) == 8


def test_runner_rejects_bad_requests_before_any_work(tiny_explorer, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ce.run(tiny_explorer, QUERIES, ["nope"], [2], 1, tmp_path, None, progress=False)
    with pytest.raises(ValueError, match="K must be"):
        ce.run(tiny_explorer, QUERIES, ["pixel"], [len(tiny_explorer.dataset) + 1], 1, tmp_path, None, progress=False)
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"seed": 3}]))
    with pytest.raises(ValueError, match="prompt"):
        ce.load_queries(bad)


def test_sign_test_and_bootstrap():
    assert stats.sign_test_p(3, 3) == 1 / 8 and stats.sign_test_p(6, 6) == 1 / 64 and stats.sign_test_p(0, 4) == 1.0
    assert stats.sign_test_p(5, 6) == pytest.approx(7 / 64)
    assert stats.p_text(1 / 64) == "p = 0.016" and stats.p_text(0.0004) == "p < 0.001"  # never "p = 0.000"
    lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0 and (lo, hi) == stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0])  # seeded
    test = ce.versus_random([0.1, 0.2, -0.05])
    assert test["above_random"] == 2 and test["min_possible_p"] == 1 / 8 and not test["significant"]


def test_k_as_a_share_of_n():
    assert ce.parse_ks("0.4%,0.84%,3.37%", 2015) == [8, 17, 68] and ce.parse_ks("17, 5", 2015) == [17, 5]
    with pytest.raises(ValueError, match="share of N"):
        ce.parse_ks("lots", 2015)


def test_strip_has_one_row_per_k_and_a_blank_for_a_missing_cell(tmp_path):
    from PIL import Image

    from abu_explorer.data.sheet import grid

    results = []
    for k, method, shade in [(8, "abu", 10), (8, "random", 60), (17, "abu", 110)]:
        key = f"{method}-{k}"
        (tmp_path / key).mkdir()
        Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / key / "original.png")
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(tmp_path / key / "regenerated.png")
        results.append({"key": key, "k": k, "method": method, "query": {"prompt": "red apple"},
                        "delta_loss": 0.01, "delta_g_clip": 0.5})
    path = tmp_path / "strip.png"
    counterfactual.strip(tmp_path, results, path)
    sheet = Image.open(path).convert("RGB")
    blank = Image.new("RGB", (32, 32))
    assert sheet.size == grid([blank] * 6, ["x"] * 6, cols=3, scale=5, caption_lines=3).size  # 2 rows (K) x 3
    tile = 32 * 5 + 6  # tile plus padding; row 2 (K = 17): original, abu, then random's blank tile
    row2 = sheet.height // 2 + 6
    assert sheet.getpixel((6 + 80, row2 + 80)) == (200, 0, 0)
    assert sheet.getpixel((6 + tile + 80, row2 + 80)) == (110, 110, 110)
    assert sheet.getpixel((6 + 2 * tile + 80, row2 + 80)) == (255, 255, 255)


def test_a_cell_claimed_by_another_process_is_left_to_it(tiny_explorer, tmp_path):
    """Two runners on one results folder: the first cell's claim is held elsewhere, so this one does the next."""
    from abu_explorer import artifacts
    from abu_explorer.attribution import spec
    from abu_explorer.evaluation import progress

    recipe = tiny_recipes()[2]
    built = ce.build_queries(tiny_explorer, QUERIES)
    settings = counterfactual.removal_settings(tiny_explorer, "pixel", spec("pixel").load(tiny_explorer))
    key = counterfactual.request_key(tiny_explorer, built[0], "pixel", 2, 0, recipe, settings)
    first = counterfactual.result_dir(tmp_path, key) / "result.json"
    from abu_explorer.training import checkpoint

    net = torch.nn.Linear(2, 2)  # the other runner's epoch checkpoint, as its retrain writes it
    checkpoint.save(first.parent / "ckpt" / "unet-ckpt.safetensors", net, torch.optim.AdamW(net.parameters()),
                    {"epoch": 3, "config": recipe.to_dict()})
    with artifacts.claimed(first) as held:
        assert held
        out = ce.run(tiny_explorer, QUERIES, ["pixel"], [2], 1, tmp_path, None, progress=False, max_cells=1,
                     recipe=recipe, with_floor=False)
        with artifacts.claimed(first) as again:
            assert not again  # a claim excludes every other holder
        seen = progress.counterfactual_status(tiny_explorer, QUERIES, ["pixel"], [2], 1, tmp_path, recipe)
    assert [c["state"] for c in seen["cells"]] == ["running", "done"] and seen["floor"] == "missing"
    assert "1 of 2 cells done, 1 running, 0 missing" in progress.show(seen)
    took = json.loads(next(tmp_path.rglob("result.json")).read_text())["train_seconds"]
    assert seen["median_train_seconds"] == took and "the missing cells" not in progress.show(seen)  # none missing
    shown = progress.show({**seen, "cells": [{**seen["cells"][0], "state": "missing"}, seen["cells"][1]]})
    assert f"the missing cells: about {took / 3600:.1f} h of retraining" in shown
    assert f"running  'red apple' pixel K=2 draw 0 (epoch 3/{recipe.epochs} at " in progress.show(seen)
    assert [c["state"] for c in progress.counterfactual_status(tiny_explorer, QUERIES, ["pixel"], [2], 1, tmp_path,
                                                               recipe)["cells"]] == ["missing", "done"]
    assert out["done"] == 1 and not first.exists()
    assert len(list(tmp_path.rglob("result.json"))) == 1


def test_a_tuned_method_keeps_a_row_with_the_settings_its_tuning_replaced(tiny_app, tmp_path):
    from abu_explorer.attribution import spec
    from abu_explorer.attribution.settings import BEFORE_TUNING

    exp = tiny_app.explorer
    rankers, built, cells, keys = ce.planned(exp, QUERIES[:1], ["abu", "abu@before"], [2], 1)
    assert [c.method for c in cells] == ["abu", "abu@before"] and keys[0] != keys[1]
    assert rankers["abu@before"].cfg.alpha == BEFORE_TUNING["abu"]["alpha"] != rankers["abu"].cfg.alpha
    old = spec("abu").load(exp, **BEFORE_TUNING["abu"])  # filed under AbU's own key for those settings
    assert keys[1] == counterfactual.request_key(exp, built[0], "abu", 2, 0, ce.train.UNET_RECIPE,
                                                 counterfactual.removal_settings(exp, "abu", old))
    with pytest.raises(ValueError, match="unknown method variant 'pixel@before'"):
        ce.planned(exp, QUERIES[:1], ["pixel@before"], [2], 1)
    with pytest.raises(ValueError, match="drop --ray"):
        ce.run(exp, QUERIES[:1], ["abu@before"], [2], 1, tmp_path, None, progress=False, with_floor=False, ray={})


def _cells(method, k, dls, draw=0):
    return [{"method": method, "k": k, "draw": draw, "query_index": q, "query": {"prompt": "abc"[q % 3], "seed": q},
             "delta_loss": dl, "delta_g_mse": 0.01 * q, "delta_g_clip": 0.9} for q, dl in enumerate(dls)]


def test_between_methods_pairs_by_query_with_a_two_sided_sign_test():
    from abu_explorer.evaluation import counterfactual_compare as cc

    results = (_cells("abu", 17, [0.05, 0.04, 0.03]) + _cells("pixel", 17, [0.04, 0.05, 0.01])
               + _cells("abuplus", 17, [0.06, 0.055, 0.04]) + _cells("random", 17, [0.02, 0.02, 0.02])
               + _cells("random", 17, [0.0, 0.02, 0.04], draw=1) + _cells("abu", 8, [0.03, 0.03]))
    pairs = cc.comparisons(results, ["abu", "abuplus", "random", "pixel"], 17)
    assert [(c["a"], c["b"]) for c in pairs] == [("abu", "abuplus"), ("abu", "pixel"), ("abuplus", "pixel")]
    abu_pixel = pairs[1]
    assert (abu_pixel["a_higher"], abu_pixel["b_higher"], abu_pixel["queries"]) == (2, 1, 3)
    assert abu_pixel["mean_difference"] == pytest.approx((0.01 - 0.01 + 0.02) / 3)
    assert abu_pixel["sign_test_p_two_sided"] == 1.0 and not abu_pixel["significant"]
    assert pairs[2]["sign_test_p_two_sided"] == 0.25 == pairs[2]["min_possible_p"]  # 3 of 3: still not 0.05
    # random is averaged over its draws per query; 6 queries that all agree reach p = 2/64
    by_query = cc.per_query(results, "random", 17)
    assert [by_query[cc.query_id(r)] for r in results[:3]] == pytest.approx([0.01, 0.02, 0.03])
    # pairs are made by the query itself, not by its index in one queries file
    moved = [{**r, "query_index": 2 - r["query_index"]} for r in _cells("pixel", 17, [0.04, 0.05, 0.01])]
    assert cc.compare(_cells("abu", 17, [0.05, 0.04, 0.03]) + moved, "abu", "pixel", 17) == abu_pixel
    six = _cells("abu", 17, [0.05] * 6) + _cells("clip", 17, [0.01] * 6)
    assert cc.compare(six, "abu", "clip", 17)["sign_test_p_two_sided"] == pytest.approx(2 / 64)
    assert cc.compare(results, "abu", "clip", 17)["queries"] == 0 and not cc.comparisons(results, ["pixel"], 17)
    line = cc.table([abu_pixel]).splitlines()[2]
    assert line.startswith("| abu | pixel | 17 | 3 | +6.7 |") and line.endswith("| 2 / 1 | p = 1.000 | no |")


def test_the_curve_over_k_and_the_one_k_figure(tmp_path, monkeypatch):
    from abu_explorer.evaluation import counterfactual_plot as cp

    results = (_cells("abu", 8, [0.03, 0.02, 0.025]) + _cells("abu", 17, [0.05, 0.04, 0.03])
               + _cells("pixel", 17, [0.04, 0.05, 0.01]) + _cells("random", 8, [0.01, 0.02, 0.015])
               + _cells("random", 17, [0.02, 0.02, 0.02]))
    summary = {**ce.summarize(results, ["abu", "random", "pixel"]), "cells": results, "num_train": 2015,
               "queries": [{"prompt": p} for p in ("a", "b", "c")],
               "floor": {"queries": {"a": {"delta_loss": 0.01}}}}
    cp.curve(summary, tmp_path / "curve.png", "curve")
    drawn, original = [], cp._per_method
    monkeypatch.setattr(cp, "_per_method", lambda ax, s, metric, k: drawn.append(k) or original(ax, s, metric, k))
    cp.plot(summary, tmp_path / "plot.png", "one K")  # K = 17 has the most cells
    assert set(drawn) == {17} and (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "plot.png").exists()


def test_the_curve_names_methods_as_the_app_does_and_marks_a_mean_over_fewer_queries():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abu_explorer.evaluation import counterfactual_plot as cp

    results = (_cells("abu", 17, [0.05, 0.04, 0.03]) + _cells("abu", 68, [0.06])
               + _cells("abu@before", 17, [0.05, 0.05, 0.05]) + _cells("random", 17, [0.02, 0.02, 0.02]))
    summary = ce.summarize(results, ["abu", "abu@before", "random"])
    fig, ax = plt.subplots()
    cp._against_k(ax, summary, "delta_loss")
    assert [t.get_text() for t in ax.texts] == ["n=1"]  # AbU at K = 68: one query of three
    assert ax.get_legend_handles_labels()[1] == ["AbU", "AbU, alpha 0.01", "random ± s.e."]
    plt.close(fig)


def test_the_ratio_to_random_is_over_the_queries_random_has_run():
    """While the control is half-run at a K, dL / random sets each method against random on the same queries only."""
    def cell(method, prompt, dl):
        return {"method": method, "k": 8, "draw": 0, "query": {"prompt": prompt}, "delta_loss": dl,
                "delta_g_mse": 0.0, "delta_g_clip": 1.0}

    results = [cell("abu", "apple", 0.06), cell("abu", "pear", 0.02), cell("random", "apple", 0.02)]
    summary = ce.summarize(results, ["abu", "random"])
    abu = summary["rows"][0]
    assert abu["ratio_to_random"] == pytest.approx(3.0) and abu["delta_loss"][0] == pytest.approx(0.04)
    line = dict(zip(*(row.split("|") for row in ce.table(summary, 2015).splitlines()[0:3:2])))
    assert line[" dL / random "].strip() == "3.00"  # not 0.04 / 0.02 = 2.00


def test_the_report_is_the_same_bytes_whatever_the_order_of_the_ks(tiny_explorer, tmp_path):
    recipe, results = tiny_recipes()[2], tmp_path / "r"
    reports = []
    for i, ks in enumerate(([2, 1], [1, 2])):
        ce.run(tiny_explorer, QUERIES[:1], ["pixel"], ks, 1, results, tmp_path / f"a{i}", progress=False,
               recipe=recipe, with_floor=False)
        reports.append((tmp_path / f"a{i}" / "counterfactual_summary.json").read_bytes())
    assert reports[0] == reports[1]
    assert [c["k"] for c in json.loads(reports[0])["cells"]] == [1, 2]
