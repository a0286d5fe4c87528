"""Checksums and the one rule for trusting a checkpoint, used by resume and by `from_pretrained`.

The rule: a checkpoint whose `checksums.json` lists a file that is missing, of the wrong size or
with the wrong sha256 is refused (discovery skips it, with a warning naming it, for the newest
older one that verifies). A checkpoint without `checksums.json` was not written by Levante (its
writers always write one, last, before the atomic rename): it is loaded with a warning, since there
is nothing to verify it against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from levante.checkpoint.layout import CHECKSUMS, list_step_dirs
from levante.errors import LevanteError
from levante.util import file_sha256, write_durable

log = logging.getLogger("levante")

FORMAT_VERSION = 1


def write_checksums(directory: Path, names: list[str] | None = None) -> None:
    """checksums.json: sha256 and size of `names` (default: every other file in `directory`)."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)
    files = {name: {"sha256": file_sha256(directory / name), "size": (directory / name).stat().st_size}
             for name in names}
    write_durable(directory / CHECKSUMS, json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1))


def checksum_problem(path: str | Path, required: tuple[str, ...] = (),
                     hash_only: set[str] | None = None) -> str | None:
    """Why `path` fails its checksums.json, or None if it verifies (or has none: see the module rule).

    `required` files must be listed. With `hash_only`, other files are checked by size alone (an
    inference load need not hash an optimizer state twice the model's size).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / CHECKSUMS).is_file():
        log.warning("%s has no %s: loading it unverified", path, CHECKSUMS)
        return None
    try:
        files = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))["files"]
        for name in required:
            if name not in files:
                return f"{name} not listed in {CHECKSUMS}"
        for name, info in files.items():
            file = path / name
            if Path(name).name != name or not file.is_file():
                return f"{name} missing"
            size = file.stat().st_size
            if size != info["size"]:
                return f"{name} is {size} bytes, expected {info['size']} (truncated?)"
            if (hash_only is None or name in hash_only) and file_sha256(file) != info["sha256"]:
                return f"{name} sha256 mismatch (corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable checksums ({type(e).__name__}: {e})"
    return None


def newest_valid(root: Path, is_candidate=lambda d: True, **check) -> Path | None:
    """The newest `step_N` under `root` that passes `checksum_problem`; None when there are none.

    Failing ones are skipped with a warning; LevanteError when some exist but none verifies.
    """
    candidates = [d for d in list_step_dirs(root) if is_candidate(d)]
    failures = []
    for d in candidates:
        problem = checksum_problem(d, **check)
        if problem is None:
            return d
        log.warning("skipping checkpoint %s: %s", d, problem)
        failures.append(f"{d.name}: {problem}")
    if failures:
        raise LevanteError(f"no valid checkpoint in {root} ({len(failures)} corrupt; newest {failures[0]})")
    return None
