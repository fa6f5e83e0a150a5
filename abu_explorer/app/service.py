"""What the web app does, without Gradio: queries, attribution per method, tiles, remove-and-regenerate.

The Gradio views (``views/``) only wire events to an ``ExplorerApp``; everything here is tested directly. The shared
UNet is taken in turns (``turns.py``): AbU and IF move its weights while they score, so generation, the
gradient methods and the counterfactual measurements take turns, first come first served, and a visitor's
request that finds the waiting room full is refused in one line; the nearest-neighbour methods never touch it.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from abu_explorer.app.inputs import (
    SHOW,
    UIError,
    as_float,
    as_int,
    draw_box,
    open_image,
    parse_box,
)
from abu_explorer.app.jobs import JobQueue
from abu_explorer.app.turns import Turns, waiting_room_from_env
from abu_explorer.attribution import names, spec
from abu_explorer.attribution.registry import ALL_METHODS
from abu_explorer.attribution import query as q
from abu_explorer.data import model_image
from abu_explorer.evaluation import counterfactual
from abu_explorer.training import train

MAX_K = 50
__all__ = ["ExplorerApp", "MAX_K", "SHOW", "UIError"]


class ExplorerApp:
    def __init__(self, explorer, results_dir: Path, recipe: train.StageConfig = train.UNET_RECIPE,
                 retrain_threads: int | None = None, max_waiting: int | None = None):
        self.explorer = explorer
        self.results_dir = Path(results_dir)
        self.recipe = recipe
        # a retrain runs in its own process with this many threads (0: in the server's process and pool)
        self.retrain_threads = int(os.environ.get("ABU_RETRAIN_THREADS", "1")) if retrain_threads is None \
            else retrain_threads
        self.lock = Turns(waiting_room_from_env() if max_waiting is None else max_waiting)  # the shared UNet
        self._load_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._methods: dict = {}
        self._removal_settings: dict = {}  # per method: what its removal key holds
        self._queries: OrderedDict = OrderedDict()  # (prompt, seed, steps, guidance) -> Generation
        self.jobs = JobQueue()
        explorer.training_cache()  # shared by every gradient method and by retraining

    # --- queries ------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.explorer.image_size

    @staticmethod
    def generation_key(prompt, seed, steps, guidance) -> tuple[str, int, int, float]:
        """The parsed generation request (the cache key); bad input raises ``UIError`` in one line."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise UIError("type a prompt first")
        return (prompt, as_int(seed, "seed", 0, 2**31 - 1), as_int(steps, "steps", 1, 200),
                as_float(guidance, "guidance", 0.0, 15.0))

    def generate(self, prompt: str, seed, steps, guidance, progress=None):
        key = prompt, seed, steps, guidance = self.generation_key(prompt, seed, steps, guidance)
        with self._cache_lock:  # light events read the cache from several threads, never behind the UNet
            if key in self._queries:
                self._queries.move_to_end(key)
                return self._queries[key]
        with self.lock.request():
            g = self.explorer.generate(prompt, seed, steps, guidance, callback=progress)
        with self._cache_lock:
            self._queries[key] = g
            while len(self._queries) > 64:
                self._queries.popitem(last=False)
        return g

    def needs_generation(self, source: dict) -> bool:
        """Would ``query(source)`` run the UNet: a generated source whose image is not cached yet. Input that
        does not parse says False: the call itself then answers with the one-line error."""
        if source.get("type") == "upload":
            return False
        try:
            key = self.generation_key(source.get("prompt"), source.get("seed"), source.get("steps"),
                                      source.get("guidance"))
        except UIError:
            return False
        with self._cache_lock:
            return key not in self._queries

    def query(self, source: dict, box=None) -> q.Query:
        """source: {"type": "generated", prompt, seed, steps, guidance} or {"type": "upload", image, caption}."""
        box = parse_box(box, self.image_size)
        if source.get("type") == "upload":
            if source.get("image") is None:
                raise UIError("upload an image first")
            caption = (source.get("caption") or "").strip()
            if not caption:
                raise UIError("give the uploaded image a caption")
            image = open_image(source["image"])
            return q.from_image(self.explorer, image, caption, box)  # autoencoder only: no UNet lock
        g = self.generate(source.get("prompt"), source.get("seed"), source.get("steps"), source.get("guidance"))
        src = {"type": "generated", "seed": int(source["seed"]), "steps": int(source["steps"]), "guidance": g.guidance}
        return q.with_box(q.Query(g.latent, g.prompt, src, g.image.width), box)

    def preview(self, source: dict, box=None) -> Image.Image:
        """The query image at display size, with the box drawn on it."""
        if source.get("type") == "upload":
            if source.get("image") is None:
                raise UIError("upload an image first")
            img = model_image(open_image(source["image"]), self.image_size)  # what attribution sees
        else:
            img = self.generate(source.get("prompt"), source.get("seed"), source.get("steps"),
                                source.get("guidance")).image
        return draw_box(img, parse_box(box, self.image_size), SHOW)

    # --- attribution ----------------------------------------------------------------------------------

    def method(self, name: str):
        if name not in names():
            needs = next((m.needs_env for m in ALL_METHODS if m.name == name), "")
            raise UIError(f"method {name!r} needs {needs} set when the server starts (a checkpoint path or Hub id)"
                          if needs else f"unknown method {name!r}; choose from {', '.join(names())}")
        with self._load_lock:
            if name not in self._methods:
                self._methods[name] = spec(name).load(self.explorer)
            return self._methods[name]

    def attribute(self, query: q.Query, name: str, k, mode: str = "fast", progress=None,
                  track: list[int] | None = None) -> dict:
        """The top ``k`` of one method as JSON; ``track``: rows whose rank (1 = top) is added as ``tracked``."""
        n = len(self.explorer.dataset)
        k = as_int(k, "K", 1, min(MAX_K, n))
        if mode not in ("fast", "exact"):
            raise UIError(f"mode must be fast or exact, got {mode!r}")
        method = self.method(name)
        t0 = time.perf_counter()
        if spec(name).uses_unet:
            with self.lock.request():
                ranking = method.score(query, mode, progress=progress)
        else:
            ranking = method.score(query, mode)
        out = ranking.to_json(query.describe(), self.explorer.dataset.captions, k)
        out["wall_seconds"] = time.perf_counter() - t0
        out["label"] = spec(name).label
        out["settings"] = method.settings()  # what the ranking was made with (its settings, a hash of its tables)
        if track:
            where = torch.empty(n, dtype=torch.long)
            where[ranking.order] = torch.arange(1, n + 1)
            out["tracked"] = {str(int(i)): int(where[int(i)]) for i in track}
        return out

    def recustomize(self, item: dict, method: str, k) -> tuple[list, str]:
        """Remove and regenerate on a customized-model example: its fine-tune re-run from the base without the
        exemplars among ``method``'s top ``k`` (seconds to minutes; cached). (tiles, metrics markdown)."""
        from abu_explorer.evaluation import customized as cz

        src = item.get("source", {})
        if src.get("type") != "customized":
            raise UIError("remove and re-customize works on the customized-model examples; pick one above")
        ranking = item["rankings"].get(method)
        if ranking is None:
            raise UIError(f"no ranking of {method!r} in this example")
        k = as_int(k, "K", 1, len(ranking["results"]))
        removed = [r["index"] for r in ranking["results"][:k]]
        with self.lock.request():
            r = cz.recustomize(self.explorer, src["concept"], Path(item["folder"]) / "customized", removed,
                               src["prompt"], src["seed"])
        folder = Path(item["folder"]) / "customized" / src["concept"]["id"] / "removed" / r["key"]
        tiles = [(Image.open(folder / f).convert("RGB").resize((160, 160), Image.Resampling.NEAREST), label)
                 for f, label in (("original.png", "customized on every exemplar"),
                                  ("regenerated.png", f"re-customized without {len(r['removed'])} exemplar(s)"))]
        text = (f"**dL** {r['delta_loss']:+.4f} ({r['loss_original']:.4f} -> {r['loss_counterfactual']:.4f}) · "
                f"**dG-MSE** {r['delta_g_mse']:.4f} · **dG-CLIP** {r['delta_g_clip']:.3f}  \n"
                f"{spec(method).label}'s top-{k} held {len(r['removed'])} of the {r['kept_exemplars'] + len(r['removed'])}"
                f" exemplars; {len(r['ignored'])} pretraining image(s) among them stay (a fine-tune cannot unlearn "
                "its base's data).")
        return tiles, text

    def model_hashes(self) -> dict:
        from abu_explorer.model.backend import provenance

        return provenance(self.explorer)

    def method_settings(self) -> dict:
        """Each loaded method's settings and tables hash (what its rankings were made with)."""
        return {name: m.settings() for name, m in list(self._methods.items())}

    def tiles(self, result: dict, size: int = 128, marks: dict | None = None,
              extra: dict | None = None) -> list[tuple[Image.Image, str]]:
        """Gallery tiles of a ranking; ``marks`` {index: (colour, label)} frames the known answers; ``extra``
        {index: (image, caption)} holds rows that are not training rows (a customized model's exemplars)."""
        ds, out = self.explorer.dataset, []
        for r in result["results"]:
            source = extra[r["index"]][0] if extra and r["index"] in extra else ds.image(r["index"])
            img = source.resize((size, size), Image.Resampling.NEAREST)
            text = f"#{r['rank']} {r['caption']} (idx {r['index']}, score {r['score']:.3g})"
            if marks and r["index"] in marks:
                colour, tag = marks[r["index"]]
                ImageDraw.Draw(img).rectangle([0, 0, size - 1, size - 1], outline=colour, width=max(3, size // 24))
                text = f"[{tag}] " + text
            out.append((img, text))
        return out

    def training_image(self, index: int, size: int = 256) -> tuple[Image.Image, str]:
        n = len(self.explorer.dataset)
        index = as_int(index, "index", 0, n - 1)
        img, caption = self.explorer.training_example(index)
        return img.resize((size, size), Image.Resampling.NEAREST), caption

    # --- remove and regenerate ------------------------------------------------------------------------

    def counterfactual_key(self, query: q.Query, method: str, k: int, draw: int = 0) -> str:
        """The evaluation's key: the same exact-mode removal, so a committed result is found here."""
        from abu_explorer.attribution.settings import variant

        base, old = variant(method)  # "abu@before": AbU's cells with the settings its tuning replaced
        if method not in self._removal_settings:
            ranker = None if base in counterfactual.UNRANKED else \
                spec(base).load(self.explorer, **old) if old else self.method(base)
            self._removal_settings[method] = counterfactual.removal_settings(self.explorer, base, ranker)
        return counterfactual.request_key(self.explorer, query, base, k, draw, self.recipe,
                                          self._removal_settings[method])

    def cached_counterfactual(self, query: q.Query, method: str, k: int, draw: int = 0) -> dict | None:
        return self.result_for_key(self.counterfactual_key(query, method, k, draw))

    def result_folder(self, key: str) -> Path | None:
        """A finished result's folder, this machine kind's first, else another kind's; or None."""
        return counterfactual.find_result(self.results_dir, key)

    def result_for_key(self, key: str) -> dict | None:
        """A finished result (result.json is written last: its PNGs are complete), or None."""
        folder = self.result_folder(key)
        if folder is None:
            return None
        from abu_explorer.artifacts import load_json

        return load_json(folder / "result.json")

    def original_image(self, key: str, size: int = 192) -> Image.Image | None:
        """The original generation of a finished result, or None."""
        folder = self.result_folder(key)
        path = None if folder is None else folder / "original.png"  # generated queries only
        if path is None or not path.exists():
            return None
        img = Image.open(path).convert("RGB")
        return img.resize((size, size), Image.Resampling.NEAREST)

    def submit_counterfactual(self, query: q.Query, method: str, k, draw: int = 0, owner: str = ""):
        """Queue (or find) the job; the random control is the same call with method 'random'."""
        if self.explorer.retrain_note:
            raise UIError(self.explorer.retrain_note)
        n = len(self.explorer.dataset)
        k = as_int(k, "K", 1, n - 1)  # a retrain needs at least one image
        if method not in names():
            raise UIError(f"unknown method {method!r}")
        key = self.counterfactual_key(query, method, k, draw)
        label = f"remove top-{k} of {spec(method).label}" if method != "random" else f"remove {k} random images"

        def work(progress):
            ranker = None if method == "random" else self.method(method)  # the app's instance and settings
            return counterfactual.run(self.explorer, query, method, k, self.results_dir, self.recipe, draw=draw,
                                      progress=False, on_epoch=lambda e, total, log: progress(e, total),
                                      lock=self.lock, ranker=ranker, threads=self.retrain_threads)

        return self.jobs.submit(key, label, work, owner)

    def request_counterfactual(self, query: q.Query, method: str, k, owner: str = "") -> list[str]:
        """The tab's request: the method's top-K and K random images (the control), each queued unless its
        result is cached (committed results of any machine count) or its job is already on the server.
        Both jobs pass the admission caps together or neither is queued. Returns the two result keys."""
        if self.explorer.retrain_note:
            raise UIError(self.explorer.retrain_note)
        k = as_int(k, "K", 1, len(self.explorer.dataset) - 1)
        if method == "random":
            raise UIError("pick an attribution method: K random images are always removed next to it")
        keys = [self.counterfactual_key(query, m, k) for m in (method, "random")]
        todo = [(m, key) for m, key in zip((method, "random"), keys)
                if self.result_for_key(key) is None and not (self.jobs.get(key) and self.jobs.get(key).active)]
        self.jobs.admit(owner, len(todo))
        for m, _ in todo:
            self.submit_counterfactual(query, m, k, owner=owner)
        return keys

    def queue_note(self, key: str) -> str:
        """Where a queued job stands: its place in the queue and the estimated start ("" when not queued)."""
        pos = self.jobs.position(key)
        if not pos:
            return ""
        wait = self.jobs.expected_start_seconds(key, self.jobs.typical_seconds(self.explorer.meta["unet"]["log"]["seconds"]))
        return f"number {pos} in the queue, starts in about {wait / 60:.0f} min"

    def counterfactual_view(self, result: dict, size: int = 192) -> tuple[Image.Image | None, str]:
        """(regenerated image or None, metrics markdown) of a finished result."""
        folder = self.result_folder(result["key"])
        img = None
        if folder is not None and (folder / "regenerated.png").exists():
            img = Image.open(folder / "regenerated.png").convert("RGB").resize((size, size), Image.Resampling.NEAREST)
        lines = [f"**dL** {result['delta_loss']:+.4f} ({result['loss_original']:.4f} -> {result['loss_counterfactual']:.4f})"]
        if "delta_g_mse" in result:
            lines.append(f"**dG-MSE** {result['delta_g_mse']:.4f} · **dG-CLIP** {result['delta_g_clip']:.3f}")
        on = result.get("trained_on", {})
        where = f" on {on.get('cpu_model', '')} ({on.get('kind') or on.get('device', '')})" if on else ""
        lines.append(f"retrained{where} in {result['train_seconds'] / 60:.1f} min without: "
                     + ", ".join(result["removed_captions"][:8]) + (" ..." if result["k"] > 8 else ""))
        floor = counterfactual.floor_delta(self.explorer, self.results_dir, result["query"], on.get("kind", ""),
                                           self.recipe) if on.get("kind") else None
        if floor is not None:  # what a retrain on every row gives on that kind: the part of dL no removal made
            lines.append(f"a retrain on every row (K = 0) on that kind: dL {floor:+.4f}, so the removal adds "
                         f"{result['delta_loss'] - floor:+.4f}")
        return img, "  \n".join(lines)
