"""Training batches from token shards, resumable exactly; per-language evaluation windows.

Training: the token stream is cut into non-overlapping windows of seq_len + 1 tokens with stride
seq_len (window w = tokens[w*T : w*T + T + 1]; inputs are its first T tokens, labels its last T), so
every token is a label exactly once per epoch. Each epoch visits the windows in a permutation drawn
from numpy's Generator seeded by (seed, epoch): the order depends on nothing but these numbers, so
the state is just (epoch, position) and a resumed run sees exactly the batches it would have seen.
The epochs' permutations, one after the other, form one global stream of windows. Every micro-batch
takes the next batch_size * world_size windows of that stream (the global micro-batch) and rank r
trains rows [r * batch_size, (r + 1) * batch_size) of it. So the same global batch trains the same
sequences whatever the world size, ranks stay in lockstep, and the position (global, the same on
every rank) resumes at any world size with the same global batch. A batch that reaches the end of an
epoch continues into the next one, so every batch is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from levante.data.shards import LANG, LENGTH, NBYTES, OFFSET, Shards
from levante.errors import LevanteError


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LevanteError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def mixture_probabilities(windows_per_lang: dict[str, int], temperature: float = 1.0,
                          weights: dict[str, float] | None = None) -> dict[str, float]:
    """Sampling probability per language: p ∝ weights[lang] when weights are given (languages not
    named get 0), else p ∝ n_lang ** temperature (1: natural shares, 0: uniform)."""
    if weights:
        unknown = sorted(set(weights) - set(windows_per_lang))
        if unknown:
            raise LevanteError(f"data.mix_weights names languages the shards do not hold: {', '.join(unknown)}")
        raw = {lang: float(weights.get(lang, 0.0)) for lang in windows_per_lang}
    else:
        raw = {lang: float(n) ** temperature for lang, n in windows_per_lang.items() if n > 0}
    total = sum(raw.values())
    if total <= 0:
        raise LevanteError("data mixture: every language has weight 0")
    return {lang: w / total for lang, w in sorted(raw.items())}


def _largest_remainder(probs: dict[str, float], total: int) -> dict[str, int]:
    exact = {k: p * total for k, p in probs.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


class TokenLoader:
    def __init__(self, shards: Shards, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, mix_temperature: float = 1.0, mix_weights: dict[str, float] | None = None):
        self.shards = shards
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.world_size = _positive_int("world_size", world_size)
        if not 0 <= rank < self.world_size:
            raise LevanteError(f"rank {rank} is outside 0..{self.world_size - 1}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise LevanteError(f"seed must be a non-negative integer, got {seed!r}")
        self.rank, self.seed = rank, int(seed)
        self.num_windows = max(shards.num_tokens - 1, 0) // self.seq_len
        if self.num_windows < 1:
            raise LevanteError(
                f"shards in {shards.path} hold {shards.num_tokens} tokens: too few for "
                f"one window of seq_len + 1 = {self.seq_len + 1} tokens; lower seq_len or add data")
        self.epoch = 0
        self.position = 0  # windows of this epoch already consumed by all ranks together
        self.last_windows = np.zeros(0, dtype=np.int64)  # window ids of the latest batch
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)
        self._doc_cols: tuple[np.ndarray, np.ndarray] | None = None
        # Language mixture: each window belongs to the language of its first label's document; an
        # epoch holds num_windows windows drawn per language in proportion to `self.mixture`
        # (up-sampled languages repeat, down-sampled ones get a fresh subset every epoch).
        self.window_lang = self._window_langs()
        counts = np.bincount(self.window_lang, minlength=len(shards.langs))
        self.windows_per_lang = {lang: int(counts[i]) for i, lang in enumerate(shards.langs) if counts[i]}
        natural = mix_temperature == 1.0 and not mix_weights
        self.mixture = None if natural else mixture_probabilities(self.windows_per_lang, mix_temperature, mix_weights)
        self._mix_seen = np.zeros(len(shards.langs), dtype=np.int64)

    @property
    def batches_per_epoch(self) -> float:
        return self.num_windows / (self.batch_size * self.world_size)

    def _window_langs(self) -> np.ndarray:
        starts = np.arange(self.num_windows, dtype=np.int64) * self.seq_len + 1
        offsets = np.ascontiguousarray(self.shards.docs[:, OFFSET])
        return np.ascontiguousarray(self.shards.docs[:, LANG])[np.searchsorted(offsets, starts, side="right") - 1]

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        """The epoch's window order: a permutation of all windows, or of the mixture's draw."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.mixture is None:
            return rng.permutation(self.num_windows)
        parts = []
        codes = {lang: i for i, lang in enumerate(self.shards.langs)}
        for lang, k in _largest_remainder(self.mixture, self.num_windows).items():
            pool = np.nonzero(self.window_lang == codes[lang])[0]
            if k and len(pool):
                reps = -(-k // len(pool))
                parts.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[:k])
        drawn = np.concatenate(parts)
        return drawn[rng.permutation(len(drawn))]

    def pop_mix(self) -> dict[str, float]:
        """Realised language shares of the windows served since the last call (for metrics.jsonl)."""
        seen, self._mix_seen = self._mix_seen, np.zeros_like(self._mix_seen)
        total = max(int(seen.sum()), 1)
        return {lang: round(int(seen[i]) / total, 4) for i, lang in enumerate(self.shards.langs) if seen[i]}

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = self._epoch_windows(epoch)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (inputs, labels), int64 [batch_size, seq_len]: this rank's rows of the next global
        micro-batch; labels are inputs shifted by one."""
        parts, need = [], self.batch_size * self.world_size
        while need:
            take = self._order_of(self.epoch)[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        rows = np.concatenate(parts)
        self._mix_seen += np.bincount(self.window_lang[rows], minlength=len(self._mix_seen))  # the global batch
        self.last_windows = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        idx = self.last_windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        x = torch.from_numpy(self.shards.tokens[idx].astype(np.int64))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def label_lang_ids(self, windows: np.ndarray | None = None) -> torch.Tensor:
        """Language code (index into `shards.langs`) of the document each label belongs to, int64
        [B, seq_len], for the latest batch by default: per-language training loss."""
        windows = self.last_windows if windows is None else np.asarray(windows)
        if self._doc_cols is None:  # contiguous copies: searchsorted on a strided memmap is slow
            docs = self.shards.docs
            self._doc_cols = np.ascontiguousarray(docs[:, OFFSET]), np.ascontiguousarray(docs[:, LANG])
        offsets, langs = self._doc_cols
        pos = windows[:, None] * self.seq_len + np.arange(1, self.seq_len + 1)
        return torch.from_numpy(langs[np.searchsorted(offsets, pos, side="right") - 1])

    # -- exact resume

    def _identity(self) -> dict:
        ident = {"seed": self.seed, "seq_len": self.seq_len, "num_tokens": self.shards.num_tokens}
        if self.mixture is not None:  # natural order keeps the old state layout
            ident["mixture"] = {k: round(v, 6) for k, v in self.mixture.items()}
        return ident

    def state_dict(self) -> dict:
        """JSON-able; the same on every rank. Batch size and world size may change across a resume
        (the stream position is global)."""
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, want in self._identity().items():
            if state.get(key) != want:
                raise LevanteError(f"cannot resume the data loader: it was saved with {key}="
                                   f"{state.get(key)}, this run has {key}={want}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise LevanteError(f"cannot resume the data loader: bad position {epoch}:{position}")
        self.epoch, self.position = epoch, position


# ------------------------------------------------------------------------------ evaluation windows


@dataclass
class LangEval:
    """One language's held-out documents as scoring windows.

    Byte accounting (what makes bits-per-byte honest): only whole documents are included. The
    language's documents (`<|bos|> text <|eos|>` each) are concatenated in corpus order; every token
    after each document's bos (its text and its eos) is scored exactly once, the bos itself is
    context, as at generation time. `num_bytes` is the UTF-8 byte count of exactly those documents'
    texts. The last window is padded; `mask` marks the scored labels (bos and padding are not).
    So bits_per_byte = sum(nats over labels where mask) / ln(2) / num_bytes.
    """

    windows: torch.Tensor  # int64 [N, seq_len + 1]
    mask: torch.Tensor  # bool [N, seq_len]: which labels are scored
    num_bytes: int
    num_docs: int
    num_tokens: int  # scored tokens == mask.sum()

    @property
    def inputs(self) -> torch.Tensor:
        return self.windows[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        """Labels with -100 (cross_entropy's ignore_index) on the padding."""
        return self.windows[:, 1:].masked_fill(~self.mask, -100)

    def bits_per_byte(self, total_nats: float) -> float:
        return total_nats / math.log(2) / self.num_bytes


def language_eval_windows(shards: Shards, seq_len: int,
                          max_windows_per_lang: int | None = None) -> dict[str, LangEval]:
    """Per-language evaluation windows. With `max_windows_per_lang`, documents are taken whole, in
    order, until they cover max_windows * seq_len scored tokens (the last one may run past the budget,
    so every language keeps at least one document and bits-per-byte stays exact)."""
    seq_len = _positive_int("seq_len", seq_len)
    budget = math.inf if max_windows_per_lang is None else \
        _positive_int("max_windows_per_lang", max_windows_per_lang) * seq_len
    docs = np.asarray(shards.docs)
    out: dict[str, LangEval] = {}
    for code, lang in enumerate(shards.langs):
        chosen, used = [], 0  # used: scored tokens, i.e. every token but each document's bos
        for d in np.nonzero(docs[:, LANG] == code)[0]:
            if used >= budget:
                break
            chosen.append(d)
            used += int(docs[d, LENGTH]) - 1
        if not chosen:
            continue
        total = int(docs[chosen, LENGTH].sum())
        n = math.ceil((total - 1) / seq_len)
        stream = np.full(n * seq_len + 1, shards.eos_id, dtype=np.int64)
        scored = np.zeros(n * seq_len + 1, dtype=bool)
        pos = 0
        for d in chosen:
            off, length = int(docs[d, OFFSET]), int(docs[d, LENGTH])
            stream[pos:pos + length] = shards.tokens[off:off + length]
            scored[pos + 1:pos + length] = True
            pos += length
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
        mask = scored[1:].reshape(n, seq_len)  # label of input position p is stream token p + 1
        out[lang] = LangEval(torch.from_numpy(stream[idx]), torch.from_numpy(mask),
                             int(docs[chosen, NBYTES].sum()), len(chosen), used)
    return out
