"""Leave-K-out cells as Ray tasks, on a local Ray instance of 2 CPUs: the results equal the in-process run's."""
import json
import shutil

import ray
import torch

from abu_explorer.evaluation import counterfactual, ray_cells
from abu_explorer.evaluation import counterfactual_table as ce
from conftest import tiny_recipes

QUERIES = [{"prompt": "red apple", "seed": 1, "steps": 3}]


def _model_on_a_folder(tiny_model_dir, tiny_dataset, tmp_path):
    """The tiny model with its training set as an image folder, so that a worker can load both from paths."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(len(tiny_dataset)):
        tiny_dataset.image(i).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(tiny_dataset.captions[i])
    root = tmp_path / "precomputed"
    shutil.copytree(tiny_model_dir, root)
    record = json.loads((root / "dataset.json").read_text())
    record["folder"] = str(data)
    (root / "dataset.json").write_text(json.dumps(record))
    return root


def test_cells_as_ray_tasks_equal_the_in_process_run_and_are_not_run_twice(tiny_model_dir, tiny_dataset, tmp_path,
                                                                           monkeypatch):
    from abu_explorer.model.embedded import Explorer

    exp = Explorer.load(_model_on_a_folder(tiny_model_dir, tiny_dataset, tmp_path))
    assert exp.dataset.content_hash == tiny_dataset.content_hash
    recipe = tiny_recipes()[2]
    args = (exp, QUERIES, ["pixel", "random"], [3], 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the workers' (one thread per task)
    try:
        here = ce.run(*args, tmp_path / "here", None, progress=False, recipe=recipe, with_floor=False)
    finally:
        torch.set_num_threads(threads)
    ray_opts = {"threads": 1, "num_cpus": 2}
    there = ce.run(*args, tmp_path / "ray", None, progress=False, recipe=recipe, with_floor=False, ray=ray_opts)
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert here["done"] == there["done"] == 2
    fields = ("key", "method", "removed", "loss_original", "loss_counterfactual", "delta_loss", "delta_g_mse")
    by_key = {}
    for folder in (tmp_path / "here", tmp_path / "ray"):
        for path in sorted(folder.glob("*/*/result.json")):
            by_key.setdefault(path.parent.name, []).append(path)
    assert len(by_key) == 2 and all(len(paths) == 2 for paths in by_key.values())
    for a, b in by_key.values():
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert {f: ra[f] for f in fields} == {f: rb[f] for f in fields}
        assert (a.parent / "regenerated.png").read_bytes() == (b.parent / "regenerated.png").read_bytes()
        assert not (b.parent / "ckpt").exists() and not list(b.parent.glob(".*.tmp"))
    # resumable: a second call finds every cell filed and starts no task
    monkeypatch.setattr(ray_cells, "run_cell", lambda task: (_ for _ in ()).throw(AssertionError("ran again")))
    again = ce.run(*args, tmp_path / "ray", None, progress=False, recipe=recipe, with_floor=False, ray=ray_opts)
    assert again["done"] == 2


def test_a_filed_result_is_written_whole_and_never_replaced(tmp_path):
    payload = {"kind": "k", "key": "abc", "files": {"result.json": b"{}"}}
    out = ray_cells.store(tmp_path, payload)
    assert (out / "result.json").read_bytes() == b"{}"
    ray_cells.store(tmp_path, {**payload, "files": {"result.json": b"[]"}})  # a filed result is never replaced
    assert (out / "result.json").read_bytes() == b"{}"
    assert counterfactual.find_result(tmp_path, "abc") == out
