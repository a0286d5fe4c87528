"""Small shared helpers: atomic, durable file writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: str | Path, *, strict: bool = False) -> None:
    """Make a rename inside `path` durable.

    A no-op where directories cannot be opened (Windows). A failing fsync is ignored unless
    `strict`, in which case it raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file that someone else wrote and closed (e.g. safetensors' save_file) to disk."""
    with open(path, "rb+") as f:  # writable: Windows refuses to fsync a read-only handle
        os.fsync(f.fileno())


def write_durable(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path`, flush and fsync; no rename.

    For files inside a temp directory that is itself renamed into place once complete.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
