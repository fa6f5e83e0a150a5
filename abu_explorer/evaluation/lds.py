"""The linear datamodeling score (LDS; Park et al. 2023, TRAK; Zheng et al. 2024, D-TRAK): one set of models
trained on random halves of the training set measures every method on every query at once.

Protocol (every seed is written here; ``protocol()`` records all of it beside the results):

1. **Subsets.** Subset j keeps ``round(fraction * N)`` rows: the first of ``torch.randperm(N)`` drawn from a
   generator seeded ``SUBSET_SEED + j``, sorted.
2. **Subset models.** The UNet recipe of the shipped weights (same epochs, same initial weights, same
   batch-order seed), trained on the kept rows only; the autoencoder and CLIP stay fixed.
3. **Queries.** The test and tuning splits' (prompt, seed) lists (``evaluation/lds_queries.json``, built by
   ``split_queries``), generated once by the full model (DDIM, default guidance); every subset model measures
   both splits, so one set of models serves tuning and the report. The output of query q under model j is the
   query's DDPM loss at timesteps stride/2, stride/2 + 5, ... with fixed noise (``counterfactual.query_loss``,
   the loss dL uses).
4. **Scores.** Every registry method, in exact mode where it has one, scores all N rows for each query
   (higher = more responsible for the query, the order leave-K-out removes in).
5. **LDS.** For query q the prediction for subset S_j is ``-sum_{i in S_j} score_q[i]`` (a subset holding the
   images that made the query should give it a *lower* loss); LDS_q is the Spearman correlation over j of
   prediction and actual loss; a method's LDS is the mean over queries with a bootstrap interval.

Nearest-neighbour similarities are not additive by design; their LDS is reported with that note.

**The source image.** Each query is generated from the caption of one training row, its *source*, and on a
model of this size whether a subset holds that one image can decide most of the query's loss. Two figures say how
much (``source_effect``): the LDS of a predictor that scores the source row alone (it reads the query's
provenance, so it is a reference, not a method), and each method's LDS *within* the source's strata
(``lds_within_source``): the Spearman correlation over the subset models that hold the source and, separately,
over those that do not, averaged. The latter is what a method predicts beyond the one image.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual
from abu_explorer.machine import kind as machine_kind
from abu_explorer.machine import machine
from abu_explorer.training import train

SUBSET_SEED = 10_000  # subset j is drawn from SUBSET_SEED + j
FRACTION = 0.5
STRIDE = 5  # timestep stride of the query loss
RULE = ("training rows floor((k + 0.5) * N / count), k = 0 .. count-1, prompt = the row's caption, seed = the row "
        "index, DDIM 50 steps, default guidance; the tuning split uses offset 0.0 instead of 0.5, skipping any row "
        "(or whose caption is) already in the test split to the next free row")


def subset_rows(j: int, n: int, fraction: float = FRACTION) -> list[int]:
    g = torch.Generator().manual_seed(SUBSET_SEED + j)
    return sorted(torch.randperm(n, generator=g)[:round(fraction * n)].tolist())


def split_queries(captions: list[str], test: int = 50, tune: int = 16) -> dict:
    """The written rule (``RULE``): evenly spaced training captions, disjoint splits."""
    n = len(captions)
    test_rows = [int((k + 0.5) * n / test) for k in range(test)]
    taken, tune_rows = set(test_rows), []
    test_captions = {captions[r] for r in test_rows}
    for k in range(tune):
        r = int(k * n / tune)
        while r in taken or captions[r] in test_captions:
            r = (r + 1) % n
        taken.add(r)
        tune_rows.append(r)

    def items(rows):
        return [{"prompt": captions[r], "seed": r, "row": r, "steps": 50} for r in rows]

    return {"rule": RULE, "test": items(test_rows), "tune": items(tune_rows)}


def protocol(explorer, queries: list[dict], recipe: train.StageConfig, fraction: float = FRACTION) -> dict:
    """Everything the subset losses depend on; its hash names the results folder."""
    return {"unet": explorer.component_hash("unet"), "autoencoder": explorer.component_hash("autoencoder"),
            "clip": explorer.component_hash("clip"), "data": explorer.meta["dataset"]["content_hash"],
            "recipe": recipe.to_dict(), "fraction": fraction, "subset_seed": SUBSET_SEED, "stride": STRIDE,
            "queries": queries}


def key_of(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def results_folder(results_dir: Path, doc: dict, kind: str | None = None) -> Path:
    """``RESULTS/<machine kind>/<protocol key>/``: one LDS table = one machine kind."""
    return Path(results_dir) / (kind or machine_kind()) / key_of(doc)


def query_latents(explorer, queries: list[dict]) -> list:
    """The split's generated queries (the full model's images: what every method attributes)."""
    from abu_explorer.attribution import query as q

    return [q.from_generation(explorer, d["prompt"], int(d["seed"]), int(d.get("steps", 50)), d.get("guidance"))
            for d in queries]


def train_subset(explorer, j: int, built: list, folder: Path, recipe: train.StageConfig,
                 progress: bool = True, device: str = "cpu") -> dict:
    """Subset model j (resumable from its epoch checkpoints; the UNet trained on ``device``) and each query's loss
    under it; written once."""
    path = folder / f"subset_{j:03d}.json"
    if path.exists():
        return artifacts.load_json(path)
    n = len(explorer.dataset)
    kept = subset_rows(j, n)
    exclude = set(range(n)) - set(kept)
    unet, log = counterfactual.retrain(explorer, exclude, recipe, folder / "ckpt" / f"subset_{j:03d}", progress,
                                       device=device)
    losses = []
    for query in built:
        ctx = explorer.encode_text([query.prompt])
        losses.append(counterfactual.query_loss(unet, explorer.scheduler, query.latent, ctx, query.mask, STRIDE))
    doc = {"subset": j, "kept": len(kept), "rows_sha256": hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16],
           "losses": losses, "train_seconds": log["seconds"], "trained_on": machine(None, device)}
    artifacts.save_json(path, doc)
    import shutil

    shutil.rmtree(folder / "ckpt" / f"subset_{j:03d}", ignore_errors=True)
    return doc


def load_with(explorer, name: str, options: dict | None, folder: Path, progress: bool = False):
    """The method loaded with ``options``. AbU settings that its precomputed tables fix (``TABLE_FIELDS``, e.g.
    the loss timesteps) get tables of their own, built (resumably) under ``folder/tables/`` (their hash is then part
    of the method's settings, so of every score key)."""
    import dataclasses

    from abu_explorer.attribution import spec

    options = dict(options or {})
    if name == "abu":
        from abu_explorer.attribution.abu_precompute import TABLE_FIELDS, AbUConfig

        bound = {k: options.pop(k) for k in list(options) if k in TABLE_FIELDS}
        if bound:
            cfg = AbUConfig(**bound)
            tables = folder / "tables" / f"abu-{key_of(cfg.table_settings())}"
            with artifacts.locked(tables / "meta.json"):  # another process building them: wait, then reuse
                spec("abu").precompute(explorer, cfg, tables, progress)  # resumes; finished stages are kept
            return spec("abu").load(explorer, folder=tables, **options)
    return spec(name).load(explorer, **options)


def scores_path(folder: Path, name: str, ranker, described: list[dict]) -> tuple[Path, dict]:
    """Where a method's (Q, N) scores of ``described`` queries are cached, and the settings in that key."""
    settings = {"mode": counterfactual.removal_mode(name), **ranker.settings()}
    return folder / "scores" / f"{name}-{key_of({**settings, 'queries': described})}.npy", settings


def method_scores(explorer, name: str, built: list, folder: Path, described: list[dict] | None = None,
                  progress: bool = False, options: dict | None = None) -> np.ndarray:
    """(Q, N) scores of one method, exact mode where it has one; cached under the hash of its settings and of the
    queries (``described``: their records; default: the built queries' own descriptions); ``options``: settings
    the method is loaded with instead of its defaults (part of the key through its settings). Resumable: each
    query's row is written as it comes (``<name>-<key>.parts/``, gathered into one ``.npy`` at the end). Several
    processes may score one method at once: each claims a query before scoring it and skips the ones another
    holds, then waits for those before gathering."""
    from tqdm.auto import tqdm

    ranker = load_with(explorer, name, options, folder, progress)
    which = described if described is not None else [q.describe() for q in built]
    path, settings = scores_path(folder, name, ranker, which)
    if path.exists():
        return artifacts.load_npy(path)
    parts = path.with_suffix(".parts")
    if not (parts / "settings.json").exists():  # what these parts are, for ``--status`` while they are filled
        artifacts.save_json(parts / "settings.json", {"method": name, "settings": settings, "queries": len(built)})
    for wait in (False, True):  # first the queries nobody holds, then wait for those another process was scoring
        for i, query in enumerate(tqdm(built, desc=f"{name} scores", disable=not progress or wait)):
            part = parts / f"{i:03d}.npy"
            if path.exists():  # another process has gathered them all (and removed the parts)
                break
            if part.exists():
                continue
            with artifacts.claimed(part, wait=wait) as mine:
                if mine and not part.exists() and not path.exists():
                    artifacts.save_npy(part, ranker.score(query, settings["mode"]).scores.numpy().astype(np.float64))
    with artifacts.locked(path):  # one process gathers; the others find the file
        if path.exists():
            return artifacts.load_npy(path)
        scores = np.stack([artifacts.load_npy(parts / f"{i:03d}.npy") for i in range(len(built))])
        artifacts.save_npy(path, scores)
        artifacts.save_json(path.with_suffix(".json"), {"method": name, "settings": settings, "queries": len(built),
                                                        "computed_on": machine(torch.get_num_threads())})
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return scores


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """scores (Q, N), masks (M, N) 0/1 of kept rows, losses (M, Q) -> LDS of each query (Q,)."""
    predicted = -(masks @ scores.T)  # (M, Q): a subset holding the query's top images -> a lower loss
    return np.array([spearman(predicted[:, q], losses[:, q]) for q in range(scores.shape[0])])


def other_query_control(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float | None:
    """Mean LDS when each query is predicted from the next query's scores (the last from the first's). Near 0 for
    scores that are specific to their query; as high as the LDS itself for scores that are the same for every
    query (a ranking of generally useful images, not an attribution). None for a single query."""
    if len(scores) < 2:
        return None
    return float(lds_per_query(np.roll(scores, 1, axis=0), masks, losses).mean())


MIN_STRATUM = 5  # subset models a source stratum needs before its Spearman correlation is counted


def source_rows(described: list[dict] | None) -> list[int] | None:
    """Each query's source row (the training row whose caption generated it); None unless every query has one."""
    if not described or any("row" not in d for d in described):
        return None
    return [int(d["row"]) for d in described]


def lds_within_source(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, rows: list[int],
                      min_models: int = MIN_STRATUM) -> np.ndarray:
    """(Q,) per query: the mean of the Spearman correlations of prediction and loss over the subset models that
    hold the query's source row and over those that do not (a stratum of fewer than ``min_models`` models is left
    out; NaN if both are). The source's own score is constant within a stratum, so it counts for nothing here."""
    predicted = -(masks @ scores.T)
    out = []
    for q, row in enumerate(rows):
        holds = masks[:, row] == 1
        rhos = [spearman(predicted[s, q], losses[s, q]) for s in (holds, ~holds) if s.sum() >= min_models]
        out.append(float(np.mean(rhos)) if rhos else float("nan"))
    return np.array(out)


def source_effect(masks: np.ndarray, losses: np.ndarray, rows: list[int]) -> dict:
    """How much of the query losses the source image alone explains: the LDS of scoring the source row only,
    the mean loss change when a subset holds it, and the spread of the loss among models on the same side."""
    n = masks.shape[1]
    only = np.zeros((len(rows), n))
    only[np.arange(len(rows)), rows] = 1.0
    per_query = lds_per_query(only, masks, losses)
    gaps, spread = [], []
    for q, row in enumerate(rows):
        holds = masks[:, row] == 1
        if holds.any() and (~holds).any():
            gaps.append(float(losses[holds, q].mean() - losses[~holds, q].mean()))
            spread.append(float(np.mean([losses[s, q].std() for s in (holds, ~holds) if s.sum() > 1] or [np.nan])))
    return {"lds_source_only": float(per_query.mean()), "per_query": per_query.tolist(),
            "loss_change_with_source": float(np.mean(gaps)) if gaps else None,
            "loss_sd_within_side": float(np.nanmean(spread)) if spread else None}
