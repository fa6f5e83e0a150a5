"""``python -m abu_explorer evaluate customized``: attribution with a known answer (a mini-AbC; Wang et al. ICCV
2023, "Evaluating Data Attribution for Text-to-Image Models").

# Protocol (fixed before any attribution was seen)
1. Concepts: ``evaluation/customized_concepts.json`` (the rule in ``customized_concepts``): OpenMoji extras the
   model never saw, 1 exemplar (single) or 3-4 (family), each with a category word; tuning / test split.
2. One customized model per concept: Custom Diffusion (``training.custom_diffusion``, ``CustomConfig()``) on the
   exemplars, captioned "<new1> WORD", from the shipped model.
3. Queries: ``PROMPTS`` with "<new1>" and the concept's word, seed ``QUERY_SEED``, the app's sampler defaults.
4. Every method ranks the base training rows plus the exemplars (N + E rows) for each query, gradient methods in
   exact mode on the customized model. The preconditioners are the base model's (AbU's diagonal Fisher, the
   EK-FAC factors of IF and AbU+), as the AbU paper does for its customized models; losses, gradients and D-TRAK
   features are the customized model's. AbU uses ``CUSTOM_ABU``: the shipped one-step setting, chosen over the
   paper's customized-model setting (``PAPER_ABU``) on the tuning split by the rule in docs/evaluation.md.
5. Metrics per query: Recall@10 (exemplars in the top 10 / E) and the average precision of the exemplars over
   the full ranking; a method's figure is the mean over the split's queries with a bootstrap interval, by kind.
Results: one JSON per (concept, prompt, method and its settings), so a run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from abu_explorer import artifacts, data
from abu_explorer.data import extras
from abu_explorer.evaluation.stats import average_precision, recall_at_k
from abu_explorer.model import customized
from abu_explorer.training import custom_diffusion

CONCEPTS = "evaluation/customized_concepts.json"
PROMPTS = ("{token} {word}", "red {token} {word}")
QUERY_SEED = 0
# The AbU paper's setting for customized models: alpha 0.1, 100 steps, 16 timesteps x 10 noises per step (here
# 160 random (timestep, noise) draws per step).
PAPER_ABU = {"alpha": 0.1, "unlearn_steps": 100, "unlearn_samples": 160}
# The one-step setting the embedded model shipped when this benchmark was tuned, which its tuning split chose over
# the paper's by the rule fixed beforehand (mean AP of AbU over its 10 queries: 0.933 against 0.687;
# docs/evaluation.md). The test split reports it. It stays this benchmark's own setting when the embedded model's
# defaults move (they were later chosen by LDS). AbU+ scales its own step size by the factor that this setting
# scales AbU's (here 1).
SHIPPED_ABU = {"alpha": 0.01, "unlearn_steps": 1, "unlearn_samples": 512}
CUSTOM_ABU = dict(SHIPPED_ABU)
GRADIENT = ("abu", "abuplus", "if", "dtrak")
BENCHMARK_METHODS = GRADIENT + ("clip", "pixel", "dino", "random")


def key_of(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_concepts(path: str | Path = CONCEPTS) -> list[dict]:
    concepts = artifacts.load_json(Path(path), "python -m abu_explorer evaluate customized --write-concepts")
    for c in concepts:
        if not c.get("word"):
            raise ValueError(f"{path}: concept {c.get('id')} has no category word")
    return concepts


def prompts(concept: dict, token: str = custom_diffusion.CustomConfig().token) -> list[str]:
    return [p.format(token=token, word=concept["word"]) for p in PROMPTS]


def overrides(method: str) -> dict:
    """The customized-model settings of ``method`` (``CUSTOM_ABU`` for AbU; AbU+ scaled alike)."""
    if method == "abuplus":
        from abu_explorer.attribution.abu_plus import DEFAULT_ALPHA

        return {**CUSTOM_ABU, "alpha": DEFAULT_ALPHA * CUSTOM_ABU["alpha"] / SHIPPED_ABU["alpha"]}
    return dict(CUSTOM_ABU) if method == "abu" else {}


def protocol(base, concepts_path: str | Path = CONCEPTS) -> dict:
    """Everything a result depends on besides the method's own settings (which key each result file)."""
    return {"prompts": list(PROMPTS), "query_seed": QUERY_SEED,
            "custom_diffusion": custom_diffusion.CustomConfig().to_dict(),
            "concepts": artifacts.file_hash(Path(concepts_path)), "base": base.provenance()}


# --- 1. customized models ------------------------------------------------------------------------------


