"""The launched app in a real headless Chromium (tiny model, loopback): generate, box, attribute, open a tile.

Needs /usr/bin/chromium (Debian's ``chromium`` package; .ci/run installs it) and the pinned ``playwright``.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from abu_explorer.attribution import names, spec

ROOT = Path(__file__).resolve().parent.parent


def _load_browser_check():
    found = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


browser_check = _load_browser_check()



@pytest.fixture(scope="module", autouse=True)
def chromium():
    """A browser test never skips in silence: without the browser it fails and says how to install it."""
    if not os.path.exists(browser_check.CHROMIUM):
        pytest.fail(f"{browser_check.CHROMIUM} is missing: install it with "
                    "`sudo apt-get install -y --no-install-recommends chromium` (bash .ci/run does)", pytrace=False)


@pytest.fixture(scope="module")
def seen(chromium, tiny_server, tmp_path_factory):
    """One browser session through the whole flow; the tests below check parts of what it saw."""
    shot = tmp_path_factory.mktemp("browser") / "app.png"
    seen = browser_check.drive(tiny_server, screenshot=str(shot), timeout_s=60)
    print(json.dumps(seen, indent=1))  # shown with a failure
    return seen


def test_generate_box_attribute(seen):
    assert seen["title"] == "AbU Explorer"
    assert seen["query_image"]["width"] > 0
    assert [float(v) for v in seen["box"]] == [4, 4, 24, 24]
    for name in names():
        assert seen["tiles"][name] >= 1, (name, seen["tiles"])
        assert spec(name).label in seen["headings"][name], (name, seen["headings"][name])
    shot = Path(seen["screenshot"])
    assert shot.exists() and shot.stat().st_size > 20_000


def test_select_events(seen):
    """Two clicks on the query image set the box; clicking a tile shows it in the detail panel."""
    assert seen["two_click_box"]["ok"], seen["two_click_box"]
    assert seen["tile"]["ok"], seen["tile"]
    assert seen["dragged_box"]["ok"], seen["dragged_box"]  # a box dragged on the annotator fills the fields
    assert seen["tile"]["image"]["width"] > 0
    assert seen["new_query_clears"]["ok"], seen["new_query_clears"]  # old rankings leave with their query
    assert "training index" in seen["tile"]["text"] and spec("abu").label in seen["tile"]["text"]


def test_a_tile_shows_its_full_caption_on_hover(seen):
    """A tile's label is cut to one line; hovered, it wraps to show the whole "#rank caption (idx, score)",
    which is also the tile's tooltip."""
    hover = seen["tile_hover"]
    assert hover["title"].startswith("#1 ") and "(idx " in hover["title"], hover
    assert hover["title"] == hover["label"] and not hover["label_cut"], hover


def test_the_examples_tab_shows_the_retrains_at_the_k_picked(chromium, tiny_app, tmp_path, monkeypatch):
    """Examples tab in Chromium: an example picked at K shows its finished retrain's tiles; another K of the
    radio (none retrained there) empties the strip; back at K, the tiles return."""
    import sys
    import time

    from abu_explorer.app import examples
    from abu_explorer.app.demo import LAUNCH
    from abu_explorer.app.service import ExplorerApp

    monkeypatch.setattr(examples, "GRID", "5%,10%")  # two Ks at the tiny model's N = 24: 1 and 2
    assert examples.grid_ks(len(tiny_app.explorer.dataset)) == [1, 2]
    app = ExplorerApp(tiny_app.explorer, tmp_path / "results", recipe=tiny_app.recipe)
    folder = tiny_app.explorer.root / "examples"
    assert not folder.exists()
    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({"queries": [{"prompt": "red apple", "seed": 3, "steps": 4}]}))
    demo = None
    try:
        examples.build(app, queries, folder, methods=["pixel"], progress=False)
        item, = examples.load(app)
        job = app.submit_counterfactual(app.query(item["source"]), "pixel", 2)
        t0 = time.time()
        while job.status in ("queued", "running") and time.time() - t0 < 300:
            time.sleep(0.2)
        assert job.status == "done", job.error
        sys.path.insert(0, str(ROOT))
        import app as app_module

        demo = app_module.build_demo(app)
        demo.queue(max_size=8)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                                **LAUNCH)
        seen = browser_check.examples_tab(url, [(2, 2), (1, 0), (2, 2)])
        print(json.dumps(seen, indent=1))
    finally:
        if demo is not None:
            demo.close()
        shutil.rmtree(folder, ignore_errors=True)
    first, other, back = seen["steps"]
    assert first["captions"][0].startswith("original") and first["captions"][1].startswith("-pixel K=2: dL")
    assert other["tiles"] == 0 and back["captions"] == first["captions"]
