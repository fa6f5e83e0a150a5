"""Safe, atomic artifact I/O: safetensors, .npy without pickle, JSON. Nothing here unpickles."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


class ArtifactError(RuntimeError):
    """A missing, corrupt or mismatched artifact. The message names the path and how to rebuild it."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path: Path, obj) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
    _atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock beside ``path`` (``.NAME.lock``), for processes that update one file in turn."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claimed(path: Path, wait: bool = False):
    """Try to claim the work that ends in ``path`` for this process (a lock, ``.NAME.claim``, held until the
    block ends); yields False where another process holds it, so that one skips it instead of doing it twice
    (``wait``: block until the holder is done instead, then yield True). The holder re-checks ``path`` itself:
    the work may have been finished before the claim."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.claim", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def held(path: Path) -> bool:
    """Whether another process holds the claim on ``path`` now (see ``claimed``); creates nothing."""
    path = Path(path)
    if not (path.parent / f".{path.name}.claim").exists():
        return False
    with claimed(path) as mine:
        return not mine


def save_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def save_png(path: Path, image) -> None:
    _atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_figure(path: Path, fig) -> None:
    """A matplotlib figure as PNG, atomically (a reader never sees half a plot)."""
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))


def save_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


def load_json(path: Path, hint: str = "") -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}" + (f"; build it with: {hint}" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"corrupt JSON artifact {path}: {e}") from e


def save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def load_npy(path: Path, hint: str = "", mmap: bool = False) -> np.ndarray:
    """An ``.npy`` array (never pickled objects). ``mmap=True`` maps it copy-on-write instead of reading it:
    pages come from disk as rows are touched, and writes never reach the file."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}" + (f"; build it with: {hint}" if hint else ""))
    try:
        return np.load(path, allow_pickle=False, mmap_mode="c" if mmap else None)
    except (ValueError, OSError, EOFError) as e:  # truncated, or not an .npy file
        raise ArtifactError(f"corrupt artifact {path} ({e})" + (f"; rebuild it with: {hint}" if hint else "")) from None


class NpyWriter:
    """Write an ``.npy`` array chunk by chunk (for tables larger than RAM): rows go into a memory-mapped
    temporary file beside ``path``; ``commit()`` flushes it and renames it into place (atomic), ``abort()``
    (or leaving the ``with`` block by an exception) removes it."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=tuple(shape))

    def __setitem__(self, index, value) -> None:
        self.array[index] = value

    def commit(self) -> None:
        self.array.flush()
        del self.array
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    _atomic_write(path, lambda f: f.write(blob))


def load_safetensors(path: Path, hint: str = "") -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}" + (f"; build it with: {hint}" if hint else ""))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ArtifactError(f"corrupt artifact {path} ({type(e).__name__}: {e})"
                            + (f"; rebuild it with: {hint}" if hint else "")) from None


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def folder_hash(folder: Path) -> str:
    """Hash of every file's name and content in ``folder`` (a method's tables), or "" where it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tmp")):
        h.update(f"{path.name}:{file_hash(path)}\n".encode())
    return h.hexdigest()[:16]


def state_hash(state: dict) -> str:
    """Hash of a state dict's names, shapes and values (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]
