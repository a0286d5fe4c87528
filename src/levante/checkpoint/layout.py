"""Where checkpoints live in a run directory, which of them count, and whether a directory holds a run.

    <run>/config.toml            the run's full config
    <run>/metrics.jsonl          one JSON object per logged step / eval (rank 0 only)
    <run>/checkpoints/step_<NNNNNNNN>/   one finished checkpoint per saved step

A checkpoint is written under a name containing `.tmp-` and renamed into place once complete, so
any `step_N` directory is a finished write; names containing `.tmp-` are unfinished writes or
deletions and are cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from levante.errors import LevanteError

MODEL_FILE = "model.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
TRAINER_JSON = "trainer.json"
CHECKSUMS = "checksums.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_MARK = ".tmp-"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def list_step_dirs(root: Path) -> list[Path]:
    """Finished `step_N` directories under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint directories of a run, newest first."""
    return list_step_dirs(checkpoints_root(run_dir))


def remove_dir(path: Path) -> None:
    """Delete a directory; renamed to a tmp name first, so a crash mid-delete leaves no `step_N`."""
    doomed = path.with_name(f"{path.name}{TMP_MARK}del-{os.getpid()}")
    try:
        path.rename(doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def clean_tmp(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if TMP_MARK in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------- runs are never destroyed


def run_step(run_dir: str | Path) -> int | None:
    """The step a directory's run reached (its newest checkpoint, else its last logged step, else 0),
    or None when the directory holds no run (no checkpoints, no metrics.jsonl)."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return step_of(ckpts[0])
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return None
    step = 0
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):
            continue
    return step


def claim_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a directory that holds one, unless told to resume or replace.

    With `overwrite`, the old run's checkpoints and metrics are deleted before anything is written.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LevanteError(f"run directory {run_dir} is a file")
    if resume and overwrite:
        raise LevanteError("--resume and --overwrite contradict each other: choose one")
    step = run_step(run_dir)
    if step is None or resume:
        return
    if not overwrite:
        raise LevanteError(f"{run_dir} holds a run at step {step}; use --resume to continue or "
                           "--overwrite to replace it")
    root = checkpoints_root(run_dir)
    for path in list_step_dirs(root):
        remove_dir(path)
    clean_tmp(root)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def refuse_non_empty(out_dir: str | Path, overwrite: bool, what: str = "output directory") -> None:
    """The rule for every verb that writes a directory: a non-empty one is replaced only with
    --overwrite (the caller then writes into a staged directory that replaces it in one rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LevanteError(f"{what} {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LevanteError(f"{what} {out_dir} is not empty; use --overwrite to replace it")
