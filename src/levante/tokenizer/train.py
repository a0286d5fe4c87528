"""Train a language-balanced byte-level BPE tokenizer.

Byte-level: every UTF-8 byte is in the base alphabet, so any text (Greek, Cyrillic, emoji, code)
round-trips exactly and there is no <unk>. No normaliser either: decode(encode(text)) == text, and
bits-per-byte is measured on the bytes the user gave.

Language balance: a corpus is usually dominated by a few languages, and BPE merges follow the bytes,
so minority languages get poor compression (many tokens per word: slower, shorter context, worse
models). We resample each language to a byte share proportional to bytes_lang ** alpha (alpha=1:
natural shares, alpha=0: uniform; 0.3 is the usual multilingual compromise, as in XLM-R / mT5).
The default hybrid mode measures shares in characters instead and, on top, hands merges to any
language whose held-out compression falls behind the others (levante.tokenizer.parity_bpe).
"""

from __future__ import annotations

import logging
import numbers
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from levante.data.readers import UNKNOWN_LANG, ReadStats, read_documents
from levante.errors import LevanteError
from levante.tokenizer.parity import Fertility, fertility
from levante.tokenizer.tokenizer import (
    MIN_MERGES,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    LevanteTokenizer,
    document_post_processor,
    write_hf_tokenizer_files,
)
from levante.util import atomic_write_bytes

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- sampling


def sampling_shares(bytes_by_lang: dict[str, int], alpha: float) -> dict[str, float]:
    """Target byte share per language, proportional to bytes ** alpha."""
    weights = {lang: float(b) ** alpha for lang, b in bytes_by_lang.items() if b > 0}
    total = sum(weights.values())
    return {lang: w / total for lang, w in weights.items()}


