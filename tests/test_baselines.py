"""Nearest-neighbour and random baselines: faiss equals brute force, same interface as AbU."""
import pytest
import torch
import torch.nn.functional as F

from abu_explorer.attribution import METHODS, get_method, query as q
from abu_explorer.attribution.nearest import query_pixels


@pytest.mark.parametrize("name", ["pixel", "clip"])
def test_faiss_topk_equals_brute_force_cosine(tiny_explorer, name):
    method = get_method(name).load(tiny_explorer)
    query = q.from_generation(tiny_explorer, "red apple", seed=2, steps=3)
    ranking = method.score(query)
    train = method.embed(tiny_explorer.dataset.as_tensor())
    brute = train @ method.embed(query_pixels(tiny_explorer, query))[0]
    torch.testing.assert_close(ranking.scores, brute, rtol=1e-5, atol=1e-6)
    assert ranking.order[:5].tolist() == torch.sort(-brute, stable=True).indices[:5].tolist()


@pytest.mark.parametrize("name,worst", [("pixel", 1), ("clip", 3)])
def test_a_training_image_is_near_its_own_reconstruction(shipped_explorer, name, worst):
    # the query is the autoencoder's reconstruction of "red apple", not its pixels: CLIP places the red
    # balloon first and the apple second (measured), pixels find the apple itself
    method = get_method(name).load(shipped_explorer)
    ranking = method.score(q.from_training_image(shipped_explorer, 423))
    assert 423 in ranking.order[:worst].tolist()


def test_box_embeds_the_crop(tiny_explorer):
    query = q.from_generation(tiny_explorer, "red apple", seed=2, steps=3)
    boxed = q.with_box(query, (0, 0, 16, 16))
    full = query_pixels(tiny_explorer, query)
    crop = query_pixels(tiny_explorer, boxed)
    assert crop.shape == full.shape
    torch.testing.assert_close(crop, F.interpolate(full[:, :, :16, :16], size=(32, 32), mode="bilinear",
                                                   align_corners=False))
    ranking = get_method("clip").load(tiny_explorer).score(boxed)
    assert "crop" in ranking.notes


def test_random_is_seeded_by_the_query(tiny_explorer):
    method = get_method("random").load(tiny_explorer)
    a = q.from_training_image(tiny_explorer, 1)
    b = q.from_training_image(tiny_explorer, 2)
    assert torch.equal(method.score(a).scores, method.score(a).scores)
    assert not torch.equal(method.score(a).scores, method.score(b).scores)


def test_registry_lists_every_method():
    get_method("abu")
    assert {"abu", "pixel", "clip", "random"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dino")
