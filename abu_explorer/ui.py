"""What the web app does, without Gradio: queries, attribution per method, tiles, remove-and-regenerate.

``app.py`` only wires Gradio events to an ``ExplorerApp``; everything here is tested directly. One lock
guards the shared UNet: AbU and IF move its weights while they score, so generation, the gradient methods
and the counterfactual measurements take turns; the nearest-neighbour methods never touch it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageDraw

from . import counterfactual, train
from .attribution import SERVING_OPTIONS, get_method
from .attribution import query as q
from .jobs import JobQueue

ORDER = ("abu", "if", "dtrak", "clip", "pixel", "random")
LABELS = {"abu": "AbU (unlearning)", "if": "Influence (EK-FAC)", "dtrak": "D-TRAK", "clip": "CLIP NN",
          "pixel": "Pixel NN", "random": "Random"}
USES_UNET = {"abu", "if", "dtrak"}
MAX_K = 50
# AbU's default batch of 256 (query gradient and rescoring) adds ~1 GB to the peak RSS (a load test peaked at
# 3.5 GB with it, 1.65 GB without); 64 is as fast here. Scores do not depend on the batch size (tested).
SHOW = 256  # display size of the query image (the model's 32 px, nearest-upscaled)


class UIError(ValueError):
    """Bad input from the page; shown to the user as is."""


class ExplorerApp:
    def __init__(self, explorer, results_dir: Path, recipe: train.StageConfig = train.UNET_RECIPE):
        self.explorer = explorer
        self.results_dir = Path(results_dir)
        self.recipe = recipe
        self.lock = threading.RLock()  # the shared UNet
        self._load_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._methods: dict = {}
        self._queries: OrderedDict = OrderedDict()  # (prompt, seed, steps, guidance) -> Generation
        self.jobs = JobQueue()
        explorer.training_cache()  # shared by every gradient method and by retraining

    # --- queries ------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.explorer.dataset.config.image_size

    def generate(self, prompt: str, seed, steps, guidance, progress=None):
        prompt = (prompt or "").strip()
        if not prompt:
            raise UIError("type a prompt first")
        seed, steps = _int(seed, "seed", 0, 2**31 - 1), _int(steps, "steps", 1, 200)
        guidance = _float(guidance, "guidance", 0.0, 15.0)
        key = (prompt, seed, steps, guidance)
        with self._cache_lock:  # light events read the cache from several threads, never behind the UNet
            if key in self._queries:
                self._queries.move_to_end(key)
                return self._queries[key]
        with self.lock:
            g = self.explorer.generate(prompt, seed, steps, guidance, callback=progress)
        with self._cache_lock:
            self._queries[key] = g
            while len(self._queries) > 64:
                self._queries.popitem(last=False)
        return g

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
            img = open_image(source["image"]).convert("RGB").resize((self.image_size, self.image_size),
                                                                    Image.Resampling.BOX)
        else:
            img = self.generate(source.get("prompt"), source.get("seed"), source.get("steps"),
                                source.get("guidance")).image
        return draw_box(img, parse_box(box, self.image_size), SHOW)

    # --- attribution ----------------------------------------------------------------------------------

    def method(self, name: str):
        if name not in ORDER:
            raise UIError(f"unknown method {name!r}; choose from {', '.join(ORDER)}")
        with self._load_lock:
            if name not in self._methods:
                self._methods[name] = get_method(name).load(self.explorer, **SERVING_OPTIONS.get(name, {}))
            return self._methods[name]

    def attribute(self, query: q.Query, name: str, k, mode: str = "fast", progress=None) -> dict:
        n = len(self.explorer.dataset)
        k = _int(k, "K", 1, min(MAX_K, n))
        if mode not in ("fast", "exact"):
            raise UIError(f"mode must be fast or exact, got {mode!r}")
        method = self.method(name)
        t0 = time.perf_counter()
        if name in USES_UNET:
            with self.lock:
                ranking = method.score(query, mode, progress=progress)
        else:
            ranking = method.score(query, mode)
        out = ranking.to_json(query.describe(), self.explorer.dataset.captions, k)
        out["wall_seconds"] = time.perf_counter() - t0
        out["label"] = LABELS[name]
        return out

    def tiles(self, result: dict, size: int = 128) -> list[tuple[Image.Image, str]]:
        ds = self.explorer.dataset
        return [(ds.image(r["index"]).resize((size, size), Image.Resampling.NEAREST),
                 f"#{r['rank']} {r['caption']} (idx {r['index']}, score {r['score']:.3g})")
                for r in result["results"]]

    def training_image(self, index: int, size: int = 256) -> tuple[Image.Image, str]:
        n = len(self.explorer.dataset)
        index = _int(index, "index", 0, n - 1)
        img, caption = self.explorer.training_example(index)
        return img.resize((size, size), Image.Resampling.NEAREST), caption

    # --- remove and regenerate ------------------------------------------------------------------------

    def counterfactual_key(self, query: q.Query, method: str, k: int, draw: int = 0) -> str:
        return counterfactual.request_key(self.explorer, query, method, k, draw, self.recipe)

    def cached_counterfactual(self, query: q.Query, method: str, k: int, draw: int = 0) -> dict | None:
        return self.result_for_key(self.counterfactual_key(query, method, k, draw))

    def result_for_key(self, key: str) -> dict | None:
        """A finished result (result.json is written last: its PNGs are complete), or None."""
        path = self.results_dir / key / "result.json"
        if path.exists():
            from .artifacts import load_json

            return load_json(path)
        return None

    def original_image(self, key: str, size: int = 192) -> Image.Image | None:
        """The original generation of a finished result, or None."""
        path = self.results_dir / key / "original.png"  # generated queries only
        if self.result_for_key(key) is None or not path.exists():
            return None
        img = Image.open(path).convert("RGB")
        return img.resize((size, size), Image.Resampling.NEAREST)

    def submit_counterfactual(self, query: q.Query, method: str, k, draw: int = 0):
        """Queue (or find) the job; the random control is the same call with method 'random'."""
        n = len(self.explorer.dataset)
        k = _int(k, "K", 1, n)
        if method not in ORDER:
            raise UIError(f"unknown method {method!r}")
        key = self.counterfactual_key(query, method, k, draw)
        label = f"remove top-{k} of {LABELS[method]}" if method != "random" else f"remove {k} random images"

        def work(progress):
            ranker = None if method == "random" else self.method(method)  # the app's instance and settings
            return counterfactual.run(self.explorer, query, method, k, self.results_dir, self.recipe, draw=draw,
                                      progress=False, on_epoch=lambda e, total, log: progress(e, total),
                                      lock=self.lock, ranker=ranker)

        return self.jobs.submit(key, label, work)

    def request_counterfactual(self, query: q.Query, method: str, k) -> list[str]:
        """The tab's request: the method's top-K and K random images (the control), each queued unless its
        result is cached or its job is already on the server. Returns the two result keys."""
        k = _int(k, "K", 1, len(self.explorer.dataset))
        if method == "random":
            raise UIError("pick an attribution method: K random images are always removed next to it")
        keys = []
        for m in (method, "random"):
            key = self.counterfactual_key(query, m, k)
            if self.result_for_key(key) is None:
                self.submit_counterfactual(query, m, k)
            keys.append(key)
        return keys

    def counterfactual_view(self, result: dict, size: int = 192) -> tuple[Image.Image | None, str]:
        """(regenerated image or None, metrics markdown) of a finished result."""
        folder = self.results_dir / result["key"]
        img = None
        if (folder / "regenerated.png").exists():
            img = Image.open(folder / "regenerated.png").convert("RGB").resize((size, size), Image.Resampling.NEAREST)
        lines = [f"**dL** {result['delta_loss']:+.4f} ({result['loss_original']:.4f} -> {result['loss_counterfactual']:.4f})"]
        if "delta_g_mse" in result:
            lines.append(f"**dG-MSE** {result['delta_g_mse']:.4f} · **dG-CLIP** {result['delta_g_clip']:.3f}")
        where = f" on {result['trained_on']['device']}" if "trained_on" in result else ""
        lines.append(f"retrained{where} in {result['train_seconds'] / 60:.1f} min without: "
                     + ", ".join(result["removed_captions"][:8]) + (" ..." if result["k"] > 8 else ""))
        return img, "  \n".join(lines)


# --- small helpers -----------------------------------------------------------------------------------


def parse_box(box, image_size: int):
    """None / all-empty -> whole image; else four numbers in image pixels, checked by ``query.box_mask``."""
    if box is None:
        return None
    values = list(box)
    if all(v is None or v == "" for v in values):
        return None
    if len(values) != 4 or any(v is None or v == "" for v in values):
        raise UIError("a box needs all four of x0, y0, x1, y1 (or none of them for the whole image)")
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UIError(f"box values must be numbers, got {values}") from None
    q.box_mask(box, image_size, 1)  # raises QueryError for zero area / outside
    return box


def open_image(image) -> Image.Image:
    """A PIL image, or a path to one (uploads arrive as paths): unreadable files are a readable error."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UIError(f"cannot read the uploaded file as an image: {e}") from None


def draw_box(image: Image.Image, box, size: int) -> Image.Image:
    scale = size / image.width
    big = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    if box is not None:
        x0, y0, x1, y1 = (v * scale for v in box)
        ImageDraw.Draw(big).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(230, 20, 60), width=3)
    return big


def clicks_to_box(first: tuple[float, float], second: tuple[float, float], display: int, image_size: int):
    """Two clicks on the displayed image (display pixels) -> a box in image pixels, corners in any order."""
    s = image_size / display
    (xa, ya), (xb, yb) = first, second
    x0, x1 = sorted((xa * s, xb * s))
    y0, y1 = sorted((ya * s, yb * s))
    return (round(x0), round(y0), round(x1), round(y1))


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a whole number, got {value!r}") from None
    if v != int(v) or not lo <= v <= hi:
        raise UIError(f"{name} must be a whole number in [{lo}, {hi}], got {value}")
    return int(v)


def _float(value, name: str, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a number, got {value!r}") from None
    if not lo <= v <= hi:
        raise UIError(f"{name} must be in [{lo}, {hi}], got {value}")
    return v