def _resample(sizes: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Document indices whose bytes add up to about `target`: whole copies of the language, then a
    seeded random subset for the remainder (stopping at whichever document lands closer)."""
    n, have = len(sizes), int(sizes.sum())
    copies = int(target // have)
    rest = target - copies * have
    perm = rng.permutation(n)
    cum = np.cumsum(sizes[perm])
    k = int(np.searchsorted(cum, rest, side="right"))  # docs that fit entirely under `rest`
    if k < n and cum[k] - rest < rest - (cum[k - 1] if k else 0):
        k += 1
    return np.concatenate([np.tile(np.arange(n), copies), perm[:k]])


MODES = ("hybrid", "parity", "frequency")
# Hybrid: uniform byte shares for the corpus lane, since the per-language rule already lifts the
# languages left behind and English-heavy merges raise every other language's premium; plain BPE
# keeps the usual multilingual compromise. (Pure parity hardly ever uses the corpus lane.)
DEFAULT_ALPHA = {"hybrid": 0.0, "parity": 0.3, "frequency": 0.3}
# How far (relative) the worst language's cost may sit above the mean before it takes the merge.
# Chosen on FLORES dev / held-out training text, never on devtest (BENCHMARKS.md, parity section).
HELD_OUT_TOLERANCE = 0.005
PARALLEL_TOLERANCE = 0.06
HOLD_OUT_SHARE = 0.1  # of a language's documents, at most HOLD_OUT_BYTES, for the held-out signal
HOLD_OUT_BYTES = 200_000


def _hold_out(texts: list[str], sizes: list[int], seed: int, lang: str):
    """Split a language's documents into (train texts, train sizes, held-out texts): a seeded random
    tenth of the documents up to HOLD_OUT_BYTES, never the last training document. The first one may
    go over the byte share (up to a quarter of the language), so that a language of a few long
    documents still gets a signal."""
    rng = np.random.default_rng([seed, zlib.crc32(lang.encode()), 1])
    total = sum(sizes)
    budget = min(HOLD_OUT_SHARE * total, HOLD_OUT_BYTES)
    out, used = set(), 0
    for i in rng.permutation(len(texts))[:max(int(HOLD_OUT_SHARE * len(texts)), 1)].tolist():
        if len(out) + 1 >= len(texts):
            break
        if used + sizes[i] > (budget if out else max(budget, min(total / 4, HOLD_OUT_BYTES))):
            continue
        out.add(i)
        used += sizes[i]
    keep = [i for i in range(len(texts)) if i not in out]
    return [texts[i] for i in keep], [sizes[i] for i in keep], [texts[i] for i in sorted(out)]


@dataclass
class LangSample:
    docs_seen: int
    bytes_seen: int
    docs_sampled: int
    bytes_sampled: int
    share_seen: float
    share_sampled: float
    docs_held_out: int = 0  # the compression signal of the hybrid / parity modes without a parallel set


@dataclass
class TrainReport:
    path: Path
    sha256: str
    vocab_size: int  # actual; smaller than requested when the corpus runs out of merges
    requested_vocab_size: int
    alpha: float
    seed: int
    languages: dict[str, LangSample]
    mode: str = "hybrid"
    tolerance: float | None = None
    merges_by: dict[str, int] = field(default_factory=dict)  # who chose each merge: a language or "corpus"
    fertility: dict[str, Fertility] = field(default_factory=dict)
    read: dict = field(default_factory=dict)  # ReadStats of the training files
    eval_read: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool) \
            or vocab_size < MIN_VOCAB_SIZE:
        raise LevanteError(
            f"vocab_size {vocab_size!r} is too small: need at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special + 256 byte tokens + {MIN_MERGES} merges)")


def train_tokenizer(paths, out_path: str | Path, vocab_size: int, alpha: float | None = None, seed: int = 0,
                    max_bytes_per_lang: int | None = None, eval_paths=None, overwrite: bool = False,
                    parity_paths=None, mode: str = "hybrid", tolerance: float | None = None) -> TrainReport:
    """Train byte-level BPE on `paths`, save `tokenizer.json` (+ HF side files) and report.

    `out_path` is a directory, or a `*.json` file path whose directory gets the side files.
    `max_bytes_per_lang` stops reading a language once that many bytes are in (bounds memory).
    `eval_paths` (held-out files) give the per-language fertility / parity in the report.
    `alpha`: None is the mode's default (DEFAULT_ALPHA).
    `mode`: "frequency" is plain BPE (HF trainer) on the alpha-resampled corpus; "parity" takes
    every merge from the worst-compressed language (levante.tokenizer.parity_bpe); "hybrid" takes the
    corpus's most frequent merge unless the worst language is more than `tolerance` above the mean.
    Compression is measured on `parity_paths` (line-aligned `<lang>.txt` files: true premiums) if
    given, else as tokens per character on documents held out from each language's training data.
    """
    _check_vocab_size(vocab_size)
    if mode not in MODES:
        raise LevanteError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if alpha is None:
        alpha = DEFAULT_ALPHA[mode]
    if not 0.0 <= alpha <= 1.0:
        raise LevanteError(f"alpha must be in [0, 1], got {alpha}")
    if mode == "frequency" and parity_paths:
        raise LevanteError("parity texts steer the hybrid and parity modes, not mode 'frequency'")
    if tolerance is not None and (mode != "hybrid" or not tolerance >= 0):
        raise LevanteError(f"tolerance must be >= 0 and only applies to mode 'hybrid', got {tolerance}")
    if mode == "parity":
        tolerance = 0.0
    elif tolerance is None:
        tolerance = PARALLEL_TOLERANCE if parity_paths else HELD_OUT_TOLERANCE
    out_path = Path(out_path)
    json_path = out_path if out_path.suffix == ".json" else out_path / "tokenizer.json"
    if json_path.exists() and not overwrite:
        raise LevanteError(f"{json_path} exists; use --overwrite to replace it")

    # 1. Read, grouped by language (the texts stay in memory: cap them with max_bytes_per_lang).
    stats = ReadStats()
    texts: dict[str, list[str]] = {}
    sizes: dict[str, list[int]] = {}
    seen: dict[str, int] = {}
    for doc in read_documents(paths, stats):
        lang = doc.lang or UNKNOWN_LANG
        if max_bytes_per_lang is not None and seen.get(lang, 0) >= max_bytes_per_lang:
            continue
        n = len(doc.text.encode("utf-8"))
        texts.setdefault(lang, []).append(doc.text)
        sizes.setdefault(lang, []).append(n)
        seen[lang] = seen.get(lang, 0) + n
    if not texts:
        raise LevanteError(f"no documents to train a tokenizer on ({stats.num_rejected} rejected)")
    held_out: dict[str, list[str]] = {}
    if mode != "frequency" and not parity_paths:
        for lang in sorted(texts):
            texts[lang], sizes[lang], held_out[lang] = _hold_out(texts[lang], sizes[lang], seed, lang)
            seen[lang] = sum(sizes[lang])

    # 2. Resample every language to its target share of the same total. Plain BPE balances bytes,
    # as it always has; the hybrid and parity modes balance characters, a closer measure of content
    # (Greek and Bulgarian take two bytes a letter, so equal bytes would give them half the text).
    seen = dict(sorted(seen.items()))
    total = sum(seen.values())
    units = {lang: np.asarray(sizes[lang] if mode == "frequency" else [len(t) for t in texts[lang]],
                              dtype=np.int64) for lang in seen}
    unit_total = sum(int(u.sum()) for u in units.values())
    shares = sampling_shares({lang: int(u.sum()) for lang, u in units.items()}, alpha)
    picks: dict[str, np.ndarray] = {}
    for lang in seen:
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode())])
        picks[lang] = _resample(units[lang], shares[lang] * unit_total, rng)
    sampled = {lang: int(np.asarray(sizes[lang])[idx].sum()) for lang, idx in picks.items()}
    sampled_total = max(sum(sampled.values()), 1)
    languages = {
        lang: LangSample(len(texts[lang]), seen[lang], len(picks[lang]), sampled[lang],
                         seen[lang] / total, sampled[lang] / sampled_total, len(held_out.get(lang, ())))
        for lang in seen
    }

    # 3. Train. Order hardly matters to BPE (it counts words), but keep it fixed for determinism.
    merges_by: dict[str, int] = {}

    def batches():
        for lang in seen:
            idx = picks[lang]
            for start in range(0, len(idx), 1000):
                yield [texts[lang][i] for i in idx[start:start + 1000]]

    if mode == "frequency":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2, show_progress=False,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(batches(), trainer)
    else:
        from levante.tokenizer.parity_bpe import GLOBAL, build_tokenizer, train_parity_bpe, word_counts

        train_words = {lang: word_counts(texts[lang][i] for i in picks[lang]) for lang in seen}
        if parity_paths:
            dev_docs: dict[str, list[str]] = {}
            for doc in read_documents(parity_paths, ReadStats()):
                dev_docs.setdefault(doc.lang or UNKNOWN_LANG, []).append(doc.text)
            dev_chars = None  # parallel: the token counts themselves compare like with like
        else:
            dev_docs = held_out
            dev_chars = {lang: sum(map(len, t)) for lang, t in held_out.items()}
        dev_words = {lang: word_counts(t) for lang, t in dev_docs.items() if lang in seen}
        if parity_paths and not dev_words:
            raise LevanteError("the parity texts share no language with the training corpus")
        picked: Counter = Counter()
        merges = train_parity_bpe(train_words, dev_words, int(vocab_size) - len(SPECIAL_TOKENS) - 256,
                                  tolerance=tolerance, dev_chars=dev_chars, picked_by=picked)
        tok = build_tokenizer(merges, list(SPECIAL_TOKENS))
        merges_by = {("corpus" if k == GLOBAL else k): v for k, v in sorted(picked.items())}
    tok.post_processor = document_post_processor()
    for want, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == want, f"{special} got id {tok.token_to_id(special)}"
    if tok.get_vocab_size() < vocab_size:
        log.warning("corpus too small for vocab_size %d: trained %d tokens", vocab_size, tok.get_vocab_size())

    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json_path, tok.to_str(pretty=True).encode("utf-8"))
    write_hf_tokenizer_files(json_path, json_path.parent)
    loaded = LevanteTokenizer(json_path)

    report = TrainReport(json_path, loaded.sha256, loaded.vocab_size, int(vocab_size), alpha, seed,
                         languages, mode, None if mode == "frequency" else tolerance, merges_by,
                         read=stats.to_dict())
    if eval_paths:
        eval_stats = ReadStats()
        report.fertility = fertility(loaded, read_documents(eval_paths, eval_stats))
        report.eval_read = eval_stats.to_dict()
    return report
