"""The source reference of the leave-K-out table: a K = 1 cell that removes only the training image whose caption
is the query's prompt, so that each method's dL can be set against what that one image carries."""
import json

import pytest

from abu_explorer.evaluation import counterfactual, counterfactual_table as ce
from conftest import tiny_recipes


def test_the_source_cells_come_last_at_k_1_whatever_the_tables_ks():
    cells = ce.plan(2, ["abu", "source", "random"], [17, 68], draws=2)
    assert [(c.method, c.k, c.query) for c in cells[-2:]] == [("source", 1, 0), ("source", 1, 1)]
    assert sum(c.method == "source" for c in cells) == 2 and len(cells) == 2 * 2 * (1 + 2) + 2


def test_the_source_reference_removes_the_captioned_image_and_is_set_against_each_method(tiny_explorer, tmp_path):
    captions = tiny_explorer.dataset.captions
    prompt = captions[5]
    queries = [{"prompt": prompt, "seed": 1, "steps": 3}]
    with pytest.raises(ValueError, match="needs K = 1 and a prompt that is a training caption"):
        ce.run(tiny_explorer, [{"prompt": "no such caption at all", "seed": 1, "steps": 3}], ["source"], [2], 1,
               tmp_path / "r", None, progress=False, with_floor=False)
    assert not (tmp_path / "r").exists()  # stopped before any work
    with pytest.raises(ValueError, match="needs K = 1"):
        counterfactual.source_row(tiny_explorer, prompt, 2)
    out = ce.run(tiny_explorer, queries, ["pixel", "source"], [2], 1, tmp_path / "r", tmp_path / "a",
                 progress=False, recipe=tiny_recipes()[2], with_floor=False)
    source = next(c for c in out["report"]["cells"] if c["method"] == "source")
    filed = next(r for r in (tmp_path / "r").rglob("result.json") if source["key"] in str(r))
    assert source["k"] == 1 and json.loads(filed.read_text())["removed"] == [captions.index(prompt)]
    rows = {r["method"]: r for r in out["report"]["rows"]}
    assert rows["source"]["k"] == 1 and rows["source"]["delta_loss"][0] == source["delta_loss"]
    pair = next(c for c in out["report"]["between"] if c["b"] == "source")
    pixel = next(c for c in out["report"]["cells"] if c["method"] == "pixel")
    assert (pair["a"], pair["k"], pair["k_b"]) == ("pixel", 2, 1)
    assert pair["mean_difference"] == pytest.approx(pixel["delta_loss"] - source["delta_loss"])
    from PIL import Image

    strip = Image.open(tmp_path / "a" / f"counterfactual_strip_{ce.slug(prompt)}.png")
    w, h = Image.open(filed.parent / "regenerated.png").size
    tile = (w * 5 + 6, h * 5 + 3 * 13 + 4 + 6)  # sheet.grid at scale 5, 3 caption lines, pad 6
    assert strip.size == (3 * tile[0] + 6, tile[1] + 6)  # one row (K = 2): original, the reference, pixel
    ref = strip.crop((6 + tile[0], 6, 6 + tile[0] + w * 5, 6 + h * 5)).resize((w, h), Image.Resampling.NEAREST)
    assert list(ref.getdata()) == list(Image.open(filed.parent / "regenerated.png").convert("RGB").getdata())
    text = (tmp_path / "a" / "counterfactual_table.md").read_text()
    assert "| the source image alone (a reference: reads the query's provenance) | 1 (" in text
    assert "| pixel | the source image alone (a reference: reads the query's provenance) (K = 1) | 2 | 1 |" in text
