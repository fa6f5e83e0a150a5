"""The functions behind the web app, without Gradio (tiny model)."""
import time

import pytest
import torch

from abu_explorer.app import inputs
from abu_explorer.app import service as ui
from abu_explorer.attribution import names, spec
from abu_explorer.attribution.query import QueryError
from abu_explorer.model.tokenizer import PromptError

GEN = {"type": "generated", "prompt": "red apple", "seed": 3, "steps": 4, "guidance": 3.0}


def test_generation_is_cached_and_deterministic(tiny_app):
    a = tiny_app.generate("red apple", 3, 4, 3.0)
    assert tiny_app.generate("red apple", 3, 4, 3.0) is a
    tiny_app._queries.clear()
    b = tiny_app.generate("red apple", 3, 4, 3.0)
    assert torch.equal(a.latent, b.latent)


@pytest.mark.parametrize("args,match", [
    (("", 0, 4, 3.0), "prompt"), (("   ", 0, 4, 3.0), "prompt"), (("apple " * 40, 0, 4, 3.0), "at most"),
    (("red apple", -1, 4, 3.0), "seed"), (("red apple", 1.5, 4, 3.0), "seed"), (("red apple", 0, 0, 3.0), "steps"),
    (("red apple", 0, 4, 99.0), "guidance"), (("red apple", "x", 4, 3.0), "seed"),
])
def test_bad_generation_input_is_refused_clearly(tiny_app, args, match):
    with pytest.raises((ui.UIError, PromptError), match=match):
        tiny_app.generate(*args)


@pytest.mark.parametrize("name", names())
def test_every_method_attributes_whole_and_box(tiny_app, name):
    whole = tiny_app.attribute(tiny_app.query(GEN), name, 5)
    boxed = tiny_app.attribute(tiny_app.query(GEN, (0, 0, 16, 20)), name, 5)
    for out in (whole, boxed):
        assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
        assert out["method"] == name and out["label"] == spec(name).label
    assert boxed["query"]["box"] == [0.0, 0.0, 16.0, 20.0]
    if name != "random":  # the box changes what is measured, so the scores change
        assert [r["score"] for r in whole["results"]] != [r["score"] for r in boxed["results"]]
    tiles = tiny_app.tiles(whole)
    assert len(tiles) == 5 and tiles[0][0].size == (128, 128) and tiles[0][1].startswith("#1 ")
    again = tiny_app.attribute(tiny_app.query(GEN), name, 5)
    assert [r["index"] for r in again["results"]] == [r["index"] for r in whole["results"]]  # determinism


def test_bad_attribution_input_is_refused_clearly(tiny_app):
    query = tiny_app.query(GEN)
    n = len(tiny_app.explorer.dataset)
    with pytest.raises(ui.UIError, match="K"):
        tiny_app.attribute(query, "clip", n + 1)
    with pytest.raises(ui.UIError, match="K"):
        tiny_app.attribute(query, "clip", 0)
    with pytest.raises(ui.UIError, match="unknown method"):
        tiny_app.attribute(query, "dinosaur", 5)
    with pytest.raises(ui.UIError, match="needs ABU_DINO_MODEL"):  # known, but no checkpoint was given
        tiny_app.attribute(query, "dino", 5)
    with pytest.raises(ui.UIError, match="mode"):
        tiny_app.attribute(query, "abu", 5, "slow")
    with pytest.raises(QueryError, match="zero"):
        tiny_app.query(GEN, (4, 4, 4, 9))
    with pytest.raises(QueryError, match="outside"):
        tiny_app.query(GEN, (0, 0, 40, 9))
    with pytest.raises(ui.UIError, match="all four"):
        tiny_app.query(GEN, (0, None, 4, 9))
    assert tiny_app.query(GEN, (None, None, None, None)).box is None
    with pytest.raises(ui.UIError, match="upload an image"):
        tiny_app.query({"type": "upload", "image": None, "caption": "x"})


