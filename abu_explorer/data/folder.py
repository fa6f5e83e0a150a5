"""A researcher's own data, in one of two layouts (row order = training index in both):

- the Hugging Face ``imagefolder`` convention: ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}``
  line per image, in training order (files may sit in subfolders); ``text`` may be a list of captions (as
  MSCOCO's five), over which every loss then averages;
- ``NAME.png`` (or .jpg/.webp/.bmp) beside ``NAME.txt`` holding its caption, rows sorted by file name.

Every image passes through ``model_image`` (alpha on white, shorter side resized, centre crop): the same
policy as uploads and their previews.

With ``store`` (a folder), the rendered images are written there chunk by chunk as ``images.npy`` and
memory-mapped, so N x H x W x 3 bytes live on disk, not in RAM; a second load reuses them while every
file's path, size and modification time and every caption are unchanged (``images.json`` records them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .. import artifacts
from .dataset import DataConfig, Dataset, content_hash, model_image

EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image_folder(folder: str | Path, image_size: int = 32, flip: bool = False, store: str | Path | None = None,
                      chunk: int = 1024, progress: bool = False, extra: str | Path | None = None) -> Dataset:
    """``extra``: a second folder whose rows follow the first's (a customized model's exemplars after its
    pretraining data; their codes start with ``extra:``)."""
    rows, codes = _folder_rows(Path(folder))
    if extra:
        more, more_codes = _folder_rows(Path(extra))
        rows, codes = rows + more, codes + [f"extra:{c}" for c in more_codes]
    lists = [c for _, c in rows]
    captions = [c[0] for c in lists]
    lists = lists if any(len(c) > 1 for c in lists) else None  # one caption each: the plain layout
    config = DataConfig(source=f"folder:{Path(folder).name}" + (f"+{Path(extra).name}" if extra else ""),
                        image_size=image_size, flip=flip)
    if store is None:
        arr = np.stack([_read(p, image_size) for p, _ in rows])
        return Dataset(arr, captions, codes, config, content_hash(arr, captions, lists), lists)
    arr, digest = _stored_images(rows, image_size, Path(store), chunk, progress, captions, lists)
    return Dataset(arr, captions, codes, config, digest, lists)


def _folder_rows(folder: Path) -> tuple[list[tuple[Path, list[str]]], list[str]]:
    """(path, captions) of each row, and each row's code (its path in the folder, or its stem)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    imagefolder = (folder / "metadata.jsonl").exists()
    rows = _metadata_rows(folder) if imagefolder else _caption_file_rows(folder)
    return rows, [p.relative_to(folder.resolve()).as_posix() if imagefolder else p.stem for p, _ in rows]


def _stored_images(rows, size: int, store: Path, chunk: int, progress: bool, captions, lists):
    """The rendered images as a memory-mapped array in ``store`` (rendered in chunks when missing or stale)."""
    key = _fingerprint(rows, size)
    meta_path, npy = store / "images.json", store / "images.npy"
    if meta_path.exists() and npy.exists():
        meta = artifacts.load_json(meta_path)
        if meta.get("fingerprint") == key:
            return artifacts.load_npy(npy, mmap=True), meta["content_hash"]
    from tqdm.auto import tqdm

    with artifacts.NpyWriter(npy, (len(rows), size, size, 3), np.uint8) as out:
        for start in tqdm(range(0, len(rows), chunk), desc="render image folder", disable=not progress):
            block = rows[start:start + chunk]
            out[start:start + len(block)] = np.stack([_read(p, size) for p, _ in block])
    arr = artifacts.load_npy(npy, mmap=True)
    digest = content_hash(arr, captions, lists)
    artifacts.save_json(meta_path, {"fingerprint": key, "content_hash": digest, "rows": len(rows), "image_size": size})
    return arr, digest


def _fingerprint(rows, size: int) -> str:
    """What the rendered array depends on: each file's path, size and mtime, its captions, the resolution."""
    h = hashlib.sha256(f"model_image/{size}".encode())
    for path, texts in rows:
        st = path.stat()
        h.update(f"\x1e{path}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1f{'|'.join(texts)}".encode("utf-8"))
    return h.hexdigest()[:16]


def _captions(text, where: str) -> list[str]:
    texts = text if isinstance(text, list) else [text]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f'{where}: "text" must be a non-empty caption or a non-empty list of them')
    return [t.strip().lower() for t in texts]


def _metadata_rows(folder: Path) -> list[tuple[Path, list[str]]]:
    rows, seen = [], set()
    meta = folder / "metadata.jsonl"
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("file_name"), str) or "text" not in d:
            raise ValueError(f'{meta}:{n}: each line needs "file_name" (a path) and "text" (its caption)')
        text = _captions(d["text"], f"{meta}:{n}")
        path = (folder / d["file_name"]).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{meta}:{n}: {d['file_name']} lies outside the folder")
        if not path.is_file():
            raise ValueError(f"{meta}:{n}: image {d['file_name']} not found")
        if path in seen:
            raise ValueError(f"{meta}:{n}: {d['file_name']} is listed twice")
        seen.add(path)
        rows.append((path, text))
    if not rows:
        raise ValueError(f"{meta}: no images listed")
    return rows


def _caption_file_rows(folder: Path) -> list[tuple[Path, list[str]]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTS)
    if not files:
        raise ValueError(f"{folder}: no images (.png/.jpg/.webp/.bmp) and no metadata.jsonl found")
    rows = []
    for p in files:
        txt = p.with_suffix(".txt")
        if not txt.exists():
            raise ValueError(f"{p}: missing caption file {txt.name}")
        rows.append((p, _captions(txt.read_text(encoding="utf-8"), str(txt))))
    return rows


def _read(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(model_image(im, size), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
