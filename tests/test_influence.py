"""EK-FAC influence functions: equal to a dense torch.func reference and to kronfluence's own scores."""
import json
import os

import numpy as np
import pytest
import torch

from abu_explorer.artifacts import ArtifactError
from abu_explorer.attribution import influence, query as q
from abu_explorer.attribution.ddpm_loss import eval_timesteps, item_noise
from abu_explorer.attribution.dtrak import QUERY_ROW
from abu_explorer.attribution.params import select


@pytest.fixture(scope="module")
def full_if(tiny_explorer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("if")
    cfg = influence.IFConfig(num_timesteps=2, batch_size=8, fit_draws=2)
    influence.precompute(tiny_explorer, cfg, folder, progress=False)
    return folder


def _pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_scores_equal_a_dense_torch_func_reference(tiny_explorer, full_if, tmp_path, monkeypatch):
    monkeypatch.setenv("ABU_GRADIENT_TABLES", str(tmp_path))
    # the tiny model's losses change little along v: a step of 2% of ||theta|| keeps float32 rounding small
    # (the embedded model's default 1% matches forward-mode AD at Pearson 0.9999996; README)
    method = influence.InfluenceFunctions.load(tiny_explorer, full_if, fd_step=2e-2, exact_scan="difference")
    query = q.from_generation(tiny_explorer, "red apple", seed=5, steps=3, box=(0, 0, 20, 24))
    ranking = method.score(query, "exact")
    table = influence.InfluenceFunctions.load(tiny_explorer, full_if)  # "auto": the tiny table fits
    assert table.cfg.exact_scan == "gradients" and table.settings() != method.settings()
    by_table = table.score(query, "exact")
    assert len(list(tmp_path.glob("*.npy"))) == 1

    # reference: torch.func gradients one example at a time, a dense (H + delta)^-1 per layer
    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    sel = select(unet, "cross-attn")
    names = list(sel)
    frozen = {n: p.detach() for n, p in unet.named_parameters() if n not in sel}
    ts = eval_timesteps(2)

    def loss(theta, latent, state, key, mask):
        total = 0
        for t in ts:
            noise = item_noise(0, key, 0, t, tuple(latent.shape))
            xt = sched.add_noise(latent[None], noise[None], torch.tensor([t]))
            pred = torch.func.functional_call(unet, {**frozen, **theta}, (xt, torch.tensor([t]), state[None])).sample
            err = (pred - noise[None]).pow(2)
            total = total + (err.mean() if mask is None else (err * mask).sum() / (mask.sum() * err.shape[1])) / len(ts)
        return total

    def flat_grad(latent, state, key, mask=None):
        g = torch.func.grad(loss)({n: sel[n].detach() for n in names}, latent, state, key, mask)
        return torch.cat([g[n].reshape(-1) for n in names]).double()

    factors = method.factors
    blocks = []
    for n in names:
        m = n.rsplit(".", 1)[0]
        qa, qs, lam = factors[f"{m}.qa"], factors[f"{m}.qs"], factors[f"{m}.lam"]
        k = torch.kron(qs, qa)  # row-major vec(G): vec(Qs^T G Qa) = kron(Qs, Qa)^T vec(G)
        blocks.append(k @ torch.diag(1 / (lam + 0.1 * lam.mean()).reshape(-1)) @ k.T)
    h_inv = torch.block_diag(*blocks)
    cache = tiny_explorer.training_cache()
    g_train = torch.stack([flat_grad(cache.latents[i], cache.text_states[i], i) for i in range(len(cache.latents))])
    ctx = tiny_explorer.encode_text(["red apple"])[0]
    g_q = flat_grad(query.latent, ctx, QUERY_ROW, query.mask)
    ref = g_train @ (h_inv @ g_q)
    assert _pearson(ranking.scores, ref) > 0.999
    # a central difference in float32: a few per cent of the largest score at most
    assert float((ranking.scores.double() - ref).abs().max()) < 0.05 * float(ref.abs().max())
    # the gradient table: the same directional derivatives up to float32 rounding
    assert float((by_table.scores.double() - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert "box" in ranking.notes

    # fast mode: the screened rows carry exactly the exact mode's scores, the rest rank below them
    fast = influence.InfluenceFunctions.load(tiny_explorer, full_if, fd_step=2e-2, screen_candidates=6,
                                             exact_scan="difference").score(query, "fast")
    rows = fast.exact_rows
    assert len(rows) == 6
    torch.testing.assert_close(fast.scores[rows], ranking.scores[rows])
    assert set(fast.order[:6].tolist()) == set(rows.tolist())


def test_scores_equal_kronfluence_pairwise_scores(tiny_explorer, tmp_path):
    """One timestep per example, so a kronfluence 'example' is exactly one of our training rows."""
    from kronfluence.analyzer import Analyzer, prepare_model

    cfg = influence.IFConfig(num_timesteps=1, batch_size=8, fit_draws=2)
    influence.precompute(tiny_explorer, cfg, tmp_path / "ours", progress=False)
    ours = influence.InfluenceFunctions.load(tiny_explorer, tmp_path / "ours")
    query = q.from_generation(tiny_explorer, "red apple", seed=5, steps=3)
    scores = ours.score(query, "exact").scores

    # kronfluence end to end: its own factors (same data, same seed) and its own pairwise scores
    import copy

    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    cache = tiny_explorer.training_cache()
    modules = influence.tracked_modules(unet, "cross-attn")
    (t,) = eval_timesteps(1)
    shape = tuple(cache.latents.shape[1:])
    n = len(cache.latents)
    train = influence._Items(cache.latents, cache.text_states, torch.full((n,), t),
                             torch.stack([item_noise(0, i, 0, t, shape) for i in range(n)]))
    qry = influence._Items(query.latent[None], tiny_explorer.encode_text(["red apple"]), torch.tensor([t]),
                           item_noise(0, QUERY_ROW, 0, t, shape)[None])
    task = influence._task(sched, modules)
    model = prepare_model(copy.deepcopy(unet), task)
    torch.manual_seed(cfg.fit_seed)
    analyzer = Analyzer("ref", model, task, cpu=True, output_dir=str(tmp_path / "kf"), disable_tqdm=True)
    rows = torch.tensor([r for _ in range(cfg.fit_draws) for r in range(n)])
    from abu_explorer.attribution.gradients import random_draw

    draws = [random_draw(cfg.fit_seed, d, r, shape, sched.config.num_train_timesteps)
             for d in range(cfg.fit_draws) for r in range(n)]
    fit = influence._Items(cache.latents[rows], cache.text_states[rows], torch.tensor([d[0] for d in draws]),
                           torch.stack([d[1] for d in draws]))
    from kronfluence.arguments import FactorArguments, ScoreArguments

    analyzer.fit_all_factors("f", fit, per_device_batch_size=cfg.batch_size, factor_args=FactorArguments(strategy="ekfac"))
    # damping None = kronfluence's heuristic (0.1 x mean eigenvalue), our default; its own default is 1e-8
    analyzer.compute_pairwise_scores("s", "f", qry, train, per_device_query_batch_size=1, per_device_train_batch_size=8,
                                     score_args=ScoreArguments(damping_factor=None))
    ref = analyzer.load_pairwise_scores("s")["all_modules"][0]
    # two EK-FAC fits of float32 factors: 0.9999+ at one thread, 0.99894 at two threads on an AMD EPYC
    assert _pearson(scores, ref) > 0.998
    assert float((scores - ref.float()).abs().max()) < 0.05 * float(ref.abs().max())


def test_mismatched_or_overridden_artifacts_fail_loudly(tiny_explorer, full_if, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(full_if, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["unet_hash"] = "0" * 16
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unet_hash.*precompute --method if"):
        influence.InfluenceFunctions.load(tiny_explorer, bad)
    with pytest.raises(ArtifactError, match="precompute --method if"):
        influence.InfluenceFunctions.load(tiny_explorer, tmp_path / "missing")
    with pytest.raises(ValueError, match="fit_draws are fixed.*rebuild"):
        influence.InfluenceFunctions.load(tiny_explorer, full_if, fit_draws=3)
    with pytest.raises(ValueError, match="mode"):
        influence.InfluenceFunctions.load(tiny_explorer, full_if).score(q.from_training_image(tiny_explorer, 0), "slow")


def test_gradient_table_is_built_once_and_matches_per_item_autograd(tiny_explorer, full_if, tmp_path, monkeypatch):
    from abu_explorer.attribution import gradient_table
    from abu_explorer.attribution.ddpm_loss import ddpm_losses

    # per-item gradients from one backward pass equal one autograd call per item
    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    cache = tiny_explorer.training_cache()
    modules = influence.tracked_modules(unet, "cross-attn")
    sel = select(unet, "cross-attn")
    ts = torch.tensor([100, 500, 900])
    x0, ctx = cache.latents[:3], cache.text_states[:3]
    noise = torch.stack([item_noise(0, i, 0, int(ts[i]), tuple(x0.shape[1:])) for i in range(3)])
    from abu_explorer.attribution.params import only_grad_for

    with only_grad_for(unet, sel):
        batch = gradient_table.item_gradients(unet, sched, x0, ts, noise, ctx, modules)
        for i in range(3):
            loss = ddpm_losses(unet, sched, x0[i:i + 1], ts[i:i + 1], noise[i:i + 1], ctx[i:i + 1]).sum()
            one = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(sel.values()))])
            torch.testing.assert_close(batch[i], one, rtol=1e-4, atol=1e-7)

    # built on the first exact query, read back (never rebuilt) by the next method object
    monkeypatch.setenv("ABU_GRADIENT_TABLES", str(tmp_path))
    query = q.from_generation(tiny_explorer, "banana", seed=1, steps=3)
    first = influence.InfluenceFunctions.load(tiny_explorer, full_if, exact_scan="gradients").score(query, "exact")
    monkeypatch.setattr(gradient_table, "_build", lambda *a, **k: pytest.fail("rebuilt the gradient table"))
    again = influence.InfluenceFunctions.load(tiny_explorer, full_if, exact_scan="gradients").score(query, "exact")
    assert torch.equal(first.scores, again.scores)
    with pytest.raises(ValueError, match="exact_scan must be one of"):
        influence.InfluenceFunctions.load(tiny_explorer, full_if, exact_scan="fast")


def test_directional_derivatives_read_slices_and_gathers_alike(tmp_path, monkeypatch):
    from abu_explorer.attribution import gradient_table

    rng = np.random.default_rng(0)
    path = tmp_path / "t.npy"
    np.save(path, rng.standard_normal((11, 2, 7)).astype(np.float32))
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    v = torch.from_numpy(rng.standard_normal(7).astype(np.float32))
    dense = torch.from_numpy(np.asarray(table, dtype=np.float64)) @ v.double()
    for rows in ([*range(11)], [3, 4, 5], [0, 2, 3, 10, 1], [7]):
        got = gradient_table.directional_derivatives(table, v, torch.tensor(rows), block=3)
        torch.testing.assert_close(got, dense[rows].float(), rtol=1e-6, atol=1e-7)
    # a benchmark's throwaway folder is used inside the block and the setting restored after it
    monkeypatch.setenv("ABU_GRADIENT_TABLES", "/before")
    with gradient_table.tables_in(tmp_path / "bench"):
        assert os.environ["ABU_GRADIENT_TABLES"] == str(tmp_path / "bench")
    assert os.environ["ABU_GRADIENT_TABLES"] == "/before"
