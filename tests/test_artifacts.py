"""Writes are atomic: an interrupted writer leaves the old file whole and no temporary file behind."""
import pytest

from abu_explorer import artifacts


@pytest.mark.parametrize("kind", ["json", "png", "figure", "npy"])
def test_an_interrupted_write_keeps_the_old_file(tmp_path, kind, monkeypatch):
    import numpy as np
    from PIL import Image

    path = tmp_path / f"out.{kind}"
    writers = {"json": lambda: artifacts.save_json(path, {"a": 1}),
               "png": lambda: artifacts.save_png(path, Image.new("RGB", (8, 8), "red")),
               "npy": lambda: artifacts.save_npy(path, np.arange(10)),
               "figure": lambda: artifacts.save_figure(path, _figure())}
    writers[kind]()
    before = path.read_bytes()

    real = artifacts.os.fsync

    def interrupted(fd):  # the bytes are written, the rename has not happened: a crash here
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writers[kind]()
    monkeypatch.setattr(artifacts.os, "fsync", real)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_generate_never_replaces_a_file_without_force(tmp_path, capsys):
    from abu_explorer import cli

    out = tmp_path / "mine.png"
    out.write_bytes(b"keep me")
    assert cli.main(["generate", "--prompt", "red apple", "--steps", "2", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli.main(["generate", "--prompt", "red apple", "--steps", "2", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
