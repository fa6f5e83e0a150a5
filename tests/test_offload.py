"""Export -> retrain (in a worker process) -> import gives what ``counterfactual.run`` gives, on the tiny model."""
import json

import pytest
import torch

from abu_explorer import artifacts, counterfactual, offload
from abu_explorer.attribution import query as q
from conftest import tiny_recipes


@pytest.fixture(scope="module")
def offloaded(tiny_explorer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    recipe = tiny_recipes()[2]
    queries = [{"prompt": "red apple", "seed": 1, "steps": 3}]
    doc = offload.export(tiny_explorer, queries, ["pixel", "random"], [3, 2], 1, tmp / "bundle", recipe,
                         progress=False)
    lines = tmp / "cells.jsonl"
    n = offload.retrain(tmp / "bundle", lines, "cpu", workers=2, threads=torch.get_num_threads(), log=lambda *_: None)
    return tmp, recipe, doc, lines, n


def test_export_orders_cells_and_puts_the_floor_after_the_first_k(offloaded):
    _, _, doc, _, n = offloaded
    assert [(c["method"], c["k"]) for c in doc["cells"]] == [("pixel", 3), ("random", 3), ("full", 0),
                                                              ("pixel", 2), ("random", 2)]
    pixel3, pixel2 = doc["cells"][0]["removed"], doc["cells"][3]["removed"]
    assert pixel2 == pixel3[:2]  # one ranking, cut at each K
    assert n == 5


def test_offloaded_cell_equals_counterfactual_run(offloaded, tiny_explorer):
    tmp, recipe, doc, lines, _ = offloaded
    rep = offload.import_results(tiny_explorer, tmp / "bundle", lines, tmp / "results", tmp / "report.json")
    assert rep["written"] == 4 and rep["original_parity"][0]["latent_max_abs_diff"] < 1e-5
    # the K = 0 retrain on the machine that trained the model gives back its loss (to float rounding)
    assert list(rep["floor_delta_loss"]) == ["0"] and abs(rep["floor_delta_loss"]["0"]) < 1e-5
    query = q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)
    direct = counterfactual.run(tiny_explorer, query, "pixel", 3, tmp / "direct", recipe=recipe, progress=False)
    imported = artifacts.load_json(tmp / "results" / direct["key"] / "result.json")
    assert imported["removed"] == direct["removed"] and imported["trained_on"]["device"].startswith("cpu")
    for metric in ("loss_original", "delta_loss", "delta_g_mse", "delta_g_clip"):
        assert imported[metric] == pytest.approx(direct[metric], rel=1e-4, abs=1e-7), metric
    again = offload.import_results(tiny_explorer, tmp / "bundle", lines, tmp / "results")
    assert again["written"] == 0 and len(again["skipped_existing"]) == 4  # never over an existing result


def test_retrain_resumes_and_mismatches_fail(offloaded, tiny_explorer):
    tmp, _, doc, lines, _ = offloaded
    before = lines.read_text()
    assert offload.retrain(tmp / "bundle", lines, "cpu", log=lambda *_: None) == 0
    assert lines.read_text() == before
    bad = tmp / "bad"
    bad.mkdir()
    (bad / offload.BUNDLE).write_bytes((tmp / "bundle" / offload.BUNDLE).read_bytes() + b"x")
    (bad / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(artifacts.ArtifactError, match="does not match plan.json"):
        offload.retrain(bad, tmp / "x.jsonl", "cpu", log=lambda *_: None)
    (bad / offload.BUNDLE).write_bytes((tmp / "bundle" / offload.BUNDLE).read_bytes())
    (bad / "plan.json").write_text(json.dumps({**doc, "hashes": {**doc["hashes"], "unet": "0" * 16}}))
    with pytest.raises(artifacts.ArtifactError, match="another unet"):
        offload.import_results(tiny_explorer, bad, lines, tmp / "results2")
