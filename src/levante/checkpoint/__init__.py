"""Checkpoints: the run-directory layout, the trust rule (checksums), saving and exact resume."""

from levante.checkpoint.layout import (
    CHECKSUMS,
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TRAINER_JSON,
    checkpoints_root,
    claim_run_dir,
    list_checkpoints,
    refuse_non_empty,
    run_step,
)
from levante.checkpoint.verify import checksum_problem, newest_valid, write_checksums


def __getattr__(name):
    # The torch-heavy writer loads on first use: resolving a path (eval, generate, serve) stays instant.
    if name in ("load_latest", "save_checkpoint"):
        from levante.checkpoint import state

        return getattr(state, name)
    raise AttributeError(f"module 'levante.checkpoint' has no attribute {name!r}")


__all__ = [
    "CHECKSUMS", "CONFIG_FILE", "MODEL_FILE", "TOKENIZER_FILE", "TRAINER_JSON", "checkpoints_root",
    "checksum_problem", "claim_run_dir", "list_checkpoints", "load_latest", "newest_valid",
    "refuse_non_empty", "run_step", "save_checkpoint", "write_checksums",
]
