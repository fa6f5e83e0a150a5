"""AbU engine on the tiny model: parity with a plain reference, determinism, fast mode, bad input."""
import copy

import pytest
import torch

from abu_explorer.attribution import abu_precompute, query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.attribution.ddpm_loss import (eval_timesteps, item_noise, loss_table,
                                                reference_loss_table)
from abu_explorer.attribution.gradients import PerExampleGradients, random_draw
from abu_explorer.attribution.params import select

CFG = abu_precompute.AbUConfig(fisher_passes=2, num_timesteps=3, screen_candidates=8,
                               unlearn_samples=12, batch_size=16, alpha=0.05)
# the tables fix their own settings; the query-time ones are given when the method is loaded
QUERY_TIME = {k: v for k, v in CFG.to_dict().items() if k not in abu_precompute.TABLE_FIELDS}


@pytest.fixture(scope="module")
def tables_dir(tiny_explorer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("abu")
    abu_precompute.precompute(tiny_explorer, CFG, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_explorer, tables_dir):
    return AbU.load(tiny_explorer, tables_dir, **QUERY_TIME)


def test_loss_table_matches_loop_and_ignores_batch_size(tiny_explorer):
    cache = tiny_explorer.training_cache()
    ts = eval_timesteps(3)
    ref = reference_loss_table(tiny_explorer.unet, tiny_explorer.scheduler, cache.latents, cache.text_states, ts)
    for bs in (5, 64):
        fast = loss_table(tiny_explorer.unet, tiny_explorer.scheduler, cache.latents, cache.text_states, ts,
                          batch_size=bs)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-6)


