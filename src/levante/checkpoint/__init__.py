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
from levante.checkpoint.state import load_latest, save_checkpoint
from levante.checkpoint.verify import checksum_problem, newest_valid, write_checksums

__all__ = [
    "CHECKSUMS", "CONFIG_FILE", "MODEL_FILE", "TOKENIZER_FILE", "TRAINER_JSON", "checkpoints_root",
    "checksum_problem", "claim_run_dir", "list_checkpoints", "load_latest", "newest_valid",
    "refuse_non_empty", "run_step", "save_checkpoint", "write_checksums",
]
