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


@pytest.mark.parametrize("flips", [True, False])
def test_stacked_equals_one_at_a_time(flips):
    lat, states, null, sched, cfg = _data(flips=flips)
    excludes = [{0, 5, 7}, {1, 2, 20}, {3, 4, 6}]
    states_stacked, log = train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, excludes)
    assert len(log["loss"]) == cfg.epochs and len(log["loss"][0]) == len(excludes)
    for exclude, got in zip(excludes, states_stacked):
        torch.manual_seed(cfg.seed)
        ref = models.build_unet(TINY_UNET)
        ref_log = train.train_unet(ref, sched, lat, states, null, cfg, exclude=exclude, progress=False)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert log["loss"][-1][-1] == pytest.approx(ref_log["loss"][-1], rel=1e-4)
    # different removals give different models
    assert not torch.allclose(states_stacked[0]["conv_in.weight"], states_stacked[1]["conv_in.weight"])


def test_stacked_needs_equal_removal_sizes():
    lat, states, null, sched, cfg = _data()
    with pytest.raises(ValueError, match="equal size"):
        train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, [{1}, {1, 2}])
    with pytest.raises(ValueError, match="outside"):
        train_unets_stacked(TINY_UNET, sched, lat, states, null, cfg, [{99}])
