"""Every bad input, on every surface (Python API, command line, app), gets one readable line and loses nothing.

``ROWS`` is the table docs/app.md shows (``python tests/test_bad_inputs.py`` prints it); each row is run here
on the tiny model, the CLI rows in-process on the shipped model.
"""
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = {"type": "generated", "prompt": "red apple", "seed": 3, "steps": 4, "guidance": 3.0}


def _gen(**change):
    return {**GEN, **change}


def _api_generate(ctx, **kw):
    args = {"prompt": "red apple", "seed": 0, "steps": 4, **kw}
    ctx.exp.generate(args["prompt"], args["seed"], args["steps"], args.get("guidance"))


def _api_box(ctx, box):
    from abu_explorer.attribution import query as q

    q.from_generation(ctx.exp, "red apple", 1, 3, None, box)


def _api_truncated_table(ctx):
    from abu_explorer import artifacts

    path = ctx.tmp / "fisher.safetensors"
    artifacts.save_safetensors(path, {"x": __import__("torch").zeros(100)})
    path.write_bytes(path.read_bytes()[:40])
    artifacts.load_safetensors(path, "python -m abu_explorer precompute")


def _api_corrupt_folder(ctx):
    from abu_explorer import data

    folder = ctx.tmp / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png at all")
    (folder / "a.txt").write_text("a thing")
    data.load_image_folder(folder)


def _api_other_model_tables(ctx):
    import json
    import shutil

    from abu_explorer.attribution import spec

    root = ctx.tmp / "model"
    shutil.copytree(ctx.exp.root, root)
    meta = json.loads((root / "abu" / "meta.json").read_text())
    meta["unet_hash"] = "0" * 16
    (root / "abu" / "meta.json").write_text(json.dumps(meta))
    spec("abu").load(ctx.exp, folder=root / "abu")


def _cli(ctx, *argv):
    from abu_explorer import cli

    code = cli.main(list(argv))
    err = ctx.capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    raise ValueError(err)  # the message, for the row's check


def _upload(ctx, image):
    ctx.app.query({"type": "upload", "image": image, "caption": "red apple"})


def _big_file(ctx):
    path = ctx.tmp / "big.png"
    path.write_bytes(b"\x89PNG" + b"0" * (11 * 2**20))
    return str(path)


def _text_file(ctx):
    path = ctx.tmp / "notes.png"
    path.write_text("this is text")
    return str(path)


def _retrain_over_cap(ctx):
    from abu_explorer.app.jobs import JobQueue
    from abu_explorer.app.service import ExplorerApp

    app = ExplorerApp(ctx.exp, ctx.tmp / "results", recipe=ctx.app.recipe)
    app.jobs = JobQueue(per_client=1, total=4)
    app.request_counterfactual(app.query(GEN), "pixel", 2, owner="visitor")


def _model_busy(ctx):
    """One request holds the UNet and one waits: a third finds the waiting room (of one) full."""
    import threading

    from abu_explorer.app.service import ExplorerApp

    app = ExplorerApp(ctx.exp, ctx.tmp / "results", recipe=ctx.app.recipe, max_waiting=1)
    held, release = threading.Event(), threading.Event()

    def holder():
        with app.lock.request():
            held.set()
            release.wait(30)
    threads = [threading.Thread(target=holder), threading.Thread(target=lambda: app.generate("cat", 1, 2, 3.0))]
    threads[0].start()
    held.wait(30)
    threads[1].start()
    while app.lock.waiting < 1:
        threading.Event().wait(0.01)
    try:
        app.generate("red apple", 0, 2, 3.0)
    finally:
        release.set()
        for t in threads:
            t.join(60)


def _giant_image():
    from PIL import Image

    return Image.new("RGB", (5000, 4000))


