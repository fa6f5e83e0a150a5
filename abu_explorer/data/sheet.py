"""Contact sheets: a grid of images, each upscaled (nearest) with its caption underneath."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from abu_explorer import artifacts


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 10, scale: int = 3,
         caption_lines: int = 2, font_size: int = 11) -> Image.Image:
    """Tiles of ``scale``x nearest-upscaled images; captions wrapped under each tile."""
    if not images:
        raise ValueError("no images to draw")
    w, h = images[0].size
    tw, th = w * scale, h * scale
    cap_h = (font_size + 2) * caption_lines + 4 if captions else 0
    pad = 6
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(font_size)
    chars = max(6, int(tw / (font_size * 0.55)))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), pad + r * (th + cap_h + pad)
        sheet.paste(img.resize((tw, th), Image.Resampling.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + th + 2 + j * (font_size + 2)), line, fill=(40, 40, 40), font=font)
    return sheet


def dataset_sheet(ds, path: Path, count: int = 120, cols: int = 12) -> None:
    idx = np.linspace(0, len(ds) - 1, count).round().astype(int)
    img = grid([ds.image(int(i)) for i in idx], [f"{i}: {ds.captions[i]}" for i in idx], cols=cols)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    artifacts.save_png(path, img)
