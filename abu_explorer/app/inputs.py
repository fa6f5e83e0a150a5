"""What the page sends, checked: numbers, boxes, uploads; and the box drawn on the query image.

Every check raises ``UIError`` with one line the page shows as is.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from abu_explorer.attribution import query as q

SHOW = 256  # display size of the query image (the model's 32 px, nearest-upscaled)


class UIError(ValueError):
    """Bad input from the page; shown to the user as is."""



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


MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096


def open_image(image) -> Image.Image:
    """A PIL image, or a path to one (uploads arrive as paths): unreadable or giant files are a readable error."""
    import os

    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height)
        return image
    try:
        if os.path.getsize(image) > MAX_UPLOAD_BYTES:
            raise UIError(f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MB; the model sees 32x32 pixels anyway")
        with Image.open(image) as im:
            _check_pixels(im.width, im.height)  # before decoding: the header gives the size
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, UIError):
            raise
        raise UIError(f"cannot read the uploaded file as an image: {e}") from None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_UPLOAD_PIXELS:
        raise UIError(f"the upload is {width}x{height} pixels, over the {MAX_UPLOAD_PIXELS:,}-pixel limit")


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


def dragged_box(annotation, display: int, image_size: int):
    """The box dragged on the annotator (display pixels; the last one drawn) -> a box in image pixels, or
    None when none (or none of any area) is drawn. Corners are clamped to the image and rounded to whole pixels."""
    boxes = (annotation or {}).get("boxes") or []
    if not boxes:
        return None
    b = boxes[-1]
    s = image_size / display

    def px(v):
        return min(image_size, max(0, round(float(v) * s)))

    x0, x1 = sorted((px(b["xmin"]), px(b["xmax"])))
    y0, y1 = sorted((px(b["ymin"]), px(b["ymax"])))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None  # a click, or a drag still under way


def as_int(value, name: str, lo: int, hi: int) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a whole number, got {value!r}") from None
    if v != int(v) or not lo <= v <= hi:
        raise UIError(f"{name} must be a whole number in [{lo}, {hi}], got {value}")
    return int(v)


def as_float(value, name: str, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a number, got {value!r}") from None
    if not lo <= v <= hi:
        raise UIError(f"{name} must be in [{lo}, {hi}], got {value}")
    return v
