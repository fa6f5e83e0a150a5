"""Tables that grow with N are built and read in blocks (or memory-mapped): built in blocks == built at once."""
import os

import numpy as np
import pytest
import torch

from abu_explorer import artifacts, data
from abu_explorer.model import training_cache


def test_training_cache_in_blocks_equals_one_pass(tiny_explorer, tmp_path, monkeypatch):
    # the backend encodes in batches of 4 here (256 / 512 in the embedded model): blocks that are multiples of
    # its batches give the one-pass numbers bit for bit; other blocks only agree to float rounding
    enc_img, enc_txt = tiny_explorer.encode_images, tiny_explorer.encode_text
    monkeypatch.setattr(tiny_explorer, "encode_images", lambda x: torch.cat([enc_img(b) for b in x.split(4)]))
    monkeypatch.setattr(tiny_explorer, "encode_text",
                        lambda c: torch.cat([enc_txt(c[i:i + 4]) for i in range(0, len(c), 4)]))
    whole = training_cache.build(tiny_explorer, 1024, 512, first_caption_only=True)
    blocks = training_cache.build(tiny_explorer, 8, 12, first_caption_only=True)
    assert torch.equal(whole.latents, blocks.latents) and torch.equal(whole.text_states, blocks.text_states)
    odd = training_cache.build(tiny_explorer, 5, 7, first_caption_only=True)
    for a, b in ((whole.latents, odd.latents), (whole.text_states, odd.text_states)):
        rel = float((a - b).abs().max() / a.abs().max())
        assert rel < 1e-4, rel  # float32 rounding of other batch shapes, not another computation
    # memory-mapped: the same numbers, read from the files, in the same (channels-last) layout
    key = {"model": "tiny", "data": tiny_explorer.dataset.content_hash}
    stored = training_cache.build(tiny_explorer, 8, 12, tmp_path, key, first_caption_only=True)
    assert torch.equal(whole.latents, stored.latents) and torch.equal(whole.text_states, stored.text_states)
    assert stored.latents.stride() == whole.latents.stride()
    lat = artifacts.load_npy(tmp_path / "latents.npy", mmap=True)
    assert isinstance(lat, np.memmap) and lat.shape == (len(tiny_explorer.dataset), 8, 8, 4)


def test_stored_training_cache_is_reused_until_its_key_changes(tiny_explorer, tmp_path, monkeypatch):
    key = {"model": "tiny", "data": tiny_explorer.dataset.content_hash}
    training_cache.build(tiny_explorer, 8, 8, tmp_path, key, first_caption_only=True)
    calls = []
    real = tiny_explorer.encode_images
    monkeypatch.setattr(tiny_explorer, "encode_images", lambda x: (calls.append(len(x)), real(x))[1])
    training_cache.build(tiny_explorer, 8, 8, tmp_path, key, first_caption_only=True)
    assert calls == []  # fresh: read, not encoded
    training_cache.build(tiny_explorer, 8, 8, tmp_path, {**key, "model": "other"}, first_caption_only=True)
    assert sum(calls) >= len(tiny_explorer.dataset)  # another model: encoded again
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_value_shift_in_blocks(tiny_explorer):
    from abu_explorer.attribution.abu import value_shift
    from abu_explorer.attribution.params import select

    sel = select(tiny_explorer.unet, "cross-attn")
    delta = torch.randn(sum(p.numel() for p in sel.values()), generator=torch.Generator().manual_seed(0))
    states = tiny_explorer.training_cache().text_states
    whole = value_shift(sel, delta, states, "cross-attn")
    blocks = value_shift(sel, delta, states, "cross-attn", block=5)
    assert torch.allclose(whole, blocks, rtol=1e-6, atol=0) and whole.abs().sum() > 0


def test_image_folder_is_rendered_to_disk_once(tmp_path, tiny_dataset):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        Image.fromarray(tiny_dataset.images[i]).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(tiny_dataset.captions[i])
    in_ram = data.load_image_folder(folder, 32)
    store = tmp_path / "store"
    mapped = data.load_image_folder(folder, 32, store=store, chunk=3)
    assert isinstance(mapped.images, np.memmap) and np.array_equal(np.asarray(mapped.images), in_ram.images)
    assert mapped.content_hash == in_ram.content_hash
    assert torch.equal(mapped.tensor([1, 4]), in_ram.as_tensor()[[1, 4]])
    assert [s for s, _ in mapped.batches(3)] == [0, 3, 6]
    first = (store / "images.npy").stat().st_mtime_ns
    data.load_image_folder(folder, 32, store=store)  # unchanged folder: the stored array is reused
    assert (store / "images.npy").stat().st_mtime_ns == first
    Image.fromarray(tiny_dataset.images[9]).save(folder / "03.png")  # an image changes: rendered again
    again = data.load_image_folder(folder, 32, store=store)
    assert np.array_equal(np.asarray(again.images[3]), tiny_dataset.images[9]) and again.content_hash != in_ram.content_hash


def test_content_hash_streams_in_chunks(tiny_dataset):
    assert data.content_hash(tiny_dataset.images, tiny_dataset.captions, chunk=5) == tiny_dataset.content_hash


def test_dtrak_kernel_in_blocks(tiny_explorer, tmp_path, monkeypatch):
    from abu_explorer.attribution import dtrak, query

    cfg = dtrak.DTrakConfig(num_timesteps=2, proj_dim=6)
    folder = dtrak.precompute(tiny_explorer, cfg, tmp_path / "dtrak", progress=False)
    q = query.from_generation(tiny_explorer, tiny_explorer.dataset.captions[0], seed=0, steps=5)
    method = dtrak.DTrak.load(tiny_explorer, folder)
    assert method.phi.dtype == torch.float16  # as stored (memory-mapped), made float32 a block at a time
    whole = method.score(q).scores
    monkeypatch.setattr(dtrak.DTrak, "BLOCK", 5)  # 24 rows in 5 blocks: the kernel and scores summed blockwise
    blocked = dtrak.DTrak.load(tiny_explorer, folder).score(q).scores
    assert torch.allclose(whole, blocked, rtol=1e-4, atol=1e-6) and whole.abs().sum() > 0


def test_nearest_features_in_blocks(tiny_explorer):
    from abu_explorer.attribution.nearest import PixelNN, featurize

    method = PixelNN(tiny_explorer)
    whole = method.embed(tiny_explorer.dataset.as_tensor()).numpy()
    assert np.array_equal(featurize(method.embed, tiny_explorer.dataset, block=5), whole)


def test_pixel_features_of_large_images_are_capped():
    from abu_explorer.attribution.nearest import PixelNN

    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert PixelNN.embed(PixelNN.__new__(PixelNN), x).shape == (2, 3 * 64 * 64)


def test_npy_writer_aborts_cleanly(tmp_path):
    with pytest.raises(RuntimeError):
        with artifacts.NpyWriter(tmp_path / "t.npy", (4, 2), np.float32) as w:
            w[0:2] = 1.0
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []
