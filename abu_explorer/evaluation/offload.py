"""Leave-K-out retrains on another machine: export a bundle here, retrain there, import the results here.

Retraining is the only heavy part of remove-and-regenerate (~25 min per cell on 2 CPU cores). This module
splits ``counterfactual.run`` in three so that the middle phase can run where an accelerator is:

1. ``export`` (here): pick every cell's removed rows with the app's own rankers, and write a bundle: the
   training cache (latents + caption states), each query's latent, prompt states and initial noise, and
   ``plan.json`` with the cells, their cache keys, the recipe and the hashes of the parts.
2. ``offload_retrain.retrain`` (there; needs torch and diffusers only): measure the original UNet once per
   query, then for each cell train the UNet from scratch without the removed rows (same recipe and seed;
   batch order, timesteps and noise still come from the CPU generators), measure the query's DDPM loss and
   DDIM-sample its prompt from its seed's noise. One JSON line per cell, appended as cells finish.
   A ``full`` cell (K = 0) retrains on everything: its dL is the floor that arithmetic alone gives.
3. ``import_results`` (here): check each line against the plan and this model, decode the sampled latents,
   compute dG-MSE and dG-CLIP, and write the result folders ``counterfactual.run`` writes, with the machine
   that trained them recorded, so the app and the table read them as usual.
"""
from __future__ import annotations

from pathlib import Path

import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual
from abu_explorer.evaluation.offload_retrain import (
    BUNDLE,
    PLAN_VERSION,
    load_plan,
    read_lines,
)
from abu_explorer.model import sampling
from abu_explorer.training import train


def _order(cells, ks: list[int], methods: list[str]):
    """First K with two random draws, then the other Ks, then extra random draws: cut anywhere, the
    finished part is the most useful one."""
    return sorted(cells, key=lambda c: (c.draw >= 2, c.k != ks[0], ks.index(c.k), c.draw,
                                        methods.index(c.method), c.query))


