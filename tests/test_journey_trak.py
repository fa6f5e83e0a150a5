"""Journey-TRAK on the tiny model: the trajectory replays the query's own sampling, the query feature is the
mean of per-step loss gradients at each step's predicted clean latent, and the kernel is TRAK's."""
import pytest
import torch

from abu_explorer.attribution import dtrak, query as q, trak
from abu_explorer.attribution.ddpm_loss import item_noise
from abu_explorer.attribution.journey_trak import JourneyTrak
from abu_explorer.attribution.params import select


@pytest.fixture(scope="module")
def method(tiny_explorer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trak")
    trak.precompute(tiny_explorer, dtrak.DTrakConfig(num_timesteps=2, proj_dim=8, batch_size=6), folder,
                    progress=False)
    return JourneyTrak.load(tiny_explorer, folder)


def test_recording_the_trajectory_changes_nothing(tiny_explorer):
    record = []
    a = tiny_explorer.generate("red apple", seed=3, steps=4)
    b = tiny_explorer.generate("red apple", seed=3, steps=4, record=record)
    assert torch.equal(a.latent, b.latent) and len(record) == 4
    assert [t for t, _ in record] == sorted((t for t, _ in record), reverse=True)


def test_journey_matches_a_step_by_step_reference(tiny_explorer, method):
    query = q.from_generation(tiny_explorer, "red apple", seed=5, steps=4)
    ranking = method.score(query)
    assert ranking.method == "journey" and len(ranking.scores) == len(tiny_explorer.dataset)

    record = []
    tiny_explorer.generate("red apple", seed=5, steps=4, record=record)
    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    params = list(select(unet, "cross-attn").values())
    ctx = tiny_explorer.encode_text(["red apple"])
    total = 0
    for t, x0 in record:  # one step at a time, loss written out
        noise = item_noise(0, dtrak.QUERY_ROW, 0, t, tuple(x0.shape[1:]))[None]
        tt = torch.tensor([t])
        pred = unet(sched.add_noise(x0, noise, tt), tt, ctx).sample
        total = total + (pred - noise).pow(2).mean() / len(record)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    phi_q = dtrak.project(grad[None], 8, 0)[0]
    phi = method.phi.float()
    ref = phi @ torch.linalg.solve(phi.T @ phi, phi_q)
    assert torch.corrcoef(torch.stack([ranking.scores, ref]))[0, 1] > 0.999
    # it is not TRAK: the query gradient is taken along the trajectory, not at fresh noise on the final image
    plain = trak.Trak.load(tiny_explorer, method.folder).score(query)
    assert not torch.allclose(plain.scores, ranking.scores)


def test_journey_needs_a_generated_query(tiny_explorer, method):
    with pytest.raises(ValueError, match="has none"):
        method.score(q.from_training_image(tiny_explorer, 2))
    boxed = method.score(q.from_generation(tiny_explorer, "red apple", seed=5, steps=4, box=(0, 0, 16, 16)))
    assert torch.isfinite(boxed.scores).all() and "box" in boxed.notes
