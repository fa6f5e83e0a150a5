"""The shipped model in precomputed/: loads, fits together, generates deterministically, CLI works."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_shipped_model_generates_deterministically(shipped_explorer):
    a = shipped_explorer.generate("red apple", seed=0, steps=20)
    b = shipped_explorer.generate("red apple", seed=0, steps=20)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    px = np.asarray(a.image, dtype=float)
    assert px.std() > 10  # not a flat image


def test_shipped_weights_come_from_the_code_recipes(shipped_explorer):
    """Leave-K-out retrains re-run ``UNET_RECIPE``: it must be the recipe that made the shipped weights."""
    from abu_explorer.training import train

    for part, recipe in (("autoencoder", train.AE_RECIPE), ("clip", train.CLIP_RECIPE), ("unet", train.UNET_RECIPE)):
        assert train.StageConfig(**shipped_explorer.meta[part]["recipe"]) == recipe, part
    ae = shipped_explorer.meta["autoencoder"]
    assert train.StageConfig(**ae["decoder_recipe"]) == train.AE_DECODER_RECIPE
    assert ae["decoder_log"]["heldout_psnr_db"] >= 28.0  # the shipped autoencoder's held-out PSNR


def test_shipped_dataset_matches(shipped_explorer):
    assert shipped_explorer.dataset.content_hash == shipped_explorer.meta["dataset"]["content_hash"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "abu_explorer", *args], cwd=ROOT, capture_output=True, text=True)


def test_generate_cli_is_byte_identical_and_upscales(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        r = _cli("generate", "--prompt", "red apple", "--seed", "0", "--steps", "10", "--size", "128", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "wrote" in r.stdout and " s" in r.stdout
        assert "initialized randomly" not in r.stderr  # open_clip's note before our own weights load
    assert a.read_bytes() == b.read_bytes()
    from PIL import Image

    assert Image.open(a).size == (128, 128)


def test_generate_cli_bad_input_exits_2_without_traceback(tmp_path):
    for args, msg in [(["--prompt", ""], "empty"), (["--prompt", "x", "--seed", "-3"], "seed"),
                      (["--prompt", "x", "--steps", "0"], "steps"),
                      (["--prompt", "x", "--precomputed", str(tmp_path / "nope")], "train"),
                      (["--prompt", "x", "--model", str(tmp_path / "nope")], "--precomputed DIR")]:
        r = _cli("generate", *args, "--out", str(tmp_path / "x.png"))
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_shipped_abu_ranks_a_training_query_itself_first(shipped_explorer):
    from abu_explorer.attribution import query
    from abu_explorer.attribution.abu import AbU

    engine = AbU.load(shipped_explorer)
    ranking = engine.score(query.from_training_image(shipped_explorer, 423), mode="fast")
    assert int(ranking.order[0]) == 423  # "red apple" unlearned -> the red apple is forgotten most
    assert set(ranking.phases) == {"unlearn", "screen", "rescore"}


def test_attribute_cli_writes_the_documented_json(tmp_path):
    import json

    out = tmp_path / "r.json"
    r = _cli("attribute", "--train-index", "660", "--k", "5", "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert {"query", "method", "mode", "num_train", "seconds", "results"} <= set(doc)
    assert doc["method"] == "abu" and doc["mode"] == "fast" and doc["num_train"] == 2015
    assert [x["rank"] for x in doc["results"]] == [1, 2, 3, 4, 5]
    assert {"rank", "index", "caption", "score"} <= set(doc["results"][0])
    assert "cat face" in r.stdout


def test_attribute_cli_bad_input(tmp_path):
    for args, msg in [(["--train-index", "1", "--k", "0"], "--k"), (["--train-index", "1", "--k", "99999"], "exceeds"),
                      (["--train-index", "1", "--method", "nope"], "unknown method"),
                      (["--train-index", "1", "--box", "3", "3", "3", "9"], "zero"),
                      (["--train-index", "1", "--box", "0", "0", "64", "9"], "outside"),
                      (["--train-index", "99999"], "out of range"),
                      (["--image", str(tmp_path / "missing.png"), "--caption", "x"], "cannot read"),
                      (["--train-index", "1", "--mode", "slow"], "mode")]:
        out = tmp_path / "o.json"
        r = _cli("attribute", *args, "--json", str(out))
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists()


def test_train_refuses_to_replace_a_model_without_force(tmp_path, capsys):
    from abu_explorer import cli

    out = tmp_path / "model"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "weights").write_text("mine")
    assert cli.main(["train", "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--only", "unet", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "unet" / "weights").read_text() == "mine"
    with pytest.raises(SystemExit):  # --out has no default: the shipped model is never the implicit target
        cli.parser().parse_args(["train"])


def test_shipped_examples_were_made_with_the_current_settings(shipped_explorer, tmp_path):
    """The Examples tab shows precomputed rankings: each must come from the method's current settings and tables."""
    from abu_explorer.app import examples
    from abu_explorer.app.service import ExplorerApp

    app = ExplorerApp(shipped_explorer, tmp_path / "results")
    items = examples.load(app)
    assert items, "no shipped examples; build them with: python -m abu_explorer examples"
    old = [(it["name"], m) for it in items for m in it["rankings"] if examples.stale(app, it, m)]
    assert not old, f"examples made with other settings {old}; rebuild: python -m abu_explorer examples"
