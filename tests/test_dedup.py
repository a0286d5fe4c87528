"""Dedup: exact (normalised) and MinHash-LSH near duplicates on a generated set with known truth."""

from __future__ import annotations

import random

import numpy as np
import pytest

from levante.config import ConfigError
from levante.data.dedup import DedupConfig, MinHasher, deduplicate, exact_key, normalise


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalise("Hello,   WORLD!\n") == normalise("hello world")
    assert exact_key("Ｈｅｌｌｏ world.") == exact_key("hello world")  # NFKC: full-width letters
    assert exact_key("hello world") != exact_key("hello word")


def _jaccard(hasher, a, b):
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    hasher = MinHasher(DedupConfig(num_perm=256, bands=32))
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [rng.choice(vocab) for _ in range(400)]
    for keep in (100, 200, 300, 380):
        other = base[:keep] + [rng.choice(vocab) for _ in range(400 - keep)]
        a, b = " ".join(base), " ".join(other)
        est = float((hasher.signature(a) == hasher.signature(b)).mean())
        assert abs(est - _jaccard(hasher, a, b)) < 0.1, (keep, est)


def _edit(words, rng, vocab, n_edits):
    words = list(words)
    for _ in range(n_edits):
        op, pos = rng.randrange(3), rng.randrange(len(words))
        if op == 0:
            words[pos] = rng.choice(vocab)
        elif op == 1:
            words.insert(pos, rng.choice(vocab))
        else:
            del words[pos]
    return words


def test_near_duplicates_recall_and_false_positives():
    rng = random.Random(1)
    vocab = [f"{rng.choice('bcdfgklmnprstv')}{rng.choice('aeiou')}{i}" for i in range(5000)]
    originals = [[rng.choice(vocab) for _ in range(rng.randrange(150, 400))] for _ in range(300)]
    docs, truth = [], []  # truth: index of the original a doc copies, or None
    for words in originals:
        docs.append(" ".join(words))
        truth.append(None)
    for i, words in enumerate(originals[:200]):  # small edits: 1-2% of the words
        docs.append(" ".join(_edit(words, rng, vocab, max(1, len(words) // 80))))
        truth.append(i)
    for words in originals[200:]:  # hard negatives: share half of an original, the rest new
        half = len(words) // 2
        docs.append(" ".join(words[:half] + [rng.choice(vocab) for _ in range(len(words) - half)]))
        truth.append(None)
    order = list(range(len(docs)))
    keys = [exact_key(docs[i]) for i in order]
    hasher = MinHasher(DedupConfig())
    sigs = np.stack([hasher.signature(docs[i]) for i in order])
    survivor, reason, cluster = deduplicate(keys, sigs, DedupConfig())
    copies = [i for i, t in enumerate(truth) if t is not None]
    found = sum(reason[i] == "near duplicate" and survivor[i] == truth[i] for i in copies)
    negatives = [i for i, t in enumerate(truth) if t is None]
    false = sum(reason[i] is not None for i in negatives)
    assert found / len(copies) >= 0.95, found / len(copies)
    assert false / len(negatives) < 0.01, false
    assert cluster.sum() == len(docs)  # every document is in exactly one cluster
    assert all(cluster[truth[i]] >= 2 for i in copies if reason[i] == "near duplicate")


def test_exact_duplicates_keep_the_first_and_count_the_cluster():
    docs = ["a b c d e f g", "x y z", "A b, c d e f g!", "a b c d e f g", "p q r"]
    survivor, reason, cluster = deduplicate([exact_key(d) for d in docs], None, DedupConfig(near=False))
    assert survivor.tolist() == [0, 1, 0, 0, 4]
    assert reason == [None, None, "exact duplicate", "exact duplicate", None]
    assert cluster.tolist() == [3, 1, 0, 0, 1]


def test_signatures_identical_across_instances():
    text = "the same document hashed twice in two processes gives the same signature " * 3
    assert np.array_equal(MinHasher(DedupConfig()).signature(text), MinHasher(DedupConfig()).signature(text))


def test_bad_config():
    with pytest.raises(ConfigError, match="multiple of bands"):
        DedupConfig(num_perm=100, bands=32).validate()