# (surface, input, what the one line says, how to cause it)
ROWS = [
    ("API", "empty prompt", "the prompt is empty", lambda c: _api_generate(c, prompt="  ")),
    ("API", "prompt over the context (40 words)", "at most", lambda c: _api_generate(c, prompt="apple " * 40)),
    ("API", "prompt of 2,000 characters", "at most 1000 are read", lambda c: _api_generate(c, prompt="a" * 2000)),
    ("API", "control characters in the prompt", "control characters", lambda c: _api_generate(c, prompt="red\x00apple")),
    ("API", "negative seed", "seed must be >= 0", lambda c: _api_generate(c, seed=-1)),
    ("API", "0 sampling steps", "steps must be in [1, 1000]", lambda c: _api_generate(c, steps=0)),
    ("API", "guidance 99", "guidance must be in [0, 50]", lambda c: _api_generate(c, guidance=99.0)),
    ("API", "box of zero area", "zero or negative area", lambda c: _api_box(c, (4, 4, 4, 10))),
    ("API", "box outside the image", "outside the 32x32 image", lambda c: _api_box(c, (0, 0, 40, 40))),
    ("API", "unknown method", "unknown method 'dinosaur'", lambda c: __import__("abu_explorer.attribution", fromlist=["spec"]).spec("dinosaur")),
    ("API", "AbU alpha = inf", "alpha must be a finite number > 0", lambda c: c.app.method("abu").load(c.exp, alpha=math.inf)),
    ("API", "IF damping = nan", "damping must be a finite number", lambda c: c.app.method("if").load(c.exp, damping=math.nan)),
    ("API", "leave-K-out with K = N", "needs at least one of the", lambda c: __import__(
        "abu_explorer.evaluation.counterfactual", fromlist=["removal"]).removal(
        c.exp, c.app.query(GEN), "random", len(c.exp.dataset))),
    ("API", "missing model folder", "build it with: python -m abu_explorer train",
     lambda c: type(c.exp).load(c.tmp / "nope")),
    ("API", "truncated safetensors table", "corrupt artifact", _api_truncated_table),
    ("API", "a data folder with a corrupt image", "not a readable image", _api_corrupt_folder),
    ("API", "tables of another model", "does not match the loaded model", _api_other_model_tables),
    ("CLI", "generate --prompt ''", "the prompt is empty", lambda c: _cli(c, "generate", "--prompt", "", "--out",
                                                                         str(c.tmp / "x.png"))),
    ("CLI", "attribute --alpha inf", "alpha must be a finite number > 0", lambda c: _cli(
        c, "attribute", "--prompt", "red apple", "--steps", "2", "--alpha", "inf")),
    ("CLI", "attribute --k 0", "--k must be >= 1", lambda c: _cli(c, "attribute", "--prompt", "red apple", "--k", "0")),
    ("CLI", "counterfactual --k N", "needs at least one of the", lambda c: _cli(
        c, "counterfactual", "--prompt", "red apple", "--steps", "2", "--method", "random", "--k", "2015",
        "--results", str(c.tmp / "cf"))),
    ("CLI", "train --out a non-empty folder", "pass --force", lambda c: _cli(c, "train", "--out", str(ROOT / "precomputed"))),
    ("app", "upload of a text file", "cannot read the uploaded file as an image", lambda c: _upload(c, _text_file(c))),
    ("app", "upload over 10 MB", "over 10 MB", lambda c: _upload(c, _big_file(c))),
    ("app", "upload of 5000x4000 pixels", "pixel limit", lambda c: _upload(c, _giant_image())),
    ("app", "upload without a caption", "give the uploaded image a caption",
     lambda c: c.app.query({"type": "upload", "image": _text_file(c), "caption": " "})),
    ("app", "box with three numbers", "needs all four", lambda c: c.app.query(GEN, (1, 2, 3, None))),
    ("app", "box of zero area", "zero or negative area", lambda c: c.app.query(GEN, (4, 4, 4, 10))),
    ("app", "K = 51 for a ranking", "K must be", lambda c: c.app.attribute(c.app.query(GEN), "clip", 51)),
    ("app", "unknown method", "unknown method 'dinosaur'", lambda c: c.app.attribute(c.app.query(GEN), "dinosaur", 5)),
    ("app", "a method whose checkpoint was not given", "needs ABU_DINO_MODEL", lambda c: c.app.attribute(c.app.query(GEN), "dino", 5)),
    ("app", "mode 'slow'", "mode must be fast or exact", lambda c: c.app.attribute(c.app.query(GEN), "abu", 5, "slow")),
    ("app", "prompt with control characters", "control characters", lambda c: c.app.generate("red\x01apple", 0, 4, 3.0)),
    ("app", "a second retrain request over the per-visitor cap", "per visitor", _retrain_over_cap),
    ("app", "a request while the model's waiting room is full", "the server is busy", _model_busy),
]


def markdown() -> str:
    lines = ["| surface | input | the one line says |", "|---|---|---|"]
    lines += [f"| {surface} | {what} | {message} |" for surface, what, message, _ in ROWS]
    return "\n".join(lines)


class Ctx:
    def __init__(self, app, tmp, capsys):
        self.app, self.exp, self.tmp, self.capsys = app, app.explorer, tmp, capsys


@pytest.mark.parametrize("surface,what,message,cause", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_gets_one_line(tiny_app, tmp_path, capsys, surface, what, message, cause):
    from abu_explorer.artifacts import ArtifactError

    with pytest.raises((ValueError, ArtifactError)) as caught:  # the project's error types
        cause(Ctx(tiny_app, tmp_path, capsys))
    text = str(caught.value)
    assert message in text, text
    assert text.strip().count("\n") == 0, text  # one line


def test_docs_list_the_table():
    doc = (ROOT / "docs" / "app.md").read_text()
    start, end = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"
    assert start in doc and end in doc, f"docs/app.md needs the table between {start} and {end}"
    assert doc.split(start)[1].split(end)[0].strip() == markdown(), "regenerate: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
