"""Customized models (Custom Diffusion deltas on a base model) and the benchmark with a known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from abu_explorer.evaluation.stats import average_precision, recall_at_k


def test_recall_and_average_precision_by_hand():
    scores = [0.9, 0.1, 0.8, 0.3, 0.5]  # ranking: rows 0, 2, 4, 3, 1
    assert recall_at_k(scores, [2], 1) == 0.0
    assert recall_at_k(scores, [2], 2) == 1.0
    assert recall_at_k(scores, [2, 1], 4) == 0.5
    assert average_precision(scores, [0]) == 1.0
    assert average_precision(scores, [2, 1]) == pytest.approx((1 / 2 + 2 / 5) / 2)  # ranks 2 and 5
    assert average_precision(scores, [0, 2]) == 1.0
    # ties: the lower row first (stable), so a tied positive behind row 0 sits at rank 2
    assert average_precision([1.0, 1.0, 0.0], [1]) == 0.5
    assert recall_at_k([1.0, 1.0, 0.0], [1], 1) == 0.0


def test_added_token_is_read_whole(tiny_explorer):
    tok = tiny_explorer.tokenizer.with_token("<new1>")
    word = tok.vocab[4]
    ids = tok.encode(f"<new1> {word}")
    assert ids[1] == len(tok) - 1 and ids[2] == tok.index[word]
    assert tok.unknown_words("<new1> qqqq") == ["qqqq"]
    assert tiny_explorer.tokenizer.unknown_words("<new1>") == ["<", "new1", ">"]  # the base does not know it
    again = type(tok).from_dict(tok.to_dict())
    assert again.encode(f"<new1> {word}") == ids
    with pytest.raises(ValueError, match="already"):
        tok.with_token("<new1>")


def _concept(explorer):
    return {"id": "t0", "kind": "family", "codes": ["E062", "E063"], "split": "test",
            "word": explorer.tokenizer.vocab[4]}


def _kv(explorer):
    from abu_explorer.model.customized import kv_weights

    return {n: p.detach().clone() for n, p in kv_weights(explorer.unet).items()}


def test_customized_model_is_a_delta_on_the_base(tiny_app, tmp_path):
    from abu_explorer import artifacts
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.model import customized
    from abu_explorer.training.custom_diffusion import CustomConfig

    base = tiny_app.explorer
    before = _kv(base)
    cfg = CustomConfig(steps=4, batch_size=2)
    m = cz.model_for(base, _concept(base), tmp_path / "a", cfg)
    assert all(torch.equal(before[n], p) for n, p in _kv(base).items())  # the base is untouched
    n = len(base.dataset)
    assert m.exemplars == [n, n + 1] and len(m.dataset) == n + 2
    assert m.dataset.captions[n] == f"<new1> {_concept(base)['word']}"
    prov, base_prov = m.provenance(), base.provenance()
    assert all(prov[k] != base_prov[k] for k in ("unet_hash", "clip_hash", "data_hash"))
    assert prov["autoencoder_hash"] == base_prov["autoencoder_hash"]
    assert any(not torch.equal(before[k], v) for k, v in _kv(m).items())  # the K/V weights moved
    # deterministic: the same concept and settings elsewhere give the same delta, bit for bit
    m2 = cz.model_for(base, _concept(base), tmp_path / "b", cfg)
    d1 = artifacts.load_safetensors(tmp_path / "a" / "t0" / customized.DELTA)
    d2 = artifacts.load_safetensors(tmp_path / "b" / "t0" / customized.DELTA)
    assert artifacts.state_hash(d1) == artifacts.state_hash(d2) and m2.provenance() == prov
    # reloaded from its folder (spec matches): nothing retrained; another recipe retrains
    stamp = (tmp_path / "a" / "t0" / customized.DELTA).stat().st_mtime_ns
    assert cz.model_for(base, _concept(base), tmp_path / "a", cfg).provenance() == prov
    assert (tmp_path / "a" / "t0" / customized.DELTA).stat().st_mtime_ns == stamp
    with pytest.raises(artifacts.ArtifactError, match="another concept, base or recipe"):
        cz.model_for(base, _concept(base), tmp_path / "a", CustomConfig(steps=5, batch_size=2))  # never overwritten
    other = cz.model_for(base, _concept(base), tmp_path / "c", CustomConfig(steps=5, batch_size=2))
    assert other.provenance()["unet_hash"] != prov["unet_hash"]
    # it generates with its token, deterministically
    g1, g2 = m.generate(f"<new1> {_concept(base)['word']}", seed=0, steps=4), m.generate(
        f"<new1> {_concept(base)['word']}", seed=0, steps=4)
    assert g1.unknown_words == [] and np.array_equal(np.asarray(g1.image), np.asarray(g2.image))


def test_customized_from_another_base_fails_loudly(tiny_app, tmp_path):
    from abu_explorer import artifacts
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.model import customized
    from abu_explorer.training.custom_diffusion import CustomConfig

    base = tiny_app.explorer
    cz.model_for(base, _concept(base), tmp_path, CustomConfig(steps=2, batch_size=2))
    spec = artifacts.load_json(tmp_path / "t0" / customized.SPEC)
    artifacts.save_json(tmp_path / "t0" / customized.SPEC, {**spec, "base_provenance": {"unet_hash": "x"}})
    with pytest.raises(artifacts.ArtifactError, match="another base"):
        customized.CustomizedExplorer.load(tmp_path / "t0", base=base)


def test_every_method_finds_or_misses_the_exemplars_on_a_tiny_customized_model(tiny_app, tmp_path, monkeypatch):
    from abu_explorer import artifacts
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.training.custom_diffusion import CustomConfig

    base = tiny_app.explorer
    monkeypatch.setattr(cz, "CUSTOM_ABU", {"alpha": 0.1, "unlearn_steps": 3, "unlearn_samples": 8})
    methods = ["abu", "abuplus", "if", "dtrak", "pixel", "clip", "random"]
    cfg = CustomConfig(steps=4, batch_size=2)
    monkeypatch.setenv("ABU_GRADIENT_TABLES", str(tmp_path / "tables"))
    docs = cz.run_concept(base, _concept(base), methods, tmp_path / "work", tmp_path / "res", cfg=cfg)
    assert len(docs) == len(methods) * len(cz.PROMPTS)
    assert (tmp_path / "tables").is_dir() and not list((tmp_path / "tables").iterdir())  # IF's table not kept
    n = len(base.dataset)
    for d in docs:
        assert d["exemplars"] == [n, n + 1]
        ranks = d["exemplar_ranks"]
        assert d["recall_at_10"] == sum(r <= 10 for r in ranks) / 2
        assert d["ap"] == pytest.approx(np.mean([i / r for i, r in enumerate(sorted(ranks), 1)]))
        assert d["settings"]["mode"] == ("exact" if d["method"] in ("abu", "abuplus", "if") else "")
    abu = next(d for d in docs if d["method"] == "abu")
    assert abu["settings"]["config"]["unlearn_steps"] == 3 and abu["settings"]["config"]["alpha"] == 0.1
    # resumed: every result is read back, none recomputed
    monkeypatch.setattr(cz, "query_result", lambda *a, **k: pytest.fail("recomputed a stored result"))
    again = cz.run_concept(base, _concept(base), methods, tmp_path / "work", tmp_path / "res", cfg=cfg)
    assert again == docs
    assert len(list((tmp_path / "res").glob("t0-p*.json"))) == len(docs)
    assert artifacts.load_json(next((tmp_path / "work" / "t0" / "abu").glob("meta.json")))["fisher_of"] \
        == base.provenance()


def test_committed_concepts_follow_the_written_rule(full_dataset):
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.evaluation import customized_concepts as cc

    committed = cz.load_concepts()
    rule = cc.select(np.asarray(full_dataset.images))
    assert [{k: c[k] for k in ("id", "kind", "codes", "split")} for c in committed] == rule
    cc.check_unseen(committed, full_dataset.images)
    assert len(committed) >= 20
    assert sum(c["split"] == "tune" for c in committed) >= 5
    assert {c["kind"] for c in committed if c["split"] == "test"} == {"single", "family"}


def test_remove_and_recustomize(tiny_app, tmp_path):
    from abu_explorer.evaluation import customized as cz
    from abu_explorer.training.custom_diffusion import CustomConfig

    base = tiny_app.explorer
    cfg = CustomConfig(steps=4, batch_size=2)
    concept = _concept(base)
    prompt = cz.prompts(concept)[0]
    n = len(base.dataset)
    # removing only base rows re-runs the same fine-tune: the same model, the same image, dL = 0 exactly
    same = cz.recustomize(base, concept, tmp_path, [0, 3], prompt, cfg=cfg)
    assert same["removed"] == [] and same["ignored"] == [0, 3] and same["kept_exemplars"] == 2
    assert same["delta_loss"] == 0.0 and same["delta_g_mse"] == 0.0
    one = cz.recustomize(base, concept, tmp_path, [n + 1, 5], prompt, cfg=cfg)
    assert one["removed"] == [n + 1] and one["kept_exemplars"] == 1 and one["delta_loss"] != 0.0
    none = cz.recustomize(base, concept, tmp_path, [n, n + 1], prompt, cfg=cfg)
    assert none["kept_exemplars"] == 0 and np.isfinite(none["delta_loss"]) and none["delta_g_mse"] > 0
    assert cz.recustomize(base, concept, tmp_path, [n + 1, 5], prompt, cfg=cfg) == one  # cached
