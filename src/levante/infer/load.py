"""Load a checkpoint for inference: the model on its device and the tokenizer it was trained with."""

from __future__ import annotations

from pathlib import Path

from levante.checkpoint.resolve import resolve_checkpoint
from levante.errors import LevanteError
from levante.tokenizer import LevanteTokenizer
from levante.util import resolve_device


def load_for_inference(path: str | Path, device: str = "auto"):
    """(model, tokenizer, checkpoint dir) from a checkpoint dir, run dir or HF DeepseekV3 dir."""
    ckpt = resolve_checkpoint(path)  # path mistakes are reported before torch is even imported
    tokenizer_file = ckpt.path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise LevanteError(f"{ckpt.path} has no tokenizer.json: cannot turn text into tokens")
    tokenizer = LevanteTokenizer(tokenizer_file)
    device = resolve_device(device)
    from levante.interop.load import from_pretrained

    model = from_pretrained(ckpt.path, device=device)
    return model, tokenizer, ckpt.path
