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
