"""The launched Gradio app, driven through gradio_client (tiny model, loopback)."""
import pytest
from gradio_client import Client, handle_file

from abu_explorer.attribution import names, spec

NO_BOX = [None, None, None, None]


@pytest.fixture(scope="module")
def client(tiny_server):
    return Client(tiny_server, verbose=False)


def attribute(client, name, prompt="red apple", box=NO_BOX, k=4, methods=None, mode="fast"):
    return client.predict(prompt, 2, 4, 3.0, None, "", *box, k, methods or names(), mode,
                          api_name=f"/attribute_{name}")


def test_generate(client):
    image, note, *box, drag = client.predict("red apple", 2, 4, 3.0, api_name="/generate")
    assert image.endswith(".png") and box == NO_BOX
    assert drag["boxes"] == [] and drag["image"]  # the annotator shows the same image, ready for a dragged box


@pytest.mark.parametrize("name", names())
def test_attribute_each_method_whole_and_box(client, name):
    head, gallery = attribute(client, name)
    assert spec(name).label in head and len(gallery) == 4
    assert gallery[0]["caption"].startswith("#1 ")
    head_b, gallery_b = attribute(client, name, box=[0, 0, 16, 16])
    assert len(gallery_b) == 4


def test_unchecked_method_is_hidden(client):
    head, gallery = attribute(client, "abu", methods=["clip"])
    assert head == "" and gallery == []


@pytest.mark.parametrize("prompt,box,k,match", [
    ("", NO_BOX, 4, "prompt"), ("apple " * 40, NO_BOX, 4, "at most"), ("red apple", [3, 3, 3, 8], 4, "zero"),
    ("red apple", [0, 0, 99, 8], 4, "maximum|outside"), ("red apple", [0, None, 4, 8], 4, "all four"),
    ("red apple", NO_BOX, 0, "K|minimum"),
])
def test_errors_are_readable(client, prompt, box, k, match):
    with pytest.raises(Exception, match=match):
        attribute(client, "clip", prompt=prompt, box=box, k=k)


def test_upload(client, tiny_app, tmp_path):
    img, caption = tiny_app.explorer.training_example(5)
    path = tmp_path / "up.png"
    img.save(path)
    preview, note, *_ = client.predict(handle_file(str(path)), caption, api_name="/upload")
    assert preview.endswith(".png") and "upload" in note
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="cannot read|image"):
        client.predict(handle_file(str(bad)), caption, api_name="/upload")


def test_show_box(client):
    client.predict("red apple", 2, 4, 3.0, api_name="/generate")  # the query source is per session: back to generated
    preview, note = client.predict("red apple", 2, 4, 3.0, None, "", 0, 0, 16, 16, api_name="/show_box")
    assert preview.endswith(".png") and note == "Box (0, 0, 16, 16)."  # the note follows the fields


def test_remove_and_regenerate_runs_in_the_background_and_caches(client):
    import time

    client.predict("red apple", 2, 4, 3.0, api_name="/generate")
    out = client.predict("red apple", 2, 4, 3.0, None, "", None, None, None, None, "pixel", 2,
                         api_name="/counterfactual")
    assert len(out) == 6
    t0 = time.time()
    while time.time() - t0 < 300:
        orig, img, md, rand, rand_md, status, jobs = client.predict(api_name="/counterfactual_status")
        if md and rand_md:
            break
        time.sleep(0.5)
    assert "dL" in md and "random" in rand_md and orig and img and rand
    assert "remove top-2 of Pixel NN: done" in jobs
    # asking again shows the cached result at once, without a new job
    out = client.predict("red apple", 2, 4, 3.0, None, "", None, None, None, None, "pixel", 2,
                         api_name="/counterfactual")
    assert "dL" in out[2] and out[5] == ""


def test_upload_preview_is_what_attribution_sees(tiny_app):
    """A transparent upload is composited on white for the preview exactly as for the attributed latent."""
    import numpy as np
    from PIL import Image

    from abu_explorer.data import model_image

    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black: white once composited
    rgba.paste((200, 30, 30, 255), (16, 16, 48, 48))
    shown = tiny_app.preview({"type": "upload", "image": rgba})
    small = model_image(rgba, tiny_app.image_size)
    assert np.asarray(small)[0, 0].tolist() == [255, 255, 255]
    assert shown.resize(small.size, Image.Resampling.BOX).getpixel((0, 0)) == (255, 255, 255)


def test_a_full_waiting_room_refuses_at_once_in_one_line_and_admitted_requests_are_served(client, tiny_app):
    import time
    turns = tiny_app.lock
    turns.acquire()  # something already holds the UNet (a retrain's measurement, say)
    try:
        jobs = [client.submit(f"room {i}", 100 + i, 4, 3.0, api_name="/generate") for i in range(turns.max_waiting)]
        t0 = time.time()
        while turns.waiting < turns.max_waiting:
            assert time.time() - t0 < 60, f"only {turns.waiting} requests reached the waiting room"
            time.sleep(0.05)
        t0 = time.time()
        with pytest.raises(Exception, match=f"server is busy: {turns.max_waiting} requests are waiting"):
            client.predict("one too many", 7, 4, 3.0, api_name="/generate")
        assert time.time() - t0 < 10, "the refusal waited instead of answering at once"
        assert attribute(client, "abu", methods=["clip"]) == ("", [])  # unchecked: no turn needed, not refused
    finally:
        turns.release()
    assert all(job.result(timeout=120)[0].endswith(".png") for job in jobs)
    assert turns.waiting == 0


