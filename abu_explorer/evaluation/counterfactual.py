"""Remove and regenerate: retrain the UNet without a method's top-K images, regenerate, measure.

The retrained stage is the whole UNet from scratch with the recipe and seed of the shipped weights
(autoencoder and CLIP stay fixed, as pretrained parts do in the paper). Metrics, as in the paper's
Table 1: dL = the query's DDPM loss under the leave-K-out model minus under the original (timesteps at
stride 5, fixed noise); dG-MSE = pixel MSE between the original and the regenerated image (same noise,
sampler and prompt); dG-CLIP = CLIP cosine similarity between them (lower = more changed).
Removal rankings are exact wherever a method has a fast mode. A result is cached under
``RESULTS/<machine kind>/<key>/``, the key holding the model hashes, query, method, K, random draw, recipe
and the removal settings (mode, method settings, a hash of its tables), and is never recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts
from abu_explorer.attribution.ddpm_loss import ddpm_losses, item_noise
from abu_explorer.machine import kind as machine_kind
from abu_explorer.machine import machine
from abu_explorer.model import components
from abu_explorer.training import train

QUERY_KEY = 2**41  # noise key of the counterfactual loss (no training row has it)
FULL = "full"  # the K = 0 cell: retrained on every row (the arithmetic floor)
SOURCE = "source"  # a reference cell, K = 1: only the training image whose caption is the query's prompt
UNRANKED = ("random", SOURCE, FULL)  # removals by a rule fixed in code: no method, no settings


@torch.no_grad()
def query_loss(unet, scheduler, latent: torch.Tensor, context: torch.Tensor, mask=None, stride: int = 5,
               noise_seed: int = 0) -> float:
    """Mean DDPM loss of one latent over timesteps stride/2, stride/2 + stride, ... with fixed noise."""
    dev = next(unet.parameters()).device
    ts = list(range(stride // 2, scheduler.config.num_train_timesteps, stride))
    noise = torch.stack([item_noise(noise_seed, QUERY_KEY, 0, t, tuple(latent.shape)) for t in ts]).to(dev)
    x0 = latent.to(dev)[None].expand(len(ts), -1, -1, -1)
    return float(ddpm_losses(unet, scheduler, x0, torch.tensor(ts, device=dev), noise,
                             context.to(dev).expand(len(ts), -1, -1), None if mask is None else mask.to(dev)).mean())


def removal_mode(method: str) -> str:
    """Removal rankings come from exact mode wherever a method has one: fast mode screens candidates and is an
    interactive convenience, never what a leave-K-out cell removes."""
    from abu_explorer.attribution import spec

    return "exact" if "exact" in spec(method).modes else ""


def removal_settings(explorer, method: str, ranker=None) -> dict:
    """What decides the removed set besides query, K and draw: the mode, the method's settings and a hash
    of its tables (``ranker``: an already loaded instance). The random control's rule is fixed in code."""
    from abu_explorer.attribution import spec

    if method in UNRANKED:
        return {}
    ranker = ranker or spec(method).load(explorer)
    return {"mode": removal_mode(method), **ranker.settings()}


def removal(explorer, query, method: str, k: int, draw: int = 0, ranker=None) -> list[int]:
    """The K rows to remove: a method's top-K in exact mode where it has one (``ranker``: an already loaded
    instance), K uniformly random rows (seeded by query and draw), or the query's source image alone."""
    from abu_explorer.attribution import spec

    n = len(explorer.dataset)
    if not 1 <= k < n:
        raise ValueError(f"K must be in [1, {n - 1}]: a retrain needs at least one of the {n} images, got {k}")
    if method == SOURCE:
        return [source_row(explorer, query.prompt, k)]
    if method == "random":
        from abu_explorer.attribution.random_baseline import query_seed

        g = torch.Generator().manual_seed(query_seed(query, f"draw{draw}"))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())
    ranker = ranker or spec(method).load(explorer)
    return [i for i, _ in ranker.score(query, removal_mode(method)).top(k)]


def source_row(explorer, prompt: str, k: int = 1) -> int:
    """The training row the source reference removes: the first whose caption is ``prompt`` (K is always 1)."""
    captions = explorer.dataset.captions
    if k != 1 or prompt not in captions:
        raise ValueError(f"the source reference removes the one training image captioned with the query's prompt: "
                         f"it needs K = 1 and a prompt that is a training caption (got K = {k}, {prompt!r})")
    return captions.index(prompt)


