import json

import numpy as np
import pytest

from abu_explorer import artifacts, data
from conftest import PRECOMPUTED


def test_names_follow_cldr_style():
    assert data.emoji_name([0x1F34E]) == "red apple"
    assert data.emoji_name([0x1F1E7, 0x1F1F7]) == "flag: brazil"
    assert data.emoji_name([0x1F44D, 0x1F3FD]) == "thumbs up: medium skin tone"
    assert data.emoji_name([0x0023, 0xFE0F, 0x20E3]) == "keycap: #"
    assert data.emoji_name([0xE000]) is None  # OpenMoji's private-use extras have no name


def test_dataset_is_deterministic_and_matches_the_shipped_record(full_dataset):
    record = json.loads((PRECOMPUTED / "dataset.json").read_text())
    assert len(full_dataset) == record["num_images"]
    assert full_dataset.content_hash == record["content_hash"]
    assert full_dataset.images.shape[1:] == (32, 32, 3) and full_dataset.images.dtype == np.uint8
    assert len(set(full_dataset.captions)) == len(full_dataset)  # captions are unique row keys too
    assert not any("skin tone" in c for c in full_dataset.captions)  # default drops the variants
    glyphs = data.list_glyphs(full_dataset.config)
    assert [g[1] for g in glyphs] == full_dataset.captions


def test_cache_is_checked_against_its_hash(tmp_path, monkeypatch, full_dataset):
    folder = tmp_path / "ds"
    folder.mkdir()
    artifacts.save_npy(folder / "images.npy", full_dataset.images[:4])
    artifacts.save_json(folder / "meta.json", {"config": full_dataset.config.to_dict(),
                                                     "captions": full_dataset.captions[:4],
                                                     "codes": full_dataset.codes[:4], "content_hash": "0" * 16})
    with pytest.raises(artifacts.ArtifactError, match="content hash"):
        data.load_dataset_dir(folder)


def test_image_folder_loader(tmp_path):
    from PIL import Image

    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("A Red Square\n")
    ds = data.load_image_folder(tmp_path)
    assert len(ds) == 1 and ds.captions == ["a red square"] and ds.images.shape == (1, 32, 32, 3)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="missing caption"):
        data.load_image_folder(tmp_path)
