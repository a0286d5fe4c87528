"""Library entry points behind `levante eval` and `levante generate`: checkpoint + tokenizer + data."""

from __future__ import annotations

import tempfile
from pathlib import Path

from levante.data.loader import language_eval_windows
from levante.data.shards import open_shards, tokenize_corpus
from levante.errors import LevanteError
from levante.evaluation import evaluate_languages, summarize
from levante.interop.load import from_pretrained, resolve_checkpoint
from levante.tokenizer import LevanteTokenizer


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, checkpoint dir) from a checkpoint dir, run dir or HF DeepseekV3 dir."""
    ckpt = resolve_checkpoint(path)
    tokenizer_file = ckpt.path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise LevanteError(f"{ckpt.path} has no tokenizer.json: cannot turn text into tokens")
    tokenizer = LevanteTokenizer(tokenizer_file)
    model = from_pretrained(ckpt.path, device=device)
    return model, tokenizer, ckpt.path


def evaluate_checkpoint(path: str | Path, data: list[str | Path], seq_len: int = 256,
                        batch_size: int = 8, device: str = "cpu") -> dict:
    """Loss and bits-per-byte per language on `data`: one shard dir, or raw corpus files that are
    tokenized here with the checkpoint's own tokenizer."""
    model, tokenizer, ckpt_dir = load_for_inference(path, device)
    data = [Path(p) for p in data]
    with tempfile.TemporaryDirectory() as tmp:
        if len(data) == 1 and (data[0] / "index.json").is_file():
            shards = open_shards(data[0], expected_tokenizer_sha256=tokenizer.sha256)
        else:
            tokenize_corpus(data, tokenizer.path, Path(tmp) / "shards")
            shards = open_shards(Path(tmp) / "shards", expected_tokenizer_sha256=tokenizer.sha256)
        sets = language_eval_windows(shards, seq_len)
        per_lang = evaluate_languages(model, sets, batch_size=batch_size, device=device)
    return {"checkpoint": str(ckpt_dir), "per_language": per_lang, **summarize(per_lang)}
