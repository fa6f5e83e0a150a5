"""Remove and regenerate on the tiny model: runs, caches, and the removed rows are really left out."""
import pytest
import torch

from abu_explorer.evaluation import counterfactual
from abu_explorer.training import train
from abu_explorer.attribution import query as q
from conftest import tiny_recipes


def test_counterfactual_runs_caches_and_excludes(tiny_explorer, tmp_path, monkeypatch):
    recipe = tiny_recipes()[2]
    query = q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)
    seen = {}
    original = train.train_unet

    def spy(*args, exclude=frozenset(), **kwargs):
        seen["exclude"] = set(exclude)
        return original(*args, exclude=exclude, **kwargs)

    monkeypatch.setattr(train, "train_unet", spy)
    result = counterfactual.run(tiny_explorer, query, "pixel", 3, tmp_path, recipe=recipe, progress=False)
    assert len(result["removed"]) == 3 and seen["exclude"] == set(result["removed"])
    assert result["delta_loss"] == result["loss_counterfactual"] - result["loss_original"]
    assert 0 <= result["delta_g_mse"] and -1 <= result["delta_g_clip"] <= 1
    folder = counterfactual.result_dir(tmp_path, result["key"])
    assert folder.parent.name == result["trained_on"]["kind"]  # one folder per machine kind
    assert (folder / "regenerated.png").exists() and not (folder / "ckpt").exists()
    assert counterfactual.find_result(tmp_path, result["key"]) == folder
    seen.clear()
    again = counterfactual.run(tiny_explorer, query, "pixel", 3, tmp_path, recipe=recipe, progress=False)
    assert again == result and not seen  # cached: no retraining


def test_random_removal_depends_on_the_draw(tiny_explorer):
    import pytest

    query = q.from_training_image(tiny_explorer, 2)
    n = len(tiny_explorer.dataset)
    with pytest.raises(ValueError, match="at least one"):  # removing every image leaves nothing to train on
        counterfactual.removal(tiny_explorer, query, "random", n)
    assert len(counterfactual.removal(tiny_explorer, query, "random", n - 1)) == n - 1
    a = counterfactual.removal(tiny_explorer, query, "random", 5, draw=0)
    assert a == counterfactual.removal(tiny_explorer, query, "random", 5, draw=0)
    assert a != counterfactual.removal(tiny_explorer, query, "random", 5, draw=1)


def test_query_loss_is_deterministic(tiny_explorer):
    query = q.from_training_image(tiny_explorer, 4)
    ctx = tiny_explorer.encode_text([query.prompt])
    a = counterfactual.query_loss(tiny_explorer.unet, tiny_explorer.scheduler, query.latent, ctx)
    assert a == counterfactual.query_loss(tiny_explorer.unet, tiny_explorer.scheduler, query.latent, ctx)
    assert torch.isfinite(torch.tensor(a))


def test_removal_is_exact_and_its_settings_are_in_the_key(tiny_app):
    """Gradient methods remove their exact-mode top-K; a changed setting or table gives another key."""
    import dataclasses

    exp = tiny_app.explorer
    query = q.from_generation(exp, "red apple", seed=1, steps=3)
    recipe = tiny_recipes()[2]
    abu = tiny_app.method("abu")
    modes = []
    score = abu.score
    abu.score = lambda qu, mode="fast", progress=None: modes.append(mode) or score(qu, mode, progress)
    try:
        removed = counterfactual.removal(exp, query, "abu", 4, ranker=abu)
    finally:
        del abu.score
    assert modes == ["exact"] and removed == [i for i, _ in abu.score(query, "exact").top(4)]
    settings = counterfactual.removal_settings(exp, "abu", abu)
    assert settings["mode"] == "exact" and settings["config"]["alpha"] == abu.cfg.alpha and settings["tables"]
    key = counterfactual.request_key(exp, query, "abu", 4, 0, recipe, settings)
    other_alpha = dataclasses.replace(abu.cfg, alpha=abu.cfg.alpha * 2)
    moved = {**settings, "config": dataclasses.asdict(other_alpha)}
    assert counterfactual.request_key(exp, query, "abu", 4, 0, recipe, moved) != key
    # the serving batch size is not a setting of the ranking: the app's instance gives the evaluation's key
    assert counterfactual.removal_settings(exp, "abu", type(abu).load(exp, batch_size=7)) == settings
    infl = tiny_app.method("if")
    s_if = counterfactual.removal_settings(exp, "if", infl)
    damped = type(infl).load(exp, damping=0.5)
    assert counterfactual.removal_settings(exp, "if", damped)["config"]["damping"] == 0.5
    assert counterfactual.request_key(exp, query, "if", 4, 0, recipe, s_if) != counterfactual.request_key(
        exp, query, "if", 4, 0, recipe, counterfactual.removal_settings(exp, "if", damped))


