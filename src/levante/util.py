"""Small shared helpers: atomic, durable file writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def staged_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `dst`; on success it is fsynced and replaces `dst` in one rename, so
    readers see the old directory or the complete new one, never a half-written one."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        fsync_dir(tmp, strict=True)
        old = None
        if dst.is_dir() and any(dst.iterdir()):
            # rename() cannot replace a non-empty dir: move the old one aside, swap, then delete it.
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
        os.replace(tmp, dst)
        fsync_dir(dst.parent, strict=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_device(name: str = "auto"):
    """A torch.device from "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; LevanteError if
    CUDA is asked for and absent."""
    import torch

    from levante.errors import LevanteError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LevanteError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LevanteError(f"device {name!r} asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise LevanteError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