def request_key(explorer, query, method: str, k: int, draw: int, recipe: train.StageConfig,
                settings: dict) -> str:
    """The cache key of one cell: the model's hashes, the query, method, K, draw, the recipe and the removal
    settings (``removal_settings``). The machine is not in it: results live in one folder per machine kind."""
    doc = {"unet": explorer.component_hash("unet"), "autoencoder": explorer.component_hash("autoencoder"),
           "clip": explorer.component_hash("clip"), "query": None if query is None else query.describe(),
           "method": method, "k": k, "draw": draw if method == "random" else 0, "recipe": recipe.to_dict(),
           "removal": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def result_dir(results_dir: Path, key: str, kind: str | None = None) -> Path:
    """Where a cell's result lives: ``RESULTS/<machine kind>/<key>/`` (this machine's kind by default)."""
    return Path(results_dir) / (kind or machine_kind()) / key


def find_result(results_dir: Path, key: str) -> Path | None:
    """A finished result's folder: this machine kind's if there is one, else another kind's (the app may serve
    a committed result on any machine, labelled with the machine it ran on)."""
    here = result_dir(results_dir, key)
    if (here / "result.json").exists():
        return here
    return next((p.parent for p in sorted(Path(results_dir).glob(f"*/{key}/result.json"))), None)


def run(explorer, query, method: str, k: int, results_dir: Path, recipe: train.StageConfig = train.UNET_RECIPE,
        draw: int = 0, progress: bool = True, on_epoch=None, lock=None, ranker=None,
        threads: int | None = None, device: str = "cpu") -> dict:
    """One remove-and-regenerate request on this machine; resumable (epoch checkpoints) and cached by its key.

    ``on_epoch(epoch, total, log)`` follows the retraining (it may raise to cancel: the checkpoint stays and
    a later call resumes); ``lock`` guards every use of the shared UNet (attribution and measuring);
    ``threads``: retrain in a child process with that many torch threads (the app's retrains: one core);
    ``device``: where the UNet retrains ("cuda" on a GPU worker); ranking, measuring and sampling stay here."""
    from abu_explorer.attribution import spec
    from abu_explorer.model.embedded import Explorer

    if explorer.retrain_note:
        raise ValueError(explorer.retrain_note)
    lock = lock or contextlib.nullcontext()
    if method not in UNRANKED:
        ranker = ranker or spec(method).load(explorer)
    settings = removal_settings(explorer, method, ranker)
    key = request_key(explorer, query, method, k, draw, recipe, settings)
    out = result_dir(results_dir, key, machine_kind(device))  # filed under the kind of machine that retrains
    if (out / "result.json").exists():
        return artifacts.load_json(out / "result.json")
    # 1. what to remove
    with lock:
        removed = removal(explorer, query, method, k, draw, ranker)
    # 2. retrain the UNet from scratch without them (same recipe, same seed)
    unet, log = retrain(explorer, set(removed), recipe, out / "ckpt", progress,
                        (lambda e, lg: on_epoch(e, recipe.epochs, lg)) if on_epoch else None, threads, device)
    # 3. regenerate with the same noise, prompt and sampler; measure
    context = explorer.encode_text([query.prompt])
    with lock:
        loss0 = query_loss(explorer.unet, explorer.scheduler, query.latent, context, query.mask)
    loss1 = query_loss(unet, explorer.scheduler, query.latent, context, query.mask)
    result = record(explorer, key, query, method, k, draw, removed, loss0, loss1, log["seconds"], recipe,
                    machine(threads, device))
    result["removal_settings"] = settings
    src = query.source
    if src.get("type") == "generated":
        other = Explorer(explorer.root, explorer.vae, explorer.clip, explorer.tokenizer, unet,
                         explorer.scheduler_config, explorer.dataset, explorer.meta)
        with lock:
            a = explorer.generate(query.prompt, src["seed"], src["steps"], src["guidance"]).image
        b = other.generate(query.prompt, src["seed"], src["steps"], src["guidance"]).image
        result.update(image_change(explorer, a, b))
        artifacts.save_png(out / "regenerated.png", b)
        artifacts.save_png(out / "original.png", a)
    artifacts.save_json(out / "result.json", result)
    shutil.rmtree(out / "ckpt", ignore_errors=True)  # retrained weights need not be kept
    return result


def retrain(explorer, exclude: set[int], recipe: train.StageConfig, ckpt_dir: Path, progress: bool = True,
            on_epoch_end=None, threads: int | None = None, device: str = "cpu"):
    """The UNet retrained from scratch without ``exclude`` (same recipe, same seed); (unet on the CPU, training log).

    ``threads``: train in a child process with that many torch threads (``training.isolated``); the
    arithmetic is that of a run in a process with that thread count. ``device``: train there (a GPU)."""
    from abu_explorer.machine import use_device

    dev = use_device(device)
    cache = explorer.training_cache()
    if threads and dev.type == "cpu":
        from abu_explorer.training import isolated

        state, log = isolated.train_unet(dict(explorer.unet.config), explorer.scheduler_config, cache.latents,
                                         cache.text_states, cache.null_state, recipe, exclude, ckpt_dir, threads,
                                         on_epoch_end)
        with components.seeded_global_rng(recipe.seed):  # no draw from the server's global generator
            unet = components.build_unet(dict(explorer.unet.config))
        unet.load_state_dict(state)
        unet.eval()
        return unet, log
    with components.seeded_global_rng(recipe.seed):  # the initial weights, as the shipped UNet's
        unet = components.build_unet(dict(explorer.unet.config))
    log = train.train_unet(unet.to(dev), explorer.scheduler, cache.latents, cache.text_states, cache.null_state,
                           recipe, exclude=exclude, run_dir=ckpt_dir, progress=progress, on_epoch_end=on_epoch_end)
    unet.to("cpu").eval()
    return unet, log


def floor(explorer, queries: list, results_dir: Path, recipe: train.StageConfig = train.UNET_RECIPE,
          progress: bool = True, device: str = "cpu") -> dict:
    """The K = 0 cell of this machine: the recipe retrained on every row, and each query's dL under it.

    That dL is what the arithmetic alone gives: exactly 0 on the machine kind that trained the shipped
    weights, and the floor under every other cell of a table made elsewhere. One retrain serves every query;
    its weights stay beside the result (``unet.safetensors``, not committed), so that a query added later is
    measured without another retrain. ``device``: retrain there (its table's machine kind)."""
    out = floor_dir(explorer, results_dir, machine_kind(device), recipe)
    key = out.name  # the floor's request key (``floor_dir`` files it under it)
    ids = [floor_query_id(q.describe()) for q in queries]
    doc = _filed(out)
    if doc is not None and all(i in doc["queries"] for i in ids):
        return doc
    with artifacts.claimed(out / "result.json") as mine:
        if not mine:  # another runner is retraining it: the table gains the floor once that one files it
            print("K = 0 floor: being retrained by another process; left to it", flush=True)
            return doc
        return _fill_floor(explorer, queries, ids, out, key, _filed(out), recipe, progress, device)


def floor_delta(explorer, results_dir: Path, query: dict, kind: str,
                recipe: train.StageConfig = train.UNET_RECIPE) -> float | None:
    """The filed K = 0 floor's dL for ``query`` (a result's ``query`` field) on machine ``kind``, or None."""
    doc = _filed(floor_dir(explorer, results_dir, kind, recipe))
    entry = None if doc is None else doc["queries"].get(floor_query_id(query))
    return None if entry is None else entry["delta_loss"]


def floor_dir(explorer, results_dir: Path, kind: str, recipe: train.StageConfig = train.UNET_RECIPE) -> Path:
    """Where machine ``kind``'s K = 0 floor is filed."""
    return result_dir(results_dir, request_key(explorer, None, FULL, 0, 0, recipe, {}), kind)


def floor_query_id(query: dict) -> str:
    """The floor's name for a query (its description): the key of its entry in the floor's ``queries``."""
    return json.dumps(query, sort_keys=True)


def _filed(out: Path) -> dict | None:
    return artifacts.load_json(out / "result.json") if (out / "result.json").exists() else None


def _fill_floor(explorer, queries, ids, out: Path, key: str, doc: dict | None, recipe, progress, device) -> dict:
    """The floor's retrain (or its kept weights) and the dL of every query not yet measured under it."""
    weights = out / "unet.safetensors"
    retrained = not weights.exists()
    if not retrained:
        with components.seeded_global_rng(recipe.seed):
            unet = components.build_unet(dict(explorer.unet.config))
        unet.load_state_dict(artifacts.load_safetensors(weights))
        unet.eval()
        seconds = doc["train_seconds"] if doc else None
    else:
        unet, log = retrain(explorer, set(), recipe, out / "ckpt", progress, device=device)
        seconds = log["seconds"]
    doc = doc or {"key": key, "method": FULL, "k": 0, "recipe": recipe.to_dict(), "trained_on": machine(None, device),
                  "train_seconds": seconds, "queries": {}}
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), explorer.unet.state_dict().values()))
    doc["identical_to_shipped_weights"] = same
    for qid, q in zip(ids, queries):
        entry = doc["queries"].get(qid)
        if entry is not None and retrained:  # the filed floor must come back exactly
            _check_reproduced(explorer, unet, q, qid, entry, out)
        if entry is None:
            ctx = explorer.encode_text([q.prompt])
            loss0 = query_loss(explorer.unet, explorer.scheduler, q.latent, ctx, q.mask)
            loss1 = query_loss(unet, explorer.scheduler, q.latent, ctx, q.mask)
            doc["queries"][qid] = {"loss_original": loss0, "loss_full_retrain": loss1, "delta_loss": loss1 - loss0}
    if retrained:
        artifacts.save_safetensors(weights, unet.state_dict())
    artifacts.save_json(out / "result.json", doc)
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return doc


