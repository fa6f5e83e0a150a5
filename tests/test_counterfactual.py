"""Remove and regenerate on the tiny model: runs, caches, and the removed rows are really left out."""
import torch

from abu_explorer.evaluation import counterfactual
from abu_explorer.training import train
from abu_explorer.attribution import query as q
from conftest import tiny_recipes


def test_counterfactual_runs_caches_and_excludes(tiny_explorer, tmp_path, monkeypatch):
    recipe = tiny_recipes()[2]
    query = q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)
    seen = {}
    original = train.train_unet

    def spy(*args, exclude=frozenset(), **kwargs):
        seen["exclude"] = set(exclude)
        return original(*args, exclude=exclude, **kwargs)

    monkeypatch.setattr(train, "train_unet", spy)
    result = counterfactual.run(tiny_explorer, query, "pixel", 3, tmp_path, recipe=recipe, progress=False)
    assert len(result["removed"]) == 3 and seen["exclude"] == set(result["removed"])
    assert result["delta_loss"] == result["loss_counterfactual"] - result["loss_original"]
    assert 0 <= result["delta_g_mse"] and -1 <= result["delta_g_clip"] <= 1
    assert (tmp_path / result["key"] / "regenerated.png").exists()
    assert not (tmp_path / result["key"] / "ckpt").exists()
    seen.clear()
    again = counterfactual.run(tiny_explorer, query, "pixel", 3, tmp_path, recipe=recipe, progress=False)
    assert again == result and not seen  # cached: no retraining


def test_random_removal_depends_on_the_draw(tiny_explorer):
    query = q.from_training_image(tiny_explorer, 2)
    a = counterfactual.removal(tiny_explorer, query, "random", 5, draw=0)
    assert a == counterfactual.removal(tiny_explorer, query, "random", 5, draw=0)
    assert a != counterfactual.removal(tiny_explorer, query, "random", 5, draw=1)


def test_query_loss_is_deterministic(tiny_explorer):
    query = q.from_training_image(tiny_explorer, 4)
    ctx = tiny_explorer.encode_text([query.prompt])
    a = counterfactual.query_loss(tiny_explorer.unet, tiny_explorer.scheduler, query.latent, ctx)
    assert a == counterfactual.query_loss(tiny_explorer.unet, tiny_explorer.scheduler, query.latent, ctx)
    assert torch.isfinite(torch.tensor(a))