def export(explorer, queries: list[dict], methods: list[str], ks: list[int], draws: int, out_dir: Path,
           recipe: train.StageConfig = train.UNET_RECIPE, full: bool = True, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from abu_explorer.attribution import spec
    from abu_explorer.evaluation.counterfactual_table import build_queries, plan

    # 1. queries and cells, in the order the retrains should run
    if len(set(ks)) != len(ks) or not all(1 <= k <= len(explorer.dataset) for k in ks):
        raise ValueError(f"K values must be distinct and in [1, {len(explorer.dataset)}], got {ks}")
    built = build_queries(explorer, queries)
    cells = _order(plan(len(queries), methods, ks, draws), ks, methods)
    # 2. removed rows: one ranking per (query, method), cut at each K
    rankers = {m: spec(m).load(explorer) for m in methods if m != "random"}
    settings = {m: counterfactual.removal_settings(explorer, m, rankers.get(m)) for m in methods}
    rankings: dict[tuple[int, str], list[int]] = {}
    planned = []
    for c in tqdm(cells, desc="rank", disable=not progress):
        if c.method == "random":
            removed = counterfactual.removal(explorer, built[c.query], "random", c.k, c.draw)
        else:
            if (c.query, c.method) not in rankings:
                ranking = rankers[c.method].score(built[c.query], counterfactual.removal_mode(c.method))
                rankings[(c.query, c.method)] = [i for i, _ in ranking.top(max(ks))]
            removed = rankings[(c.query, c.method)][:c.k]
        planned.append({"key": counterfactual.request_key(explorer, built[c.query], c.method, c.k, c.draw, recipe,
                                                          settings[c.method]),
                        "query": c.query, "method": c.method, "k": c.k, "draw": c.draw, "removed": removed,
                        "removal_settings": settings[c.method]})
    if full:
        planned.insert(sum(1 for c in cells if c.k == ks[0] and c.draw < 2),
                       {"key": "full", "query": None, "method": "full", "k": 0, "draw": 0, "removed": []})
    # 3. the bundle: every tensor the retrains read
    cache = explorer.training_cache()
    tensors = {"latents": cache.latents, "text_states": cache.text_states, "null_state": cache.null_state}
    for i, qu in enumerate(built):
        tensors[f"q{i}.latent"] = qu.latent
        tensors[f"q{i}.context"] = explorer.encode_text([qu.prompt])
        c, h = explorer.unet.config.in_channels, explorer.unet.config.sample_size
        tensors[f"q{i}.noise"] = sampling.initial_noise(qu.source["seed"], (1, c, h, h))
        if qu.mask is not None:
            tensors[f"q{i}.mask"] = qu.mask
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_safetensors(out_dir / BUNDLE, {k: v.contiguous() for k, v in tensors.items()})
    doc = {"version": PLAN_VERSION, "bundle_hash": artifacts.file_hash(out_dir / BUNDLE),
           "unet_weights": _portable(Path(explorer.root) / "unet" / "diffusion_pytorch_model.safetensors"),
           "hashes": {p: explorer.component_hash(p) for p in ("unet", "autoencoder", "clip")},
           "unet_config": {k: v for k, v in explorer.unet.config.items() if not k.startswith("_")},
           "scheduler_config": dict(explorer.scheduler_config),
           "recipe": recipe.to_dict(), "num_train": len(explorer.dataset),
           "queries": [{"describe": qu.describe(), "steps": qu.source["steps"], "guidance": qu.source["guidance"]}
                       for qu in built], "cells": planned}
    artifacts.save_json(out_dir / "plan.json", doc)
    return doc


def _portable(path: Path) -> str:
    """Relative to the working directory when inside it, so the plan works in a copy of the repository."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


# --- here: import ---------------------------------------------------------------------------------


def import_results(explorer, bundle_dir: Path, lines_path: Path, results_dir: Path, report: Path | None = None) -> dict:
    """Write a result folder per finished cell (never over an existing one); returns the import report:
    cells written or skipped, the machine, the floor (dL of the K = 0 retrain) and the parity of the
    original generation there against this machine's."""
    from abu_explorer.attribution import query as q
    from abu_explorer.model.embedded import to_pil

    # 1. the plan must describe this model, and every line the plan
    doc, plan, lines = _checked_plan(explorer, Path(bundle_dir), Path(lines_path))
    recipe = train.StageConfig(**doc["recipe"])
    c, h = explorer.unet.config.in_channels, explorer.unet.config.sample_size

    def decode(lat):
        return to_pil(explorer.decode(torch.tensor(lat, dtype=torch.float32).view(1, c, h, h)))[0]

    # 2. the originals: there vs here
    built, originals, parity = [], [], []
    for qi, qd in enumerate(doc["queries"]):
        d = qd["describe"]
        qu = q.from_generation(explorer, d["prompt"], d["seed"], qd["steps"], qd["guidance"],
                               tuple(d["box"]) if d.get("box") else None)
        if qu.describe() != d:
            raise ValueError(f"query {qi} differs from the plan: {qu.describe()} vs {d}")
        there = lines[f"original{qi}"]
        built.append(qu)
        originals.append(there)
        here = explorer.generate(d["prompt"], d["seed"], qd["steps"], qd["guidance"]).latent
        loss_here = counterfactual.query_loss(explorer.unet, explorer.scheduler, qu.latent,
                                              explorer.encode_text([qu.prompt]), qu.mask)
        parity.append({"query": qi, "latent_max_abs_diff": float((torch.tensor(there["latent"]) - here.flatten()).abs().max()),
                       "loss_there": there["loss"], "loss_here": loss_here})
    # 3. the floor: the K = 0 retrain there
    full = next((line for line in lines.values() if line.get("method") == "full"), None)
    floor = None if full is None else {qi: v - originals[int(qi)]["loss"] for qi, v in full["losses"].items()}
    # 4. one result folder per cell
    written, skipped = [], []
    for key, line in lines.items():
        if line["type"] != "cell" or line["method"] == "full":
            continue
        cell = plan.get(key)
        if cell is None or cell["removed"] != line["removed"]:
            raise ValueError(f"{lines_path}: cell {key} is not in {bundle_dir}/plan.json (or removes other rows)")
        machine = {k: line[k] for k in ("device", "kind", "cpu_model", "torch", "diffusers") if k in line}
        qi, qu = cell["query"], built[cell["query"]]
        settings = cell.get("removal_settings", {})
        if counterfactual.request_key(explorer, qu, cell["method"], cell["k"], cell["draw"], recipe, settings) != key:
            raise ValueError(f"cell {key}: its key does not match this model and query; export again")
        out = counterfactual.result_dir(results_dir, key, machine.get("kind", "unrecorded"))
        if (out / "result.json").exists():
            skipped.append(key)
            continue
        loss0, loss1 = originals[qi]["loss"], line["losses"][str(qi)]
        a, b = decode(originals[qi]["latent"]), decode(line["latents"][str(qi)])
        result = {**counterfactual.record(explorer, key, qu, cell["method"], cell["k"], cell["draw"], cell["removed"],
                                          loss0, loss1, line["train_seconds"], recipe, machine),
                  "removal_settings": settings,
                  **counterfactual.image_change(explorer, a, b)}
        if full is not None:  # the same machine's K = 0 retrain: dL against it has no arithmetic offset
            result["loss_full_retrain"] = full["losses"][str(qi)]
        artifacts.save_png(out / "regenerated.png", b)
        artifacts.save_png(out / "original.png", a)
        artifacts.save_json(out / "result.json", result)
        written.append(key)
    summary = {"plan": str(bundle_dir), "bundle_hash": doc["bundle_hash"], "written": len(written),
               "skipped_existing": skipped, "cells_in_plan": len(doc["cells"]),
               "machine": {k: originals[0][k] for k in ("device", "kind", "torch", "diffusers") if k in originals[0]},
               "floor_delta_loss": floor, "original_parity": parity}
    if report is not None:
        artifacts.save_json(Path(report), summary)
    return summary


def _checked_plan(explorer, bundle_dir: Path, lines_path: Path) -> tuple[dict, dict, dict]:
    """(plan document, cells by key, result lines by key), after checking they belong to this model."""
    doc = load_plan(bundle_dir)
    for part, h in doc["hashes"].items():
        if explorer.component_hash(part) != h:
            raise artifacts.ArtifactError(f"{bundle_dir}/plan.json was exported from another {part} ({h}, "
                                          f"this model has {explorer.component_hash(part)})")
    if not lines_path.exists():
        raise FileNotFoundError(f"{lines_path} not found: it is written by `python -m abu_explorer offload retrain`")
    lines = read_lines(lines_path, doc["bundle_hash"])
    missing = [qi for qi in range(len(doc["queries"])) if f"original{qi}" not in lines]
    if missing:
        raise ValueError(f"{lines_path} has no original measurement of queries {missing} for this plan; "
                         f"run `offload retrain` with this bundle")
    return doc, {c["key"]: c for c in doc["cells"]}, lines