def test_a_box_example_shows_its_known_sources_through_the_api(tiny_app, tmp_path):
    """The Examples tab of a launched app: a two-concept box query names where each method puts its sources."""
    import json
    import shutil
    import sys

    from abu_explorer.app import examples
    from abu_explorer.app.demo import LAUNCH
    from abu_explorer.evaluation import boxes

    folder = tiny_app.explorer.root / "examples"
    assert not folder.exists()
    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({"queries": [{"prompt": "red apple", "seed": 3, "steps": 4}]}))
    examples.build(tiny_app, queries, folder, methods=["pixel", "random"], progress=False, box_pairs=1)
    from conftest import ROOT

    sys.path.insert(0, str(ROOT))
    import app as app_module

    demo = app_module.build_demo(tiny_app)
    try:
        demo.queue(max_size=8)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                                **LAUNCH)
        (a, b), = boxes.choose_pairs(tiny_app.explorer, 1)
        client = Client(url, verbose=False)
        k = examples.grid_ks(len(tiny_app.explorer.dataset))[-1]  # the tiles at a K of the tab's choice: none run
        out = client.predict(f"box_{a}_{b}_a", k, api_name="/example")
        assert out[1] == [] and client.predict(f"box_{a}_{b}_a", k, api_name="/example_k") == []
        heads = [o for o in out if isinstance(o, str) and o.startswith("**")]
        pixel = next(h for h in heads if h.startswith("**Pixel NN**"))
        assert "own source **#" in pixel and "other #" in pixel
        rank = int(pixel.split("own source **#")[1].split("**")[0])
        gallery = out[[i for i, o in enumerate(out) if o is pixel][0] + 1]
        framed = [t["caption"] for t in gallery if t["caption"].startswith("[box's own source]")]
        assert len(framed) == (1 if rank <= examples.TOP else 0)
        # the embedded model's page says what its box benchmark found (a user's model gets no such line)
        texts = " ".join(str(c.get("props", {}).get("value", "")) for c in demo.config["components"])
        assert "binds no region to a word" in texts
    finally:
        demo.close()
        shutil.rmtree(folder)


def test_a_customized_example_frames_its_exemplars_and_recustomizes(tiny_app, tmp_path):
    """The Examples tab on a customized model: each method's exemplar ranks, the exemplars framed in its gallery,
    and remove-and-re-customize through the API."""
    import json
    import shutil
    import sys

    from abu_explorer.app import examples
    from abu_explorer.app.demo import LAUNCH
    folder = tiny_app.explorer.root / "examples"
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"id": "t0", "kind": "family", "codes": ["E062", "E063"], "split": "tune",
                                     "word": tiny_app.explorer.tokenizer.vocab[4]}]))
    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({"queries": [{"prompt": "red apple", "seed": 3, "steps": 4}]}))
    examples.build(tiny_app, queries, folder, methods=["pixel", "random"], progress=False, box_pairs=0,
                   customized=1, concepts=concepts, customized_results=tmp_path / "results")
    from conftest import ROOT

    sys.path.insert(0, str(ROOT))
    import app as app_module

    demo = app_module.build_demo(tiny_app)
    try:
        demo.queue(max_size=8)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                                **LAUNCH)
        client = Client(url, verbose=False)
        out = client.predict("custom_t0", examples.grid_ks(len(tiny_app.explorer.dataset))[-1], api_name="/example")
        pixel = next(o for o in out if isinstance(o, str) and o.startswith("**Pixel NN**"))
        ranks = [int(x.split("**")[0]) for x in pixel.split("exemplars at ")[1].split("#")[1:]]
        gallery = out[[i for i, o in enumerate(out) if o is pixel][0] + 1]
        framed = [t["caption"] for t in gallery if t["caption"].startswith("[exemplar]")]
        assert len(ranks) == 2 and len(framed) == sum(r <= examples.TOP for r in ranks)
        tiles, text = client.predict("custom_t0", "pixel", 2, api_name="/recustomize")
        assert len(tiles) == 2 and "**dL**" in text
        removed = sum(r <= 2 for r in ranks)
        assert f"held {removed} of the 2 exemplars" in text
        with pytest.raises(Exception, match="works on the customized-model examples"):
            client.predict("red_apple_s3", "pixel", 2, api_name="/recustomize")
    finally:
        demo.close()
        shutil.rmtree(folder)


def test_examples_tab_folds_each_evaluation_that_has_a_table_or_plot(tmp_path):
    import gradio as gr
    from PIL import Image

    from abu_explorer.app.views import examples as view

    (tmp_path / "lds_table.md").write_text("| method | LDS |\n|---|---|\n| AbU | +0.2 |\n")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "lds_plot.png")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "boxes_plot.png")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "counterfactual_curve.png")  # the loss-vs-K curve alone
    with gr.Blocks() as demo:
        view.evaluations(tmp_path)
    folds = {b.elem_id: b for b in demo.blocks.values() if isinstance(b, gr.Accordion)}
    assert set(folds) == {"evaluation-counterfactual", "evaluation-lds", "evaluation-boxes"}  # none without files
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any("| AbU | +0.2 |" in t for t in texts)
    assert sum(isinstance(b, gr.Image) for b in demo.blocks.values()) == 3