def model_for(base, concept: dict, work: Path, cfg: custom_diffusion.CustomConfig = custom_diffusion.CustomConfig(),
              progress: bool = False):
    """The concept's customized model: loaded from ``work/<id>`` when its spec matches, else fine-tuned there."""
    folder = Path(work) / concept["id"]
    # the base as a path relative to the folder (a committed example moves with the repository); its identity is
    # its provenance, not its path
    spec = {"base": os.path.relpath(Path(base.root).resolve(), folder.resolve()), "base_provenance": base.provenance(),
            "token": cfg.token, "init_word": concept["word"], "codes": concept["codes"], "config": cfg.to_dict()}
    path = folder / customized.SPEC
    if path.exists():
        stored = artifacts.load_json(path)
        if all(stored.get(k) == v for k, v in spec.items() if k != "base"):
            return customized.CustomizedExplorer.load(folder, base=base)
        raise artifacts.ArtifactError(f"{folder} holds a customized model of another concept, base or recipe; "
                                      "remove it (or choose another --work folder) to build this one")
    images = extras.render_extras(concept["codes"], data.DataConfig(**base.meta["dataset"]["config"]))
    fresh = customized.fresh_copy(base)
    log = custom_diffusion.finetune(fresh, data.dataset.to_tensor(images), concept["word"], cfg, progress)
    customized.save(folder, fresh, {**spec, "caption": log["caption"], "log": log}, images, log["caption"])
    return customized.CustomizedExplorer.load(folder, base=base)


# --- 2. the methods' tables on a customized model ------------------------------------------------------


def prepare_tables(custom, base, methods: list[str], progress: bool = False) -> None:
    """Write ``custom.root/<method>/``: the base model's preconditioners, the customized model's losses and
    features. A table whose meta matches is kept."""
    from abu_explorer.attribution import abu_precompute, dtrak, influence
    from abu_explorer.attribution.ddpm_loss import eval_timesteps, loss_table

    root, prov = Path(custom.root), custom.provenance()
    if {"abu", "abuplus"} & set(methods):
        base_meta = artifacts.load_json(Path(base.root) / "abu" / "meta.json", abu_precompute.HINT)
        meta = {k: v for k, v in base_meta.items() if k not in prov and k not in ("done", "num_train")}
        meta.update(prov, num_train=len(custom.dataset), fisher_of=base.provenance())
        folder = root / "abu"
        old = artifacts.load_json(folder / "meta.json") if (folder / "meta.json").exists() else {}
        if old != {**meta, "done": ["base_losses", "fisher"]}:
            cfg = abu_precompute.AbUConfig(**base_meta["config"])
            cache = custom.training_cache()
            table = loss_table(custom.unet, custom.scheduler, cache.latents, cache.text_states,
                               eval_timesteps(cfg.num_timesteps, custom.scheduler.config.num_train_timesteps),
                               cfg.noise_seed, cfg.batch_size, progress=None, caption_image=cache.caption_image)
            artifacts.save_npy(folder / "base_losses.npy", table.numpy())
            fisher = (Path(base.root) / "abu" / "fisher.safetensors").read_bytes()
            artifacts.save_bytes(folder / "fisher.safetensors", fisher)
            artifacts.save_json(folder / "meta.json", {**meta, "done": ["base_losses", "fisher"]})
    if {"if", "abuplus"} & set(methods):
        base_meta = artifacts.load_json(Path(base.root) / "if" / "meta.json", influence.HINT)
        meta = {"config": base_meta["config"], **prov, "num_train": len(custom.dataset),
                "factors_of": base.provenance()}
        folder = root / "if"
        if not (folder / "meta.json").exists() or artifacts.load_json(folder / "meta.json") != meta:
            factors = (Path(base.root) / "if" / "factors.safetensors").read_bytes()
            artifacts.save_bytes(folder / "factors.safetensors", factors)
            artifacts.save_json(folder / "meta.json", meta)
    if "dtrak" in methods:
        base_meta = artifacts.load_json(Path(base.root) / "dtrak" / "meta.json", dtrak.HINT)
        folder = root / "dtrak"
        old = artifacts.load_json(folder / "meta.json") if (folder / "meta.json").exists() else {}
        if {k: old.get(k) for k in prov} != prov or old.get("config") != base_meta["config"]:
            dtrak.precompute(custom, dtrak.DTrakConfig(**base_meta["config"]), progress=progress)


# --- 3. one query, one method ---------------------------------------------------------------------------


def query_result(scores: np.ndarray, exemplars: list[int], top: int = 12) -> dict:
    order = np.argsort(-scores, kind="stable")
    ranks = [int(np.nonzero(order == e)[0][0]) + 1 for e in exemplars]
    return {"recall_at_10": recall_at_k(scores, exemplars, 10), "ap": average_precision(scores, exemplars),
            "exemplar_ranks": ranks, "top": [int(i) for i in order[:top]],
            "top_scores": [float(scores[i]) for i in order[:top]]}


