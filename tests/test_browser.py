"""The launched app in a real headless Chromium (tiny model, loopback): generate, box, attribute, open a tile.

Needs /usr/bin/chromium (Debian's ``chromium`` package; .ci/run installs it) and the pinned ``playwright``.
"""
import importlib.util
import json
import os
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
