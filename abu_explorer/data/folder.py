"""A researcher's own data: a folder of ``NAME.png`` (or .jpg/.webp/.bmp) with ``NAME.txt`` captions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import DataConfig, Dataset, content_hash, model_image


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
        try:
            with Image.open(p) as im:
                images.append(np.asarray(model_image(im, image_size), dtype=np.uint8))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{p}: not a readable image ({e})") from None
        captions.append(txt.read_text(encoding="utf-8").strip().lower())
        codes.append(p.stem)
    arr = np.stack(images)
    config = DataConfig(source=f"folder:{folder.name}", image_size=image_size, flip=flip)
    return Dataset(arr, captions, codes, config, content_hash(arr, captions))
