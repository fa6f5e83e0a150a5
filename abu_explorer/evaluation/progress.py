"""What a long evaluation has done and what is left, without running any of it (``evaluate counterfactual
--status``, ``evaluate lds --status``). Each unit is *done* (its result is filed), *running* (another process
holds its claim) or *missing*; a unit that is not done shows how far its epoch checkpoint got (a stopped
one resumes from there)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from abu_explorer import artifacts
from abu_explorer.evaluation import counterfactual, counterfactual_table, lds
from abu_explorer.machine import kind as machine_kind
from abu_explorer.training import checkpoint, train


def state(path: Path) -> str:
    return "done" if Path(path).exists() else "running" if artifacts.held(path) else "missing"


def reached(ckpt_dir: Path) -> str | None:
    """How far the retrain checkpointed in ``ckpt_dir`` got: "epoch 93/150 at 13:50" (local time), or None."""
    found = sorted(Path(ckpt_dir).glob("*-ckpt.safetensors"))
    if not found:
        return None
    done = checkpoint.progress_of(found[0])
    stamp = time.strftime("%H:%M", time.localtime(found[0].stat().st_mtime))
    return f"epoch {done['epoch']}/{done['config']['epochs']} at {stamp}"


def counterfactual_status(explorer, queries: list[dict], methods: list[str], ks: list[int], draws: int,
                          results_dir: Path, recipe: train.StageConfig = train.UNET_RECIPE, device: str = "cpu") -> dict:
    """Every cell of the plan on this machine kind, and its K = 0 floor."""
    _, built, cells, keys = counterfactual_table.planned(explorer, queries, methods, ks, draws, recipe)
    kind = machine_kind(device)
    rows, seconds = [], []
    for c, key in zip(cells, keys):
        out = counterfactual.result_dir(results_dir, key, kind)
        rows.append({"prompt": queries[c.query]["prompt"], "method": c.method, "k": c.k, "draw": c.draw, "key": key,
                     "state": state(out / "result.json"), "checkpoint": reached(out / "ckpt")})
        if rows[-1]["state"] == "done":
            seconds.append(artifacts.load_json(out / "result.json").get("train_seconds"))
    seconds = [t for t in seconds if t]
    return {"kind": kind, "cells": rows, "floor": floor_state(explorer, built, results_dir, kind, recipe),
            "median_train_seconds": statistics.median(seconds) if seconds else None}


def floor_state(explorer, built: list, results_dir: Path, kind: str, recipe: train.StageConfig) -> str:
    """The K = 0 floor's state; once filed, how many of the plan's queries it measured, and whether the rest
    can be measured from its kept weights (seconds) or need its retrain again."""
    out = counterfactual.floor_dir(explorer, results_dir, kind, recipe)
    found = state(out / "result.json")
    if found != "done":
        return found
    measured = artifacts.load_json(out / "result.json")["queries"]
    left = sum(counterfactual.floor_query_id(q.describe()) not in measured for q in built)
    if not left:
        return "done"
    how = "from its kept weights, no retrain" if (out / "unet.safetensors").exists() else \
        "its weights (unet.safetensors) are gone: a retrain"
    return f"done for {len(built) - left} of {len(built)} queries (the next run measures the rest {how})"


def lds_status(explorer, queries: list[dict], methods: list[str], subsets: int, results_dir: Path,
               split: str = "test", recipe: train.StageConfig = train.UNET_RECIPE, device: str = "cpu") -> dict:
    """Subset models 0 .. subsets-1, and each method's scores of the split with its default settings."""
    from abu_explorer.attribution import spec

    folder = lds.results_folder(results_dir, lds.protocol(explorer, queries, recipe), machine_kind(device))
    described = [q for q in queries if q.get("split", split) == split]
    scores, defaults = {}, {}
    for name in methods:
        ranker = spec(name).load(explorer)
        defaults[name] = ranker.settings().get("config", {})
        path, _ = lds.scores_path(folder, name, ranker, described)
        parts = len(list(path.with_suffix(".parts").glob("*.npy")))
        scores[name] = "done" if path.exists() else f"{parts}/{len(described)} queries"
    return {"folder": str(folder), "subsets": [state(folder / f"subset_{j:03d}.json") for j in range(subsets)],
            "checkpoints": {j: reached(folder / "ckpt" / f"subset_{j:03d}") for j in range(subsets)},
            "scores": scores, "split": split, "filed": filed_scores(folder, defaults)}


def filed_scores(folder: Path, defaults: dict[str, dict]) -> list[dict]:
    """Every score set under ``folder/scores`` of the methods in ``defaults`` (name -> its default config; a
    sweep's settings included): the settings that differ from the defaults, and how many queries are scored."""
    out = []
    for name, default in defaults.items():
        for path in sorted((folder / "scores").glob(f"{name}-*")):
            gathered = path.suffix == ".json"
            if not gathered and path.suffix != ".parts":
                continue  # the .npy beside a gathered .json
            info = path if gathered else path / "settings.json"
            doc = artifacts.load_json(info) if info.exists() else {}
            config = doc.get("settings", {}).get("config", {})
            changed = {k: v for k, v in config.items() if default.get(k) != v}
            total = doc.get("queries", "?")
            done = (f"{total}/{total}" if total != "?" else "all") if gathered else f"{len(list(path.glob('*.npy')))}/{total}"
            out.append({"method": name, "key": path.stem.split("-", 1)[1], "changed": changed if doc else None,
                        "queries": done, "tables": doc.get("settings", {}).get("tables")})
    return out


def show(report: dict) -> str:
    """A few lines a person reads: counts first, then what is not done."""
    if "cells" in report:
        cells = report["cells"]
        counts = {s: sum(c["state"] == s for c in cells) for s in ("done", "running", "missing")}
        lines = [f"{counts['done']} of {len(cells)} cells done, {counts['running']} running, {counts['missing']} "
                 f"missing ({report['kind']}); K = 0 floor: {report['floor']}"]
        median = report.get("median_train_seconds")
        if median and counts["missing"]:
            lines.append(f"the missing cells: about {counts['missing'] * median / 3600:.1f} h of retraining at the "
                         f"done cells' median ({median / 60:.0f} min each; n runners side by side take about 1/n of it "
                         "where each has its own cores)")
        lines += [f"  {c['state']:8s} {c['prompt']!r} {c['method']} K={c['k']} draw {c['draw']}"
                  + (f" ({c['checkpoint']})" if c.get("checkpoint") else "") for c in cells if c["state"] != "done"]
        return "\n".join(lines)
    subs = report["subsets"]
    lines = [f"subset models: {subs.count('done')} of {len(subs)} done, {subs.count('running')} running "
             f"({report['folder']})"]
    marks = report.get("checkpoints", {})
    lines += [f"  {s:8s} subset {j}" + (f" ({marks[j]})" if marks.get(j) else "") for j, s in enumerate(subs)
              if s != "done"]
    lines.append(f"scores ({report['split']} split, default settings and tables): "
                 + ", ".join(f"{m} {s}" for m, s in report["scores"].items()))
    if report.get("filed"):
        lines.append("score sets filed (either split; a sweep builds tables of its own, so its default is listed "
                     "apart):")
    for f in report.get("filed", []):
        what = ("settings not recorded" if f["changed"] is None
                else ", ".join(f"{k}={v}" for k, v in f["changed"].items()) or "default settings")
        lines.append(f"  {f['method']}-{f['key']}: {what}; tables {f['tables']}; queries scored: {f['queries']}")
    return "\n".join(lines)