def test_tables_hash_follows_the_files(tmp_path):
    from abu_explorer import artifacts

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.npy").write_bytes(b"one")
    h = artifacts.folder_hash(tmp_path / "t")
    (tmp_path / "t" / "a.npy").write_bytes(b"two")
    assert artifacts.folder_hash(tmp_path / "t") != h and artifacts.folder_hash(tmp_path / "missing") == ""


def test_floor_retrain_reproduces_the_weights_on_this_machine(tiny_explorer, tmp_path):
    """K = 0 with the shipped recipe and seed on the machine that trained the model: the same weights, dL 0."""
    recipe = tiny_recipes()[2]
    queries = [q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)]
    doc = counterfactual.floor(tiny_explorer, queries, tmp_path / "results", recipe, progress=False)
    assert doc["identical_to_shipped_weights"] and doc["k"] == 0
    (only,) = doc["queries"].values()
    assert only["delta_loss"] == 0.0
    more = queries + [q.from_training_image(tiny_explorer, 3)]
    again = counterfactual.floor(tiny_explorer, more, tmp_path / "results", recipe,
                                 progress=False)  # from the kept weights: no retrain
    assert len(again["queries"]) == 2 and again["train_seconds"] == doc["train_seconds"]


def test_a_floor_whose_weights_are_gone_is_retrained_and_must_reproduce(tiny_explorer, tmp_path):
    """The kept weights are not committed: a new query on a fresh checkout retrains the floor, and the queries
    filed before must come back bit for bit; a retrain that does not fails loudly and leaves the filed floor."""
    import json

    recipe = tiny_recipes()[2]
    queries = [q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)]
    doc = counterfactual.floor(tiny_explorer, queries, tmp_path, recipe, progress=False)
    out = counterfactual.floor_dir(tiny_explorer, tmp_path, doc["trained_on"]["kind"], recipe)
    (out / "unet.safetensors").unlink()
    more = queries + [q.from_training_image(tiny_explorer, 3)]
    again = counterfactual.floor(tiny_explorer, more, tmp_path, recipe, progress=False)  # retrained, reproduced
    assert len(again["queries"]) == 2 and (out / "unet.safetensors").exists()
    (out / "unet.safetensors").unlink()
    filed = json.loads((out / "result.json").read_text())
    first = next(iter(filed["queries"].values()))
    first["loss_full_retrain"] += 1e-7  # as if the floor had been trained on another kind of machine
    (out / "result.json").write_text(json.dumps(filed))
    with pytest.raises(ValueError, match="did not reproduce the filed floor"):
        counterfactual.floor(tiny_explorer, more + [q.from_training_image(tiny_explorer, 5)], tmp_path, recipe,
                             progress=False)
    assert json.loads((out / "result.json").read_text()) == filed  # nothing overwritten
    assert (out / "unet.not_reproduced.safetensors").exists() and not (out / "unet.safetensors").exists()