def test_upload_query_and_corrupt_upload(tiny_app, tmp_path):
    img, caption = tiny_app.explorer.training_example(3)
    out = tiny_app.attribute(tiny_app.query({"type": "upload", "image": img, "caption": caption}), "pixel", 3)
    assert out["query"]["type"] == "upload" and len(out["query"]["image_hash"]) == 16 and len(out["results"]) == 3
    other, _ = tiny_app.explorer.training_example(4)
    assert tiny_app.query({"type": "upload", "image": other, "caption": caption}).describe() != \
        tiny_app.query({"type": "upload", "image": img, "caption": caption}).describe()  # distinct cache keys
    with pytest.raises(ui.UIError, match="caption"):
        tiny_app.query({"type": "upload", "image": img, "caption": " "})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ui.UIError, match="cannot read"):
        tiny_app.query({"type": "upload", "image": str(bad), "caption": "apple"})
    good = tmp_path / "good.png"
    img.save(good)
    assert tiny_app.query({"type": "upload", "image": str(good), "caption": caption}).describe() == \
        tiny_app.query({"type": "upload", "image": img, "caption": caption}).describe()


def test_clicks_and_box_drawing():
    assert inputs.clicks_to_box((200, 40), (40, 160), 256, 32) == (5, 5, 25, 20)
    from PIL import Image

    img = Image.new("RGB", (32, 32), "white")
    drawn = inputs.draw_box(img, (0, 0, 16, 16), 256)
    assert drawn.size == (256, 256) and drawn.getpixel((1, 60)) != (255, 255, 255)
    assert drawn.getpixel((200, 200)) == (255, 255, 255)


def test_counterfactual_job_runs_once_and_is_cached(tiny_app):
    query = tiny_app.query(GEN)
    job = tiny_app.submit_counterfactual(query, "clip", 2)
    assert tiny_app.submit_counterfactual(query, "clip", 2) is job  # never run twice
    t0 = time.time()
    while job.status in ("queued", "running") and time.time() - t0 < 300:
        time.sleep(0.2)
    assert job.status == "done", job.error
    assert job.total_units == tiny_app.recipe.epochs and job.done_units == tiny_app.recipe.epochs
    cached = tiny_app.cached_counterfactual(query, "clip", 2)
    assert cached == job.result and len(cached["removed"]) == 2
    img, md = tiny_app.counterfactual_view(cached)
    assert img is not None and "dL" in md and "K = 0" not in md  # no floor filed yet
    from abu_explorer.evaluation import counterfactual

    counterfactual.floor(tiny_app.explorer, [query], tiny_app.results_dir, tiny_app.recipe, progress=False)
    _, md = tiny_app.counterfactual_view(cached)  # the floor of the result's machine kind, beside its dL
    assert "(K = 0) on that kind: dL +0.0000" in md and f"adds {cached['delta_loss']:+.4f}" in md
    from abu_explorer.app import examples

    item = {"source": {**query.source, "prompt": query.prompt}}  # the Examples tab's tiles of the same query
    tiles = examples.counterfactual_tiles(tiny_app, item, 2)
    assert tiles[0][1] == "original (K = 0 retrain: dL +0.0000)" and tiles[1][1].startswith("-clip K=2: dL")
    assert examples.counterfactual_tiles(tiny_app, item, 3) == []  # another K of the tab's choice: not retrained
    assert examples.grid_ks(2015) == [8, 17, 68] and examples.grid_ks(100) == [1, 3]


def _finished(job):
    t0 = time.time()
    while job.status in ("queued", "running") and time.time() - t0 < 300:
        time.sleep(0.2)
    assert job.status == "done", job.error
    return job.result


