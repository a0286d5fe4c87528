"""Tokenizer fertility and cross-language parity.

Fertility = tokens per UTF-8 byte and per whitespace word. Parity compares a language with the
reference (English): tokens/byte of the language over tokens/byte of English. On *parallel* files
(FLORES: line i of every file is the same sentence) we also report the token premium, tokens of the
language over tokens of English for the same content: what a speaker pays in context length and
compute for writing in their language (Petrov et al., 2023).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from levante.data.readers import UNKNOWN_LANG, Document, ReadStats, read_documents
from levante.tokenizer.tokenizer import LevanteTokenizer


@dataclass
class Fertility:
    docs: int
    bytes: int
    words: int
    tokens: int
    tokens_per_byte: float
    tokens_per_word: float
    parity: float | None = None  # tokens/byte relative to the reference language
    premium: float | None = None  # tokens relative to the reference (parallel text only)

    def to_dict(self) -> dict:
        return asdict(self)


def fertility(tokenizer, documents: Iterable[Document], reference: str = "en",
              parallel: bool = False) -> dict[str, Fertility]:
    """Per-language fertility of `tokenizer` (a LevanteTokenizer) over `documents`."""
    totals: dict[str, list[int]] = {}
    batch: list[Document] = []

    def flush():
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            t = totals.setdefault(doc.lang or UNKNOWN_LANG, [0, 0, 0, 0])
            t[0] += 1
            t[1] += len(doc.text.encode("utf-8"))
            t[2] += len(doc.text.split())
            t[3] += len(ids)
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) >= 256:
            flush()
    flush()
    out = {lang: Fertility(d, b, w, t, t / max(b, 1), t / max(w, 1))
           for lang, (d, b, w, t) in sorted(totals.items())}
    ref = out.get(reference)
    if ref is not None:
        for f in out.values():
            f.parity = f.tokens_per_byte / ref.tokens_per_byte
            if parallel:
                f.premium = f.tokens / ref.tokens
    return out


def parity_report(tokenizer_path, paths, reference: str = "en") -> dict[str, Fertility]:
    """Fertility, parity and token premium on parallel files, e.g. `flores/dev/<lang>.txt`."""
    return fertility(LevanteTokenizer(tokenizer_path), read_documents(paths, ReadStats()),
                     reference, parallel=True)


def parallel_summary(result: dict[str, Fertility], reference: str = "en") -> dict:
    """Rows for the `tokenizer report --parallel` table / JSON, plus the mean and worst premium over
    the non-reference languages (the parity target is mean <= 1.15, none above 1.4)."""
    rows = {lang: {"tokens": f.tokens, "words": f.words, "bytes": f.bytes,
                   "tokens_per_word": round(f.tokens_per_word, 4),
                   "bytes_per_token": round(f.bytes / max(f.tokens, 1), 4),
                   "premium": None if f.premium is None else round(f.premium, 4)}
            for lang, f in result.items()}
    others = {k: v["premium"] for k, v in rows.items() if k != reference and v["premium"] is not None}
    worst = max(others, key=others.get) if others else None
    return {"reference": reference, "languages": rows, "total_tokens": sum(f.tokens for f in result.values()),
            "mean_premium": round(sum(others.values()) / len(others), 4) if others else None,
            "max_premium": {"lang": worst, "premium": others[worst]} if worst else None}


def premium_chart(summary: dict, path) -> None:
    """Bar chart of the token premium per language (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted(summary["languages"], key=lambda k: summary["languages"][k]["premium"] or 0)
    values = [summary["languages"][k]["premium"] or 0 for k in langs]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(langs) + 2), 3.2))
    ax.bar(langs, values, color=["#c44" if v > 1.4 else "#48a" for v in values])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel(f"tokens / tokens({summary['reference']})")
    ax.set_title(f"token premium on parallel text (mean {summary['mean_premium']})")
    ax.tick_params(axis="x", rotation=60 if len(langs) > 8 else 0)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
