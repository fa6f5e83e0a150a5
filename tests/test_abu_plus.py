"""AbU+ on the tiny model: with a diagonal EK-FAC equal to AbU's Fisher it is AbU, score for score; with the
fitted factors it is a different step; its key follows its settings and both tables it reads."""
import pytest
import torch

from abu_explorer import artifacts
from abu_explorer.attribution import abu_precompute, influence, query as q
from abu_explorer.attribution.abu import AbU
from abu_explorer.attribution.abu_plus import AbUPlus

CFG = abu_precompute.AbUConfig(fisher_passes=2, num_timesteps=3, screen_candidates=8, unlearn_samples=12,
                               batch_size=16, alpha=0.05)
QUERY_TIME = {k: v for k, v in CFG.to_dict().items() if k not in abu_precompute.TABLE_FIELDS}


@pytest.fixture(scope="module")
def folders(tiny_explorer, tmp_path_factory):
    root = tmp_path_factory.mktemp("abuplus")
    abu_precompute.precompute(tiny_explorer, CFG, root / "abu", progress=False)
    influence.precompute(tiny_explorer, influence.IFConfig(num_timesteps=2, batch_size=8, fit_draws=1),
                         root / "if", progress=False)
    return root


@pytest.fixture(scope="module")
def query(tiny_explorer):
    return q.from_generation(tiny_explorer, tiny_explorer.dataset.captions[1], seed=0, steps=4)


def _diagonal_factors(method: AbUPlus, fisher: torch.Tensor) -> dict:
    """EK-FAC factors whose curvature is exactly diag(fisher): identity eigenbases, Lambda = F per layer."""
    out, i = {}, 0
    for m, (o, n) in zip(method.modules, method.shapes):
        out[f"{m}.qa"] = torch.eye(n, dtype=torch.float64)
        out[f"{m}.qs"] = torch.eye(o, dtype=torch.float64)
        out[f"{m}.lam"] = fisher[i:i + o * n].double().view(o, n)
        i += o * n
    return out


def test_diagonal_curvature_reproduces_abu(tiny_explorer, folders, query):
    abu = AbU.load(tiny_explorer, folders / "abu", **QUERY_TIME)
    plus = AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", **{**QUERY_TIME, "damping": 0.0})
    plus.factors = _diagonal_factors(plus, abu.tables.fisher)
    torch.testing.assert_close(plus.unlearn(query), abu.unlearn(query), rtol=1e-5, atol=1e-9)
    for mode in ("fast", "exact"):
        a, b = abu.score(query, mode), plus.score(query, mode)
        assert b.method == "abuplus" and a.method == "abu"
        assert torch.equal(a.order, b.order)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-7)


def test_fitted_factors_give_another_step(tiny_explorer, folders, query):
    abu = AbU.load(tiny_explorer, folders / "abu", **QUERY_TIME)
    plus = AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", **QUERY_TIME)
    a, b = abu.unlearn(query), plus.unlearn(query)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert b.norm() > 0 and cos < 0.999, cos
    # the same seed and settings give the same ranking
    assert torch.equal(plus.score(query, "exact").scores, plus.score(query, "exact").scores)


def test_settings_key_follows_settings_and_both_tables(tiny_explorer, folders, tmp_path):
    import shutil

    base = AbUPlus.load(tiny_explorer, folders / "abu", folders / "if").settings()
    assert "fisher_damping" not in base["config"] and base["config"]["damping"] is None
    assert AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", damping=1e-3).settings() != base
    assert AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", alpha=0.2).settings() != base
    other_if = tmp_path / "if"
    shutil.copytree(folders / "if", other_if)
    meta = artifacts.load_json(other_if / "meta.json")
    meta["seconds"] = {"fit_factors": -1.0}  # any change of the factors' folder is a new key
    artifacts.save_json(other_if / "meta.json", meta)
    assert AbUPlus.load(tiny_explorer, folders / "abu", other_if).settings()["tables"] != base["tables"]


def test_bad_settings_and_missing_factors_answer_in_one_line(tiny_explorer, folders, tmp_path):
    with pytest.raises(ValueError, match="damping must be a finite number"):
        AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", damping=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", alpha=float("inf"))
    with pytest.raises(ValueError, match="fixed by the precomputed tables"):
        AbUPlus.load(tiny_explorer, folders / "abu", folders / "if", num_timesteps=5)
    with pytest.raises(artifacts.ArtifactError, match="precompute --method if"):
        AbUPlus.load(tiny_explorer, folders / "abu", tmp_path / "nowhere")