def test_the_examples_tiles_end_with_the_source_reference_at_every_k(tiny_app):
    from abu_explorer.app import examples

    caption = tiny_app.explorer.dataset.captions[7]  # a prompt that is a training caption has a source image
    query = tiny_app.query({**GEN, "prompt": caption})
    item = {"source": {**query.source, "prompt": query.prompt}}
    from abu_explorer.evaluation import counterfactual

    source = counterfactual.run(tiny_app.explorer, query, "source", 1, tiny_app.results_dir, tiny_app.recipe,
                                progress=False)  # as the evaluation files it (the app offers no such request)
    assert source["removed"] == [7] and source["k"] == 1
    assert examples.counterfactual_tiles(tiny_app, item, 2) == []  # the reference alone is no K's result
    _finished(tiny_app.submit_counterfactual(query, "pixel", 2))
    tiles = examples.counterfactual_tiles(tiny_app, item, 2)
    assert [t[1].split(" K=")[0] for t in tiles[1:]] == ["-pixel", "-the source image alone (a reference: reads "
                                                                  "the query's provenance)"]
    assert tiles[2][1].endswith(f"K=1: dL {source['delta_loss']:+.4f}, MSE {source['delta_g_mse']:.3f}, "
                                f"CLIP {source['delta_g_clip']:.2f}")


def test_request_queues_the_method_and_the_random_control_once(tiny_app, tmp_path):
    app = ui.ExplorerApp(tiny_app.explorer, tmp_path, recipe=tiny_app.recipe)
    query = app.query(GEN)
    keys = app.request_counterfactual(query, "pixel", 2)
    assert keys == [app.counterfactual_key(query, "pixel", 2), app.counterfactual_key(query, "random", 2)]
    jobs = [app.jobs.get(key) for key in keys]
    assert all(j is not None for j in jobs)
    assert app.request_counterfactual(query, "pixel", 2) == keys  # asked again: the same jobs, none added
    assert [app.jobs.get(key) for key in keys] == jobs
    for job in jobs:
        t0 = time.time()
        while job.status in ("queued", "running") and time.time() - t0 < 300:
            time.sleep(0.2)
        assert job.status == "done", job.error
    with pytest.raises(ui.UIError, match="random images are always removed"):
        app.request_counterfactual(query, "random", 2)
    with pytest.raises(ui.UIError, match="K"):
        app.request_counterfactual(query, "pixel", len(app.explorer.dataset) + 1)


def test_cancelled_job_stops_and_resumes(tiny_app, tmp_path):
    import dataclasses

    # a longer recipe, so the cancel lands mid-run; its own results folder
    app = ui.ExplorerApp(tiny_app.explorer, tmp_path, recipe=dataclasses.replace(tiny_app.recipe, epochs=40))
    query = app.query(GEN)
    job = app.submit_counterfactual(query, "random", 3)
    t0 = time.time()
    while job.done_units < 1 and job.status in ("queued", "running") and time.time() - t0 < 300:
        time.sleep(0.01)
    app.jobs.cancel(job.key)  # while it runs: it stops at the end of an epoch
    again = app.submit_counterfactual(query, "random", 3)  # asked again at once: a new job, queued behind
    assert again is not job
    while again.status in ("queued", "running") and time.time() - t0 < 300:
        time.sleep(0.05)
    assert job.status == "cancelled" and job.done_units < 40
    assert again.status == "done", again.error
    assert again.units_at_start >= job.done_units  # resumed from the checkpoint, not from scratch


