"""Lockstep training of several leave-K-out UNets equals training each one alone (to float rounding)."""
import pytest
import torch

from abu_explorer.model import components as models
from abu_explorer.training import train
from abu_explorer.training.stacked import train_unets_stacked
from conftest import TINY_UNET


def _data(n=21, flips=True):
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(n, 2, 4, 8, 8, generator=g) if flips else torch.randn(n, 4, 8, 8, generator=g)
    states = torch.randn(n, 16, 16, generator=g)
    cfg = train.StageConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, max_grad_norm=0.05,
                            extra=train.UNET_RECIPE.extra)  # a small max norm: clipping acts on every step
    return lat, states, torch.zeros(1, 16, 16), models.build_scheduler(models.model_config("scheduler")), cfg


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).double().pow(2).sum() for k in a).sqrt())


@pytest.mark.parametrize("flips", [True, False])
def test_stacked_equals_one_at_a_time(flips):
    """Compared as a whole, relative to how far training moved the weights: AdamW's first steps are about
    lr * sign(gradient), so an element whose gradient is rounding-sized may flip by 2 lr under another kernel
    (seen at 2 threads), while the models as a whole agree to ~1e-5; another removal set differs by ~0.9."""
    lat, states, null, sched, cfg = _data(flips=flips)
    excludes = [{0, 5, 7}, {1, 2, 20}, {3, 4, 6}]
    states_stacked, log = train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, excludes)
    assert len(log["loss"]) == cfg.epochs and len(log["loss"][0]) == len(excludes)
    torch.manual_seed(cfg.seed)
    init = models.build_unet(TINY_UNET).state_dict()
    refs = []
    for exclude, got in zip(excludes, states_stacked):
        torch.manual_seed(cfg.seed)
        ref = models.build_unet(TINY_UNET)
        ref_log = train.train_unet(ref, sched, lat, states, null, cfg, exclude=exclude, progress=False)
        refs.append(ref.state_dict())
        assert set(got) == set(refs[-1])
        assert _distance(got, refs[-1]) < 1e-3 * _distance(refs[-1], init)
    assert log["loss"][-1][-1] == pytest.approx(ref_log["loss"][-1], rel=1e-4)
    # the measure tells removal sets apart: different removals give models far apart
    assert _distance(refs[0], refs[1]) > 0.1 * _distance(refs[0], init)
    assert _distance(states_stacked[0], states_stacked[1]) > 0.1 * _distance(refs[0], init)


def test_stacked_needs_equal_removal_sizes():
    lat, states, null, sched, cfg = _data()
    with pytest.raises(ValueError, match="equal size"):
        train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, [{1}, {1, 2}])
    with pytest.raises(ValueError, match="outside"):
        train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, [{99}])