def _check_reproduced(explorer, unet, q, qid: str, entry: dict, out: Path) -> None:
    """A floor retrained after its weights were lost (they are not committed) must give a query it measured
    before the same loss, bit for bit: the same recipe and seed on the same machine kind. Anything else means
    this machine is not of the floor's kind, and the floor is not silently replaced."""
    ctx = explorer.encode_text([q.prompt])
    again = query_loss(unet, explorer.scheduler, q.latent, ctx, q.mask)
    if again != entry["loss_full_retrain"]:
        artifacts.save_safetensors(out / "unet.not_reproduced.safetensors", unet.state_dict())
        raise ValueError(f"the K = 0 retrain did not reproduce the filed floor: {qid} has loss {again!r} under it, "
                         f"{entry['loss_full_retrain']!r} filed in {out / 'result.json'} (its weights are kept as "
                         "unet.not_reproduced.safetensors; remove the folder to file a floor of this machine)")


def record(explorer, key: str, query, method: str, k: int, draw: int, removed: list[int], loss0: float,
           loss1: float, train_seconds: float, recipe: train.StageConfig, trained_on: dict) -> dict:
    """The fields of every result.json (the image metrics are added for generated queries)."""
    return {"key": key, "query": query.describe(), "method": method, "k": k, "draw": draw, "removed": removed,
            "removed_captions": [explorer.dataset.captions[i] for i in removed],
            "loss_original": loss0, "loss_counterfactual": loss1, "delta_loss": loss1 - loss0,
            "train_seconds": train_seconds, "recipe": recipe.to_dict(), "trained_on": trained_on}