def test_examples_build_load_and_refuse_another_model(tiny_app, tmp_path):
    import json

    from abu_explorer.app import examples
    from abu_explorer.artifacts import ArtifactError

    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({"queries": [{"prompt": "red apple", "seed": 3, "steps": 4}]}))
    out = examples.build(tiny_app, queries, tmp_path / "ex", methods=["clip", "random"], progress=False)
    items = examples.load(tiny_app, out)
    assert len(items) == 1 and set(items[0]["rankings"]) == {"clip", "random"}
    assert len(items[0]["rankings"]["clip"]["results"]) == examples.TOP
    assert examples.load(tiny_app, tmp_path / "none") == []
    assert not examples.stale(tiny_app, items[0], "clip")  # made with the settings the method has now
    items[0]["rankings"]["clip"]["settings"]["tables"] = "0" * 16
    assert examples.stale(tiny_app, items[0], "clip")  # other tables: the app says so beside the ranking
    doc = json.loads((out / "examples.json").read_text())
    doc["provenance"]["unet_hash"] = "0" * 16
    (out / "examples.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="another model.*python -m abu_explorer examples"):
        examples.load(tiny_app, out)


def test_box_examples_know_their_sources(tiny_app, tmp_path):
    import json

    from abu_explorer.app import examples
    from abu_explorer.evaluation import boxes

    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({"queries": [{"prompt": "red apple", "seed": 3, "steps": 4}]}))
    out = examples.build(tiny_app, queries, tmp_path / "ex", methods=["pixel", "random", "journey"], progress=False,
                         box_pairs=1)
    items = examples.load(tiny_app, out)
    (a, b), = boxes.choose_pairs(tiny_app.explorer, 1)
    left, right = items[1:]
    assert left["known"] == {"own": a, "other": b} and right["known"] == {"own": b, "other": a}
    assert set(left["rankings"]) == {"pixel", "random"}  # Journey-TRAK needs a generated query: not offered
    ranks = left["rankings"]["pixel"]["tracked"]
    assert sorted(ranks) == sorted([str(a), str(b)]) and all(1 <= r <= len(tiny_app.explorer.dataset) for r in ranks.values())
    src = {"type": "upload", "image": str(out / left["source"]["upload"]), "caption": left["source"]["prompt"]}
    order = tiny_app.method("pixel").score(tiny_app.query(src, left["box"])).order.tolist()
    assert ranks == {str(a): order.index(a) + 1, str(b): order.index(b) + 1}  # the ranks of the full ranking
    top = [r["index"] for r in left["rankings"]["pixel"]["results"]]
    assert "two-concept box" in examples.label(left, tiny_app.explorer.dataset.captions)
    assert examples.counterfactuals(tiny_app, left, 17) == []  # no retrain for an upload
    tiles = tiny_app.tiles(left["rankings"]["pixel"], marks={top[0]: ("#2ca02c", "box's own source")})
    assert tiles[0][1].startswith("[box's own source] #1 ")


def test_admission_caps_per_client_and_in_total():
    """Long jobs pass a per-client and a global cap; a known key is not counted twice; cancelling frees a slot;
    waiting jobs know their place in the queue."""
    import threading

    from abu_explorer.app.jobs import JobQueue, Refused

    gate = threading.Event()
    jobs = JobQueue(per_client=2, total=3)

    def slow(progress):
        progress(1, 2)
        gate.wait(30)
        return {}

    a1 = jobs.submit("a1", "a1", slow, owner="alice")
    jobs.submit("a2", "a2", slow, owner="alice")
    assert jobs.submit("a1", "a1", slow, owner="alice") is a1  # already queued: not a new job
    with pytest.raises(Refused, match="at most 2 per visitor"):
        jobs.submit("a3", "a3", slow, owner="alice")
    jobs.submit("b1", "b1", slow, owner="bob")
    with pytest.raises(Refused, match="server is busy"):
        jobs.submit("c1", "c1", slow, owner="carol")
    t0 = time.time()
    while a1.status != "running" and time.time() - t0 < 10:
        time.sleep(0.01)
    assert [jobs.position(k) for k in ("a1", "a2", "b1")] == [0, 1, 2]
    assert jobs.expected_start_seconds("b1", 100.0) > 100.0 and jobs.expected_start_seconds("a1", 100.0) is None
    jobs.cancel("a2")  # a queued job cancelled: its slot is free at once
    assert jobs.position("b1") == 1
    jobs.submit("c1", "c1", slow, owner="carol")
    gate.set()


def test_a_request_is_admitted_whole_or_not_at_all(tiny_app, tmp_path):
    from abu_explorer.app.jobs import JobQueue, Refused

    app = ui.ExplorerApp(tiny_app.explorer, tmp_path, recipe=tiny_app.recipe)
    app.jobs = JobQueue(per_client=1, total=5)
    query = app.query(GEN)
    with pytest.raises(Refused, match="per visitor"):
        app.request_counterfactual(query, "pixel", 2, owner="alice")  # method + random = 2 jobs > 1
    assert app.jobs.snapshot() == []  # neither was queued