def test_hooked_per_example_gradients_equal_a_loop(tiny_explorer):
    from abu_explorer.attribution.ddpm_loss import ddpm_losses

    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    cache = tiny_explorer.training_cache()
    rows = torch.arange(5)
    t = torch.tensor([10, 200, 400, 700, 990])
    noise = torch.randn(cache.latents[rows].shape, generator=torch.Generator().manual_seed(0))
    pex = PerExampleGradients(unet, "cross-attn")
    assert pex.hooked
    fn = lambda: ddpm_losses(unet, sched, cache.latents[rows], t, noise, cache.text_states[rows])  # noqa: E731
    hooked = pex(fn, 5)
    loop_pex = PerExampleGradients(unet, "cross-attn")
    loop_pex.hooked = False  # force the one-backward-per-example fallback
    looped = loop_pex(fn, 5)
    params = list(select(unet, "cross-attn").values())
    ref = []
    for b in range(5):
        loss = ddpm_losses(unet, sched, cache.latents[rows[b:b + 1]], t[b:b + 1], noise[b:b + 1],
                           cache.text_states[rows[b:b + 1]]).sum()
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    torch.testing.assert_close(hooked, torch.stack(ref), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(looped, hooked, rtol=1e-4, atol=1e-7)


def _reference_abu(explorer, cfg, query, fisher):
    """Plain AbU: loops and full forward passes only."""
    from abu_explorer.attribution.ddpm_loss import ddpm_losses

    unet, sched = explorer.unet, explorer.scheduler
    cache = explorer.training_cache()
    ctx = explorer.encode_text([query.prompt])
    params = select(unet, cfg.selection)
    grad = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(cfg.unlearn_samples):
        t, noise = random_draw(cfg.unlearn_seed, s, 0, tuple(query.latent.shape), 1000)
        loss = ddpm_losses(unet, sched, query.latent[None], torch.tensor([t]), noise[None], ctx, query.mask).sum()
        for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            grad[n] += g / cfg.unlearn_samples
    new = copy.deepcopy(unet)
    flat_f, i = fisher, 0
    with torch.no_grad():
        for n, p in new.named_parameters():
            if n in params:
                f = flat_f[i:i + p.numel()].view_as(p)
                p += cfg.alpha / len(cache.text_states) * grad[n] / f.clamp(min=1e-30)
                i += p.numel()
    ts = eval_timesteps(cfg.num_timesteps)
    before = reference_loss_table(unet, sched, cache.latents, cache.text_states, ts, cfg.noise_seed)
    after = reference_loss_table(new, sched, cache.latents, cache.text_states, ts, cfg.noise_seed)
    return (after - before).mean(dim=2).max(dim=1).values


def test_fisher_equals_mean_of_squared_single_example_gradients(tiny_explorer, engine):
    from abu_explorer.attribution.ddpm_loss import ddpm_losses

    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    cache = tiny_explorer.training_cache()
    params = list(select(unet, "cross-attn").values())
    acc = torch.zeros_like(engine.tables.fisher)
    n = len(cache.latents)
    for p in range(CFG.fisher_passes):
        for r in range(n):
            t, noise = random_draw(CFG.fisher_seed, p, r, tuple(cache.latents.shape[1:]), 1000)
            loss = ddpm_losses(unet, sched, cache.latents[r:r + 1], torch.tensor([t]), noise[None],
                               cache.text_states[r:r + 1]).sum()
            acc += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).pow(2)
    torch.testing.assert_close(engine.tables.fisher, acc / (CFG.fisher_passes * n), rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("box", [None, (4.0, 6.0, 21.5, 30.0)])
def test_exact_scores_equal_the_reference(tiny_explorer, engine, box):
    query = q.from_generation(tiny_explorer, "red apple", seed=1, steps=4, box=box)
    ranking = engine.score(query, mode="exact")
    ref = _reference_abu(tiny_explorer, CFG, query, engine.tables.fisher)
    torch.testing.assert_close(ranking.scores, ref, rtol=2e-3, atol=1e-7)
    assert set(ranking.phases) == {"unlearn", "scan"}


def test_same_query_same_ranking_and_batch_size_does_not_matter(tiny_explorer, tables_dir):
    query = q.from_training_image(tiny_explorer, 5)
    a = AbU.load(tiny_explorer, tables_dir, **QUERY_TIME).score(query, "exact")
    b = AbU.load(tiny_explorer, tables_dir, **QUERY_TIME).score(query, "exact")
    c = AbU.load(tiny_explorer, tables_dir, **{**QUERY_TIME, "batch_size": 7}).score(query, "exact")
    assert torch.equal(a.scores, b.scores)
    torch.testing.assert_close(a.scores, c.scores, rtol=1e-4, atol=1e-8)
    assert torch.equal(a.order[:5], c.order[:5])


def test_fast_mode_rescores_the_screened_candidates_exactly(tiny_explorer, engine):
    query = q.from_training_image(tiny_explorer, 3)
    fast = engine.score(query, "fast")
    exact = engine.score(query, "exact")
    rows = fast.exact_rows
    assert len(rows) == CFG.screen_candidates
    torch.testing.assert_close(fast.scores[rows], exact.scores[rows])
    others = torch.ones(len(fast.scores), dtype=torch.bool)
    others[rows] = False
    assert fast.scores[others].max() < fast.scores[rows].min()
    assert set(fast.phases) == {"unlearn", "screen", "rescore"}


def test_value_shift_screen_equals_a_direct_computation(tiny_explorer, engine):
    delta = torch.randn(engine.tables.fisher.shape, generator=torch.Generator().manual_seed(0))
    states = engine.cache.text_states
    expected = torch.zeros(len(states))
    from abu_explorer.attribution.params import unflatten

    for name, dw in unflatten(delta, engine.selected).items():
        if ".attn2.to_v." in name:
            for r in range(len(states)):
                expected[r] += (states[r] @ dw.T).pow(2).sum()
    torch.testing.assert_close(engine.screen(delta), expected, rtol=1e-4, atol=1e-6)


def test_item_noise_depends_only_on_its_key():
    a = item_noise(0, 5, 0, 150, (4, 8, 8))
    assert torch.equal(a, item_noise(0, 5, 0, 150, (4, 8, 8)))
    assert not torch.equal(a, item_noise(0, 5, 1, 150, (4, 8, 8)))
    assert not torch.equal(a, item_noise(0, 6, 0, 150, (4, 8, 8)))


@pytest.mark.parametrize("box,match", [((5, 5, 5, 9), "zero"), ((0, 0, 40, 10), "outside"),
                                       ((-1, 0, 4, 4), "outside"), ((9, 2, 3, 8), "zero")])
def test_box_errors(tiny_explorer, box, match):
    with pytest.raises(q.QueryError, match=match):
        q.from_training_image(tiny_explorer, 0, box=box)


def test_box_mask_weights_boundary_cells_by_coverage():
    m = q.box_mask((2, 0, 8, 4), image_size=32, latent_size=8)  # cells are 4x4 pixels
    assert m[0, 0] == pytest.approx(0.5) and m[0, 1] == pytest.approx(1.0) and m[1].sum() == 0


def test_bad_queries(tiny_explorer, tmp_path):
    with pytest.raises(q.QueryError, match="out of range"):
        q.from_training_image(tiny_explorer, 10_000)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(q.QueryError, match="cannot read"):
        q.from_image(tiny_explorer, str(bad), "red apple")


def test_mismatched_tables_fail_loudly(tiny_explorer, tables_dir, tmp_path):
    import json
    import shutil

    from abu_explorer.artifacts import ArtifactError

    broken = tmp_path / "abu"
    shutil.copytree(tables_dir, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["unet_hash"] = "0000"
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unet_hash.*precompute"):
        AbU.load(tiny_explorer, broken)
    with pytest.raises(ArtifactError, match="precompute"):
        AbU.load(tiny_explorer, tmp_path / "missing")


def test_tables_fix_their_settings_and_the_code_the_query_time_ones(tiny_explorer, tables_dir):
    plain = AbU.load(tiny_explorer, tables_dir)
    assert plain.cfg.table_settings() == CFG.table_settings()  # from the tables
    default = abu_precompute.AbUConfig()
    assert (plain.cfg.alpha, plain.cfg.unlearn_samples) == (default.alpha, default.unlearn_samples)  # from the code
    assert AbU.load(tiny_explorer, tables_dir, alpha=0.05).cfg.alpha == 0.05
    assert plain.settings() != AbU.load(tiny_explorer, tables_dir, alpha=0.05).settings()