def test_a_floor_claimed_by_another_process_is_left_to_it(tiny_explorer, tmp_path):
    """Two runners start together: the one that finds the K = 0 retrain claimed does not retrain it too."""
    from abu_explorer import artifacts
    from abu_explorer.machine import kind

    recipe = tiny_recipes()[2]
    queries = [q.from_generation(tiny_explorer, "red apple", seed=1, steps=3)]
    key = counterfactual.request_key(tiny_explorer, None, counterfactual.FULL, 0, 0, recipe, {})
    filed = counterfactual.result_dir(tmp_path, key, kind()) / "result.json"
    with artifacts.claimed(filed) as held:
        assert held
        assert counterfactual.floor(tiny_explorer, queries, tmp_path, recipe, progress=False) is None
    assert not filed.exists() and not (filed.parent / "unet.safetensors").exists()
    assert counterfactual.floor(tiny_explorer, queries, tmp_path, recipe, progress=False)["k"] == 0


def test_concurrent_jobs_match_their_solo_results(tiny_explorer, tmp_path):
    """Two retrains and a generation at once, in threads, give byte for byte what each gives alone: no
    request path moves another's random draws."""
    from concurrent.futures import ThreadPoolExecutor

    recipe = tiny_recipes()[2]

    def retrain(exclude, name):
        unet, _ = counterfactual.retrain(tiny_explorer, exclude, recipe, tmp_path / name, progress=False)
        return {k: v.clone() for k, v in unet.state_dict().items()}

    def image():
        return tiny_explorer.generate("red apple", seed=3, steps=4).image.tobytes()

    solo = [retrain({1, 2}, "solo-a"), retrain({5}, "solo-b"), image()]
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(retrain, {1, 2}, "a"), pool.submit(retrain, {5}, "b"), pool.submit(image)]
        together = [j.result() for j in jobs]
    for alone, both in zip(solo[:2], together[:2]):
        assert all(torch.equal(alone[k], both[k]) for k in alone)
    assert solo[2] == together[2]
    assert not all(torch.equal(solo[0][k], solo[1][k]) for k in solo[0])  # the two jobs differ


def test_a_retrain_in_its_own_process_equals_one_in_this_process(tiny_explorer, tmp_path):
    """The app's retrains run in a child process with their own thread count: the same weights as a retrain in
    this process (to float rounding, as any two processes give), a cancel stops the child, the next call resumes
    from its checkpoint, and the child's error comes back in one line."""
    import dataclasses

    import pytest

    from abu_explorer.model import components
    from conftest import THREADS

    recipe = dataclasses.replace(tiny_recipes()[2], epochs=20)  # long enough that the cancel lands mid-run
    here, log_here = counterfactual.retrain(tiny_explorer, {1, 4}, recipe, tmp_path / "here", progress=False)
    other, _ = counterfactual.retrain(tiny_explorer, {2, 7}, recipe, tmp_path / "other", progress=False)
    seen = []

    def stop_after_first(epoch, log):
        seen.append(epoch)
        raise KeyboardInterrupt  # what a cancelled job raises from its progress callback

    with pytest.raises(KeyboardInterrupt):
        counterfactual.retrain(tiny_explorer, {1, 4}, recipe, tmp_path / "child", progress=False,
                               on_epoch_end=stop_after_first, threads=THREADS)
    assert seen == [1] and (tmp_path / "child" / "unet-ckpt.safetensors").exists()
    resumed = []
    child, log_child = counterfactual.retrain(tiny_explorer, {1, 4}, recipe, tmp_path / "child", progress=False,
                                              on_epoch_end=lambda e, lg: resumed.append(e), threads=THREADS)
    assert resumed[0] > 1 and resumed[-1] == recipe.epochs  # resumed, not restarted
    assert log_child["loss"] == pytest.approx(log_here["loss"], rel=1e-5)
    with components.seeded_global_rng(recipe.seed):
        init = components.build_unet(dict(tiny_explorer.unet.config)).state_dict()

    def dist(a, b):
        return sum((a[k] - b[k]).double().pow(2).sum() for k in a).sqrt().item()

    moved = dist(here.state_dict(), init)
    assert dist(child.state_dict(), here.state_dict()) < 1e-3 * moved  # seen: 9e-6 of the displacement
    assert dist(other.state_dict(), here.state_dict()) > 0.05 * moved  # another removal set: far apart
    with pytest.raises(RuntimeError, match="ValueError: exclude holds indices outside"):
        counterfactual.retrain(tiny_explorer, {10**6}, recipe, tmp_path / "bad", progress=False, threads=1)