def test_rankings_download_and_agreement(tiny_app, tmp_path):
    import csv
    import json

    from abu_explorer.app import exports

    query = tiny_app.query(GEN)
    shown = [tiny_app.attribute(query, m, 4) for m in ("pixel", "clip", "random")]
    js, cs = exports.write_rankings(shown, tiny_app.model_hashes(), tiny_app.method_settings(), tmp_path)
    doc = json.loads(js.read_text())
    assert doc["model"]["unet_hash"] == tiny_app.explorer.component_hash("unet")
    assert [r["index"] for r in doc["methods"]["pixel"]["results"]] == [r["index"] for r in shown[0]["results"]]
    assert doc["methods"]["pixel"]["settings"]["config"]["index_type"] == "Flat"
    rows = list(csv.DictReader(cs.open()))
    assert len(rows) == 12 and rows[0]["method"] == "pixel" and rows[0]["rank"] == "1"
    assert float(rows[0]["score"]) == shown[0]["results"][0]["score"]  # full precision
    table = exports.agreement(shown)
    a, b = ({r["index"] for r in x["results"]} for x in shown[:2])
    assert "each pair's top 4" in table and f"| 2 clip | {len(a & b)} | · |  |" in table
    assert table.splitlines()[2] == "| | 1 | 2 | 3 |" and table.splitlines()[-1].startswith("| 3 random | ")
    with pytest.raises(ValueError, match="attribute first"):
        exports.write_rankings([None, None], {}, {}, tmp_path)


def test_gpu_decorator_is_a_no_op_without_spaces_and_used_with_it(monkeypatch):
    import sys
    import types

    from abu_explorer.app.views import common

    def f(x: int) -> int:
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed
    assert common.gpu(f) is f
    seen = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn: (seen.append(fn), lambda *a, **k: fn(*a, **k))[1]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    wrapped = common.gpu(f)
    assert seen == [f] and wrapped(1) == 2 and wrapped.__name__ == "f"


def test_a_dragged_box_becomes_model_pixels():
    drag = {"image": None, "boxes": [{"xmin": 200, "ymin": 40.4, "xmax": 32, "ymax": 300, "label": ""}]}
    assert inputs.dragged_box(drag, 256, 32) == (4, 5, 25, 32)  # corners sorted, scaled by 32/256, clamped
    assert inputs.dragged_box({"image": None, "boxes": []}, 256, 32) is None and inputs.dragged_box(None, 256, 32) is None
    click = {"boxes": [{"xmin": 40, "ymin": 40, "xmax": 41, "ymax": 90}]}
    assert inputs.dragged_box(click, 256, 32) is None  # no area in model pixels: nothing to attribute yet


def test_a_ranking_needs_the_unet_only_for_a_prompt_not_generated_yet(tiny_app):
    src = {"type": "generated", "prompt": "needs unet", "seed": 3, "steps": 2, "guidance": 3.0}
    assert tiny_app.needs_generation(src)
    tiny_app.generate("needs unet", 3, 2, 3.0)
    assert not tiny_app.needs_generation(src)  # cached: a nearest-neighbour ranking is admitted without a turn
    assert tiny_app.needs_generation({**src, "seed": 4})
    assert not tiny_app.needs_generation({**src, "seed": "x"})  # bad input: the call answers with its error
    assert not tiny_app.needs_generation({"type": "upload", "image": None, "caption": ""})


def test_cells_of_a_replaced_default_are_found_under_their_own_key(tiny_app, tmp_path):
    from abu_explorer.attribution import spec
    from abu_explorer.attribution.settings import BEFORE_TUNING, variant_label
    from abu_explorer.evaluation import counterfactual

    app = ui.ExplorerApp(tiny_app.explorer, tmp_path, recipe=tiny_app.recipe)
    query = app.query(GEN)
    old = counterfactual.removal_settings(app.explorer, "abu", spec("abu").load(app.explorer, **BEFORE_TUNING["abu"]))
    assert app.counterfactual_key(query, "abu@before", 2) == counterfactual.request_key(
        app.explorer, query, "abu", 2, 0, app.recipe, old)  # the key the evaluation filed those cells under
    assert app.counterfactual_key(query, "abu@before", 2) != app.counterfactual_key(query, "abu", 2)
    assert variant_label("abu@before") == "abu, before tuning (alpha = 0.01)" and variant_label("abu") == "abu"
