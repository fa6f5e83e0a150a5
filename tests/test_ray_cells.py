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


def test_a_device_is_checked_before_any_work(tiny_model_dir, tiny_dataset, tmp_path, capsys, monkeypatch):
    """--device cuda where there is none (or a device that does not exist) is one line, before any retrain."""
    import pytest

    from abu_explorer import cli
    from abu_explorer.machine import use_device
    from abu_explorer.model.embedded import Explorer

    tiny_explorer = Explorer.load(_model_on_a_folder(tiny_model_dir, tiny_dataset, tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        use_device("cuda")
    with pytest.raises(ValueError, match="cpu or cuda"):
        use_device("tpu")
    assert use_device("cpu").type == "cpu"
    q = tmp_path / "q.json"
    q.write_text(json.dumps(QUERIES))
    capsys.readouterr()
    code = cli.main(["evaluate", "counterfactual", "--queries", str(q), "--methods", "pixel", "--k", "3",
                     "--device", "cuda", "--precomputed", str(tiny_explorer.root), "--results", str(tmp_path / "r"),
                     "--assets", "", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no CUDA device" in err
    assert not list((tmp_path / "r").rglob("result.json"))
    # a CPU cell is filed under the CPU kind whatever the call's default was
    recipe = tiny_recipes()[2]
    query = ce.build_queries(tiny_explorer, QUERIES)[0]
    r = counterfactual.run(tiny_explorer, query, "random", 2, tmp_path / "c", recipe, progress=False, device="cpu")
    assert r["trained_on"]["kind"] == counterfactual.machine_kind("cpu")
    assert (tmp_path / "c" / r["trained_on"]["kind"] / r["key"] / "result.json").exists()


def test_lds_subset_models_as_ray_tasks_equal_the_in_process_run(tiny_model_dir, tiny_dataset, tmp_path,
                                                                  monkeypatch):
    from abu_explorer.evaluation import lds_table
    from abu_explorer.model.embedded import Explorer

    exp = Explorer.load(_model_on_a_folder(tiny_model_dir, tiny_dataset, tmp_path))
    queries = [{"prompt": exp.dataset.captions[i], "seed": i, "steps": 3} for i in (2, 9)]
    recipe = tiny_recipes()[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' arithmetic
    try:
        here = lds_table.run(exp, queries, ["pixel"], 2, tmp_path / "here", None, recipe, progress=False)
    finally:
        torch.set_num_threads(threads)
    ray_opts = {"threads": 1, "num_cpus": 2}
    there = lds_table.run(exp, queries, ["pixel"], 2, tmp_path / "ray", None, recipe, progress=False, ray=ray_opts)
    assert not ray.is_initialized() and here["subsets_done"] == there["subsets_done"] == 2
    for j in range(2):
        a, b = (json.loads(next((tmp_path / w).glob(f"*/*/subset_{j:03d}.json")).read_text()) for w in ("here", "ray"))
        assert a["losses"] == b["losses"] and a["rows_sha256"] == b["rows_sha256"]
    assert not list((tmp_path / "ray").glob("*/*/ckpt/subset_*"))
    monkeypatch.setattr(ray_cells, "run_subset", lambda task: (_ for _ in ()).throw(AssertionError("ran again")))
    assert lds_table.run(exp, queries, ["pixel"], 2, tmp_path / "ray", None, recipe, progress=False,
                         ray=ray_opts)["subsets_done"] == 2


def test_a_worker_holds_the_cells_claim_and_waits_for_another_holder(tmp_path, monkeypatch):
    """A Ray worker takes the claim an in-process runner takes: it waits while another holds it, and ``--status``
    sees its cell as running while it retrains."""
    import threading

    from abu_explorer import artifacts, model
    from abu_explorer.machine import kind as machine_kind

    task = ray_cells.CellTask("unused", QUERIES[0], "pixel", 3, 0, {}, str(tmp_path), 1, "k1")
    out = counterfactual.result_dir(tmp_path, "k1", machine_kind("cpu"))
    seen = []

    def fake_run(*args, **kwargs):  # the retrain: records whether the claim is held, files a result
        seen.append(artifacts.held(out / "result.json"))
        artifacts.save_json(out / "result.json", {"key": "k1", "trained_on": {"kind": machine_kind("cpu")}})
        return {"key": "k1", "trained_on": {"kind": machine_kind("cpu")}}

    monkeypatch.setattr(model, "load", lambda path: None)
    monkeypatch.setattr(ce, "build_queries", lambda explorer, queries: [None])
    monkeypatch.setattr(ce.train, "StageConfig", lambda **kw: None)
    monkeypatch.setattr(counterfactual, "run", fake_run)
    done = {}
    threads = torch.get_num_threads()

    def in_worker():  # a Ray worker is its own process; here the thread sets back the count run_cell set
        try:
            done.update(ray_cells.run_cell(task))
        finally:
            torch.set_num_threads(threads)

    with artifacts.claimed(out / "result.json") as mine:  # another runner retrains this cell
        assert mine
        worker = threading.Thread(target=in_worker)
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not seen  # waiting, not retraining the same cell
    worker.join(timeout=30)
    assert seen == [True] and done["key"] == "k1" and set(done["files"]) == {"result.json"}
