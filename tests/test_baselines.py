"""Nearest-neighbour and random baselines: faiss equals brute force, same interface as AbU."""
import pytest
import torch
import torch.nn.functional as F

from abu_explorer.attribution import METHODS, get_method, names, query as q, spec
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
    assert names() == [m.name for m in METHODS] and {"abu", "if", "dtrak", "pixel", "clip", "random"} <= set(names())
    for m in METHODS:
        assert m.load_class().name == m.name  # each class answers to its registry name
        assert bool(m.tables) == (m.name in ("abu", "if", "dtrak", "trak"))
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dinosaur")


def test_docs_method_table_is_the_registry():
    """docs/methods.md shows the registry as ``python -m abu_explorer methods --markdown`` prints it."""
    from conftest import ROOT

    from abu_explorer.attribution import registry

    doc = (ROOT / "docs" / "methods.md").read_text()
    start, end = "<!-- methods-table:start -->\n", "\n<!-- methods-table:end -->"
    assert start in doc and end in doc, "docs/methods.md lost its generated-table markers"
    assert doc.split(start, 1)[1].split(end, 1)[0] == registry.markdown_table(), \
        "docs/methods.md is stale; paste the output of: python -m abu_explorer methods --markdown"


@pytest.mark.parametrize("name", ["dtrak", "trak"])
def test_dtrak_and_trak_match_a_plain_reference(tiny_explorer, tmp_path, name):
    """D-TRAK's output is ||eps_theta||^2, TRAK's the DDPM loss ||eps - eps_theta||^2; the rest is shared."""
    from abu_explorer.attribution import dtrak
    from abu_explorer.attribution.ddpm_loss import eval_timesteps, item_noise
    from abu_explorer.attribution.params import select

    cfg = dtrak.DTrakConfig(num_timesteps=2, proj_dim=8, batch_size=6)
    spec(name).precompute(tiny_explorer, cfg, tmp_path, progress=False)
    method = spec(name).load_class().load(tiny_explorer, tmp_path)
    assert method.cfg.output == ("loss" if name == "trak" else "square")
    query = q.from_generation(tiny_explorer, "red apple", seed=5, steps=3, box=(0, 0, 20, 24))
    ranking = method.score(query)

    unet, sched = tiny_explorer.unet, tiny_explorer.scheduler
    params = list(select(unet, "cross-attn").values())
    cache = tiny_explorer.training_cache()
    ts = eval_timesteps(2)

    def grad(latent, state, key, mask=None):
        total = 0
        for t in ts:
            noise = item_noise(0, key, 0, t, tuple(latent.shape))
            xt = sched.add_noise(latent[None], noise[None], torch.tensor([t]))
            pred = unet(xt, torch.tensor([t]), state[None]).sample
            out = (pred - noise[None] if name == "trak" else pred).pow(2)
            f = out.mean() if mask is None else (out * mask).sum() / (mask.sum() * out.shape[1])
            total = total + f / len(ts)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])

    phi = dtrak.project(torch.stack([grad(cache.latents[i], cache.text_states[i], i)
                                     for i in range(len(cache.latents))]), 8, 0)
    ctx = tiny_explorer.encode_text(["red apple"])[0]
    phi_q = dtrak.project(grad(query.latent, ctx, dtrak.QUERY_ROW, query.mask)[None], 8, 0)[0]
    ref = phi @ torch.linalg.solve(phi.T @ phi, phi_q)
    # stored features are fp16: compare by correlation, as the parity bar does
    assert torch.corrcoef(torch.stack([ranking.scores, ref]))[0, 1] > 0.999
    with pytest.raises(ValueError, match="singular"):
        dtrak.DTrak(tiny_explorer, dtrak.DTrakConfig(proj_dim=64), torch.randn(24, 64))


def test_clip_nn_takes_any_open_clip_model_by_name_and_safetensors_path(tiny_explorer, tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    from conftest import TINY_CLIP

    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    torch.manual_seed(7)
    reference = open_clip.create_model("tiny-test-clip", pretrained=None).eval()
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(ckpt))
    method = get_method("clip").load(tiny_explorer, model_name="tiny-test-clip", pretrained=str(ckpt))
    x = tiny_explorer.dataset.as_tensor()[:3]
    with torch.no_grad():
        expected = reference.encode_image(((x + 1) / 2 - method.external[2]) / method.external[3], normalize=True)
    torch.testing.assert_close(method.embed(x), expected)  # 32 px model: no resize, only the normalisation
    ranking = method.score(q.from_generation(tiny_explorer, "red apple", seed=2, steps=3))
    assert len(ranking.scores) == len(tiny_explorer.dataset)
    with pytest.raises(ValueError, match="safetensors"):
        get_method("clip").load(tiny_explorer, model_name="tiny-test-clip", pretrained=str(tmp_path / "x.pt"))


def test_the_kept_projection_matrix_gives_the_products_of_a_fresh_draw_bit_for_bit(monkeypatch):
    from abu_explorer.attribution import dtrak

    vectors = torch.randn(3, 20_000)
    monkeypatch.setenv("ABU_PROJECTION_CACHE_MB", "0")  # nothing fits: drawn chunk by chunk every call
    drawn = dtrak.project(vectors, 16, 7)
    assert not any(k[0] == 20_000 for k in dtrak._PROJECTION)
    monkeypatch.setenv("ABU_PROJECTION_CACHE_MB", "64")
    kept = dtrak.project(vectors, 16, 7)  # builds and keeps the chunks
    assert (20_000, 16, 7, 8192) in dtrak._PROJECTION
    again = dtrak.project(vectors, 16, 7)  # reads them
    assert torch.equal(drawn, kept) and torch.equal(kept, again)
    assert not torch.equal(dtrak.project(vectors, 16, 8), kept)  # another seed, another matrix
    assert len(dtrak._PROJECTION) == 1  # only the last matrix is kept
