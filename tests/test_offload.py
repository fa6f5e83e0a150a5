"""Export -> retrain (in worker processes) -> import gives what ``counterfactual.run`` gives, on the tiny model."""
import json

import pytest
import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual, offload, offload_retrain
from abu_explorer.attribution import query as q
from conftest import tiny_recipes

QUERIES = [{"prompt": "red apple", "seed": 1, "steps": 3}, {"prompt": "banana", "seed": 2, "steps": 3, "box": [0, 0, 16, 32]}]


def _query(explorer, i):
    d = QUERIES[i]
    return q.from_generation(explorer, d["prompt"], d["seed"], d["steps"], box=tuple(d["box"]) if "box" in d else None)


@pytest.fixture(scope="module")
def offloaded(tiny_explorer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    recipe = tiny_recipes()[2]
    doc = offload.export(tiny_explorer, QUERIES, ["pixel", "random"], [3, 2], 1, tmp / "bundle", recipe,
                         progress=False)
    lines = tmp / "cells.jsonl"
    threads = torch.get_num_threads()
    n = offload_retrain.retrain(tmp / "bundle", lines, "cpu", workers=2, threads=threads, log=lambda *_: None)
    assert torch.get_num_threads() == threads  # the caller's settings are left alone
    return tmp, recipe, doc, lines, n


def test_export_orders_cells_and_cuts_one_ranking(offloaded, tiny_explorer):
    tmp, _, doc, _, n = offloaded
    assert [(c["method"], c["k"], c["query"]) for c in doc["cells"]] == [
        ("pixel", 3, 0), ("pixel", 3, 1), ("random", 3, 0), ("random", 3, 1), ("full", 0, None),
        ("pixel", 2, 0), ("pixel", 2, 1), ("random", 2, 0), ("random", 2, 1)]
    assert n == 9
    for c in doc["cells"]:
        if c["method"] != "full":
            assert c["removed"] == counterfactual.removal(tiny_explorer, _query(tiny_explorer, c["query"]),
                                                          c["method"], c["k"], c["draw"])
    with pytest.raises(ValueError, match="distinct"):
        offload.export(tiny_explorer, QUERIES, ["pixel"], [2, 2], 1, tmp / "unused", progress=False)


def test_offloaded_cells_equal_counterfactual_run(offloaded, tiny_explorer):
    tmp, recipe, doc, lines, _ = offloaded
    rep = offload.import_results(tiny_explorer, tmp / "bundle", lines, tmp / "results", tmp / "report.json")
    assert rep["written"] == 8
    for p in rep["original_parity"]:
        assert p["latent_max_abs_diff"] < 1e-5 and p["loss_there"] == pytest.approx(p["loss_here"], abs=1e-6)
    # the K = 0 retrain on the machine that trained the model gives back its loss (to float rounding)
    assert sorted(rep["floor_delta_loss"]) == ["0", "1"] and max(map(abs, rep["floor_delta_loss"].values())) < 1e-5
    for qi, method, k in [(0, "pixel", 2), (1, "random", 3)]:  # the second query carries a box
        direct = counterfactual.run(tiny_explorer, _query(tiny_explorer, qi), method, k, tmp / "direct",
                                    recipe=recipe, progress=False)
        imported = artifacts.load_json(counterfactual.find_result(tmp / "results", direct["key"]) / "result.json")
        assert imported["removed"] == direct["removed"] and imported["trained_on"]["kind"] == direct["trained_on"]["kind"]
        assert imported["trained_on"]["device"].startswith("cpu (") and direct["trained_on"]["device"].startswith("cpu (")
        # the same cell trained in two processes: equal up to float rounding (seen: 1.8e-7 in dL on an AMD
        # EPYC, 1e-7 on a Xeon); another removed set moves dL by ~1e-3
        for metric in ("loss_original", "delta_loss", "delta_g_mse", "delta_g_clip"):
            assert imported[metric] == pytest.approx(direct[metric], rel=1e-4, abs=2e-6), (qi, metric)
    again = offload.import_results(tiny_explorer, tmp / "bundle", lines, tmp / "results")
    assert again["written"] == 0 and len(again["skipped_existing"]) == 8  # never over an existing result


def test_retrain_resumes_only_what_is_missing(offloaded, tiny_explorer):
    tmp, _, doc, lines, _ = offloaded
    assert offload_retrain.retrain(tmp / "bundle", lines, "cpu", log=lambda *_: None) == 0  # all done: nothing runs
    kept = [ln for ln in lines.read_text().splitlines() if json.loads(ln)["key"] != doc["cells"][0]["key"]]
    foreign = json.loads(kept[-1]) | {"plan": "another-plan", "key": doc["cells"][5]["key"]}
    partial = tmp / "partial.jsonl"
    gone = doc["cells"][5]["key"]
    kept = [ln for ln in kept if json.loads(ln)["key"] != gone]
    partial.write_text("\n".join(kept) + "\n" + json.dumps(foreign) + "\n" + '{"type": "cell", "ke')  # torn last line
    logged = []
    assert offload_retrain.retrain(tmp / "bundle", partial, "cpu", log=logged.append) == 2
    assert "2 of 9 cells" in logged[0]
    redone = [json.loads(ln) for ln in partial.read_text().splitlines()[-2:]]
    assert {d["key"] for d in redone} == {doc["cells"][0]["key"], gone}


def test_mismatches_fail_loudly(offloaded, tiny_explorer):
    tmp, _, doc, lines, _ = offloaded
    bad = tmp / "bad"
    bad.mkdir()
    (bad / offload_retrain.BUNDLE).write_bytes((tmp / "bundle" / offload_retrain.BUNDLE).read_bytes() + b"x")
    (bad / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(artifacts.ArtifactError, match="does not match plan.json"):
        offload_retrain.retrain(bad, tmp / "x.jsonl", "cpu", log=lambda *_: None)
    (bad / offload_retrain.BUNDLE).write_bytes((tmp / "bundle" / offload_retrain.BUNDLE).read_bytes())
    (bad / "plan.json").write_text(json.dumps({**doc, "hashes": {**doc["hashes"], "unet": "0" * 16}}))
    with pytest.raises(artifacts.ArtifactError, match="another unet"):
        offload.import_results(tiny_explorer, bad, lines, tmp / "results2")
    with pytest.raises(FileNotFoundError, match="offload retrain"):
        offload.import_results(tiny_explorer, tmp / "bundle", tmp / "missing.jsonl", tmp / "results2")


def test_stacked_retrain_matches_one_at_a_time(offloaded):
    tmp, _, doc, lines, _ = offloaded
    stacked = tmp / "stacked.jsonl"
    assert offload_retrain.retrain(tmp / "bundle", stacked, "cpu", stack=3, log=lambda *_: None) == 9
    one = {d["key"]: d for d in map(json.loads, lines.read_text().splitlines()) if d["type"] == "cell"}
    many = {d["key"]: d for d in map(json.loads, stacked.read_text().splitlines()) if d["type"] == "cell"}
    assert sorted(d["stacked_with"] for d in many.values()) == [1, 1, 1, 3, 3, 3, 3, 3, 3]
    for key, d in many.items():
        for qi, loss in d["losses"].items():
            assert loss == pytest.approx(one[key]["losses"][qi], rel=1e-3), (d["name"], qi)
