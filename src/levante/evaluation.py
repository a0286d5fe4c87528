"""Held-out loss and bits-per-byte per language.

Bits-per-byte divides total nats by the UTF-8 bytes the scored tokens cover, so it compares fairly
across tokenizers and languages (a language the tokenizer splits finely pays for it here).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from levante.data.loader import LangEval, language_eval_windows
from levante.data.shards import open_shards, tokenize_corpus
from levante.errors import LevanteError


@torch.no_grad()
def evaluate_languages(model, sets: dict[str, LangEval], batch_size: int = 8, device="cpu") -> dict[str, dict]:
    """-> {lang: {loss (nats/token), bpb, tokens, bytes}} over every window of every language."""
    if batch_size < 1:
        raise LevanteError(f"batch size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    results = {}
    for lang, data in sets.items():
        nats, tokens = 0.0, 0
        for i in range(0, data.windows.shape[0], batch_size):
            inputs = data.inputs[i:i + batch_size].to(device)
            labels = data.labels[i:i + batch_size].to(device)
            logits = model(inputs).logits.float()
            nats += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                          reduction="sum"))
            tokens += int((labels != -100).sum())
        results[lang] = {"loss": nats / max(tokens, 1), "bpb": data.bits_per_byte(nats),
                         "tokens": tokens, "bytes": data.num_bytes}
    model.train(was_training)
    return results


def summarize(per_lang: dict[str, dict]) -> dict:
    """Token-weighted loss and byte-weighted bits-per-byte over all languages."""
    if not per_lang:
        return {}
    tokens = sum(r["tokens"] for r in per_lang.values())
    nats = sum(r["loss"] * r["tokens"] for r in per_lang.values())
    n_bytes = sum(r["bytes"] for r in per_lang.values())
    return {"loss": nats / max(tokens, 1), "bpb": nats / math.log(2) / max(n_bytes, 1)}


def evaluate_checkpoint(path: str | Path, data: list[str | Path], seq_len: int = 256,
                        batch_size: int = 8, device: str = "auto") -> dict:
    """Loss and bits-per-byte per language on `data`: one shard dir, or raw corpus files that are
    tokenized here with the checkpoint's own tokenizer."""
    from levante.infer.load import load_for_inference

    model, tokenizer, ckpt_dir = load_for_inference(path, device)
    device = next(model.parameters()).device
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