def image_change(explorer, a, b) -> dict:
    """dG-MSE (pixel MSE in [0, 1]) and dG-CLIP (cosine of the CLIP image embeddings) of two PIL images."""
    xa, xb = (torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0) for im in (a, b))
    with torch.no_grad():
        pair = train.clip_preprocess(torch.stack([xa, xb]).permute(0, 3, 1, 2) * 2 - 1)
        emb = explorer.clip.encode_image(pair, normalize=True)
    return {"delta_g_mse": float((xa - xb).pow(2).mean()), "delta_g_clip": float(emb[0] @ emb[1])}


def show(result: dict) -> str:
    lines = [f"{result['method']} K={result['k']}: dL = {result['delta_loss']:+.5f} "
             f"({result['loss_original']:.5f} -> {result['loss_counterfactual']:.5f})"]
    if "delta_g_mse" in result:
        lines.append(f"dG-MSE = {result['delta_g_mse']:.5f}, dG-CLIP = {result['delta_g_clip']:.4f}")
    lines.append(f"removed: {', '.join(result['removed_captions'][:10])}" + (" ..." if result["k"] > 10 else ""))
    return "\n".join(lines)



def strip(results_dir: Path, results: list[dict], path: Path) -> None:
    """One row per K: the original, the source reference (K = 1, repeated on every row) when it ran, then each
    method's regenerated image (in the order of ``results``' first appearance), captioned with method, K and its
    metrics; a method without a cell at that K gets a blank tile."""
    from PIL import Image

    from abu_explorer.data.sheet import grid

    def tile(r):
        return Image.open(Path(results_dir) / r["key"] / "regenerated.png").convert("RGB")

    original = Image.open(Path(results_dir) / results[0]["key"] / "original.png").convert("RGB")
    cells = [r for r in results if r["method"] != SOURCE] or results  # the reference alone: its own row
    reference = next((r for r in results if r["method"] == SOURCE), None) if cells is not results else None
    methods = list(dict.fromkeys(r["method"] for r in cells))
    by_cell = {(r["k"], r["method"]): r for r in cells}
    images, captions = [], []
    for k in sorted({r["k"] for r in cells}):
        images.append(original)
        captions.append(f"original: {results[0]['query']['prompt']} (K = {k})")
        if reference is not None:
            images.append(tile(reference))
            captions.append(f"-source image alone (K=1, reference): dL {reference['delta_loss']:+.4f} "
                            f"CLIP {reference['delta_g_clip']:.2f}")
        for m in methods:
            r = by_cell.get((k, m))
            if r is None:
                images.append(Image.new("RGB", original.size, "white"))
                captions.append(f"-{m} K={k}: not run")
                continue
            images.append(tile(r))
            captions.append(f"-{m} K={k}: dL {r['delta_loss']:+.4f} CLIP {r['delta_g_clip']:.2f}")
    cols = len(methods) + 1 + (reference is not None)
    artifacts.save_png(path, grid(images, captions, cols=cols, scale=5, caption_lines=3))
