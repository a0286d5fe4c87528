"""Held-out loss and bits-per-byte per language.

Bits-per-byte divides total nats by the UTF-8 bytes the scored tokens cover, so it compares fairly
across tokenizers and languages (a language the tokenizer splits finely pays for it here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from levante.data.loader import LangEval


@torch.no_grad()
def evaluate_languages(model, sets: dict[str, LangEval], batch_size: int = 8, device="cpu",
                       max_windows: int | None = None) -> dict[str, dict]:
    """-> {lang: {loss (nats/token), bpb, tokens, bytes}}. With `max_windows`, only the first windows
    are scored and the byte count is scaled by the fraction of tokens scored (an estimate)."""
    was_training = model.training
    model.eval()
    results = {}
    for lang, data in sets.items():
        n = data.windows.shape[0] if max_windows is None else min(max_windows, data.windows.shape[0])
        nats, tokens = 0.0, 0
        for i in range(0, n, batch_size):
            inputs = data.inputs[i:i + batch_size].to(device)
            labels = data.labels[i:i + batch_size].to(device)
            logits = model(inputs).logits.float()
            nats += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                          reduction="sum"))
            tokens += int((labels != -100).sum())
        n_bytes = data.num_bytes if n == data.windows.shape[0] else data.num_bytes * tokens / data.num_tokens
        results[lang] = {"loss": nats / max(tokens, 1), "bpb": nats / math.log(2) / max(n_bytes, 1e-9),
                         "tokens": tokens, "bytes": round(n_bytes)}
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
