"""Exact and near-duplicate detection, global over every input and worker.

Workers compute, per document, a 128-bit hash of the normalised text (exact duplicates) and a
MinHash signature of its word 5-grams (near duplicates); the parent then decides once, in global
document order, so the first occurrence survives whatever the worker count.

MinHash (Broder 1997) with the universal hash family h(x) = (a·x + b) mod (2^61 − 1), truncated to
32 bits: a, b < 2^31 and x < 2^32 keep a·x + b below 2^63, so numpy's uint64 arithmetic is exact.
LSH banding (b bands of r rows) finds candidate pairs; each candidate is confirmed by the
signatures' estimated Jaccard similarity before it joins a cluster (union-find, the lowest document
index is the root), so a band collision alone never deletes a document. Written here, on numpy,
rather than taken from datasketch: the whole algorithm is ~100 lines and the workers must produce
bit-identical signatures in any process.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

from levante.config import ConfigError

MERSENNE = np.uint64((1 << 61) - 1)
MASK32 = np.uint64(0xFFFFFFFF)
_PUNCT = re.compile(r"[^\w\s]+")


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # words per shingle
    num_perm: int = 128
    bands: int = 32  # rows per band = num_perm // bands; 32 x 4 catches pairs above J ~ 0.5 as candidates
    threshold: float = 0.7  # estimated Jaccard a candidate pair must reach to count as duplicates
    seed: int = 1

    def validate(self) -> DedupConfig:
        if self.num_perm <= 0 or self.bands <= 0 or self.num_perm % self.bands:
            raise ConfigError("dedup: num_perm must be a positive multiple of bands")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError("dedup: threshold must be in (0, 1]")
        if self.ngram < 1:
            raise ConfigError("dedup: ngram must be >= 1")
        return self


def normalise(text: str) -> str:
    """Case, Unicode compatibility forms, punctuation and whitespace do not make a document new."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


class MinHasher:
    def __init__(self, config: DedupConfig):
        self.config = config.validate()
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(1, 1 << 31, size=config.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=config.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes (< 2^32) of the word n-grams of the normalised text."""
        words = normalise(text).split()
        n = self.config.ngram
        if len(words) < n:
            return np.array([zlib.crc32(" ".join(words).encode("utf-8"))], dtype=np.uint64)
        h = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        out = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for k in range(n):  # polynomial rolling combination, exact in uint64 before the mask
            out = ((out * np.uint64(1_000_003)) + h[k:len(h) - n + 1 + k]) & MASK32
        return np.unique(out)

    def signature(self, text: str) -> np.ndarray:
        hv = self.shingles(text)
        sig = np.full(self.config.num_perm, MASK32, dtype=np.uint64)
        for start in range(0, len(hv), 4096):  # chunks: a 10 MB document stays within a few MB
            chunk = hv[start:start + 4096]
            vals = ((self.a[:, None] * chunk[None, :] + self.b[:, None]) % MERSENNE) & MASK32
            np.minimum(sig, vals.min(axis=1), out=sig)
        return sig.astype(np.uint32)


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def deduplicate(keys: list[bytes], signatures: np.ndarray | None, config: DedupConfig
                ) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Decide duplicates over documents in global order.

    Returns (survivor[i]: index of the document i is a copy of, or i; reason[i]: None, "exact
    duplicate" or "near duplicate"; cluster_size[i]: for survivors, how many documents (itself
    included) their cluster holds, else 0).
    """
    n = len(keys)
    parent = np.arange(n, dtype=np.int64)
    reason: list[str | None] = [None] * n
    if config.exact:
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            j = first.setdefault(k, i)
            if j != i:
                parent[i] = j
                reason[i] = "exact duplicate"
    if config.near and signatures is not None and n:
        rows = config.num_perm // config.bands
        live = np.array([i for i in range(n) if reason[i] is None], dtype=np.int64)
        need = int(np.ceil(config.threshold * config.num_perm))
        for band in range(config.bands):
            block = np.ascontiguousarray(signatures[live, band * rows:(band + 1) * rows])
            buckets: dict[bytes, list[int]] = {}
            for idx, row in zip(live.tolist(), block, strict=True):
                buckets.setdefault(row.tobytes(), []).append(idx)
            for members in buckets.values():
                for pos in range(1, len(members)):
                    i = members[pos]
                    for j in members[max(0, pos - 8):pos]:  # recent bucket mates: enough, and bounded
                        if int((signatures[i] == signatures[j]).sum()) >= need:
                            ri, rj = _find(parent, i), _find(parent, j)
                            if ri != rj:
                                parent[max(ri, rj)] = min(ri, rj)
                            break
        for i in live.tolist():
            if _find(parent, i) != i:
                reason[i] = "near duplicate"
    survivor = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    cluster = np.bincount(survivor, minlength=n) if n else np.zeros(0, dtype=np.int64)
    cluster[survivor != np.arange(n)] = 0
    return survivor, reason, cluster