def run_concept(base, concept: dict, methods: list[str], work: Path, folder: Path, progress: bool = False,
                cfg: custom_diffusion.CustomConfig = custom_diffusion.CustomConfig()) -> list[dict]:
    """Every (prompt, method) of one concept; each result written as soon as it exists."""
    custom = model_for(base, concept, work, cfg, progress)
    prepare_tables(custom, base, [m for m in methods if m in GRADIENT], progress)
    about = {"concept": concept["id"], "kind": concept["kind"], "split": concept["split"]}
    try:
        return score_prompts(custom, about, prompts(concept), methods, folder)
    finally:  # IF's gradient table of this one model (1.45 GB here) is not kept: it rebuilds in minutes
        if "if" in methods:
            from abu_explorer.attribution import spec

            spec("if").load(custom, **overrides("if")).discard_exact()


def score_prompts(model, about: dict, texts: list[str], methods: list[str], folder: Path,
                  seed: int = QUERY_SEED) -> list[dict]:
    """Each method's ranking of ``model``'s rows (its ``exemplars`` the known answer) for each prompt, generated
    with ``seed``; one JSON per (prompt, method, settings) in ``folder``, read back when it exists."""
    from abu_explorer.attribution import query as q
    from abu_explorer.attribution import spec

    out, tag = [], about.get("concept", "user")
    for pi, prompt in enumerate(texts):
        query = None
        for name in methods:
            ranker = spec(name).load(model, **overrides(name))
            mode = "exact" if "exact" in spec(name).modes else ""
            settings = {"method": name, "mode": mode, **ranker.settings(), "model": model.provenance(),
                        "prompt": prompt, "seed": seed}
            path = Path(folder) / f"{tag}-p{pi}-{name}-{key_of(settings)}.json"
            if path.exists():
                out.append(artifacts.load_json(path))
                continue
            if query is None:
                query = q.from_generation(model, prompt, seed)
            ranking = ranker.score(query, mode)
            doc = {**about, "prompt": prompt, "method": name, "settings": settings, "exemplars": model.exemplars,
                   "seconds": round(ranking.seconds, 1),
                   **query_result(ranking.scores.numpy().astype(np.float64), model.exemplars)}
            artifacts.save_json(path, doc)
            out.append(doc)
    return out


# --- 4. remove and regenerate ---------------------------------------------------------------------------


def recustomize(base, concept: dict, work: Path, removed: list[int], prompt: str, seed: int = QUERY_SEED,
                cfg: custom_diffusion.CustomConfig = custom_diffusion.CustomConfig()) -> dict:
    """Remove and regenerate for a customized model: Custom Diffusion again from the same base without the removed
    exemplars (base rows are pretraining data: a fine-tune cannot drop them), then the same prompt and noise.
    dL = the query's loss (``counterfactual.query_loss``) under the new model minus under the customized one;
    dG-MSE, dG-CLIP as in leave-K-out. Cached under ``work/<id>/removed/<key>/``; seconds, not an hour."""
    from abu_explorer.evaluation import counterfactual

    custom = model_for(base, concept, work, cfg)
    drop = sorted({int(r) for r in removed if int(r) in custom.exemplars})
    keep = [j for j, row in enumerate(custom.exemplars) if row not in drop]
    key = key_of({"model": custom.provenance(), "drop": drop, "prompt": prompt, "seed": seed, "cfg": cfg.to_dict()})
    folder = Path(custom.root) / "removed" / key
    if (folder / "result.json").exists():
        return artifacts.load_json(folder / "result.json")
    images = extras.render_extras(concept["codes"], data.DataConfig(**base.meta["dataset"]["config"]))[keep]
    fresh = customized.fresh_copy(base)
    if keep:
        custom_diffusion.finetune(fresh, data.dataset.to_tensor(images), concept["word"], cfg)
    else:  # nothing left to learn from: the base with V* at its initial word
        customized.attach_token(fresh, cfg.token, concept["word"])
    g0, g1 = custom.generate(prompt, seed), fresh.generate(prompt, seed)
    loss0 = counterfactual.query_loss(custom.unet, custom.scheduler, g0.latent, custom.encode_text([prompt]))
    loss1 = counterfactual.query_loss(fresh.unet, fresh.scheduler, g0.latent, fresh.encode_text([prompt]))
    result = {"key": key, "concept": concept["id"], "prompt": prompt, "seed": seed, "removed": drop,
              "ignored": sorted(set(int(r) for r in removed) - set(drop)), "kept_exemplars": len(keep),
              "loss_original": loss0, "loss_counterfactual": loss1, "delta_loss": loss1 - loss0,
              **counterfactual.image_change(base, g0.image, g1.image)}
    artifacts.save_png(folder / "original.png", g0.image)
    artifacts.save_png(folder / "regenerated.png", g1.image)
    artifacts.save_json(folder / "result.json", result)
    return result
