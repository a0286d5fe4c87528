"""What a path given to eval / generate / export / serve / `from_pretrained` points at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from levante.checkpoint.layout import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, TRAINER_JSON, checkpoints_root
from levante.checkpoint.verify import checksum_problem, newest_valid
from levante.errors import LevanteError

# An inference load hashes what it reads; the optimizer state (twice the model) is checked by size.
_READ_BY_LOADS = {MODEL_FILE, CONFIG_FILE, TRAINER_JSON, TOKENIZER_FILE}


@dataclass
class Checkpoint:
    kind: str  # "levante" or "hf"
    path: Path


def is_levante_checkpoint(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() and (d / CONFIG_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A Levante checkpoint dir, a run dir (its newest valid checkpoint), or a DeepseekV3 HF dir."""
    path = Path(path)
    if not path.exists():
        raise LevanteError(f"checkpoint path not found: {path}")
    if not path.is_dir():
        raise LevanteError(f"{path} is a file; expected a checkpoint directory")
    check = dict(required=(MODEL_FILE,), hash_only=_READ_BY_LOADS)
    if is_levante_checkpoint(path):
        problem = checksum_problem(path, **check)
        if problem:
            raise LevanteError(f"checkpoint failed verification: {path}: {problem}")
        return Checkpoint("levante", path)
    if (path / "config.json").is_file():
        return Checkpoint("hf", path)
    for root in (checkpoints_root(path), path):
        found = newest_valid(root, is_candidate=is_levante_checkpoint, **check)
        if found is not None:
            return Checkpoint("levante", found)
    if (path / CONFIG_FILE).is_file():
        raise LevanteError(f"{path} has a config but no {MODEL_FILE} and no checkpoints/step_*/ to load")
    raise LevanteError(f"{path} is not a model directory: expected a Levante checkpoint ({MODEL_FILE} + "
                       f"{CONFIG_FILE}), a run dir with checkpoints/step_*/, or a DeepseekV3 dir with "
                       "config.json")
