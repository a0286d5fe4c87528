"""Parity-aware byte-level BPE (Foroutan et al. 2025, arXiv 2508.04796).

Plain BPE merges the pair most frequent in the whole corpus, so the languages with the most data
get the best compression. Parity-aware BPE keeps per-language pair counts and, at every step,
takes the merge from the language that is currently *worst* compressed on a parallel development
set (here: the most tokens for the same content, i.e. the highest premium), then applies that merge
to every language. The result is an ordinary BPE (vocab + ranked merges) that HF `tokenizers`
encodes exactly as trained.

Written on word-frequency tables with incremental pair counts and one lazy max-heap per language,
so each merge costs time proportional to the words that contain the merged pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

from tokenizers import pre_tokenizers

_PRE = pre_tokenizers.ByteLevel(add_prefix_space=False)


def word_counts(texts) -> Counter:
    """Byte-level pre-tokenized words (GPT-2 split, bytes mapped to printable symbols) with counts."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(piece for piece, _ in _PRE.pre_tokenize_str(text))
    return counts


def train_parity_bpe(train: dict[str, Counter], dev: dict[str, Counter], num_merges: int,
                     min_frequency: int = 2) -> list[tuple[str, str]]:
    """Ranked merges. `train[lang]` / `dev[lang]`: word counts; languages missing from `dev` still
    receive every merge but never choose one."""
    langs = sorted(train)
    index: dict[str, int] = {}
    words: list[list[str]] = []
    freq: list[dict[str, int]] = []  # per word: lang -> train count
    dev_freq: list[dict[str, int]] = []
    for table, target in ((train, freq), (dev, dev_freq)):
        for lang in sorted(table):
            for w, c in table[lang].items():
                if w not in index:
                    index[w] = len(words)
                    words.append(list(w))
                    freq.append({})
                    dev_freq.append({})
                target[index[w]][lang] = target[index[w]].get(lang, 0) + c
    pairs: dict[str, Counter] = {lang: Counter() for lang in langs}
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    dev_tokens = Counter()
    for i, sym in enumerate(words):
        for lang, c in dev_freq[i].items():
            dev_tokens[lang] += c * len(sym)
        for p in zip(sym, sym[1:], strict=False):
            where[p].add(i)
            for lang, c in freq[i].items():
                pairs[lang][p] += c
    heaps = {lang: [(-c, p) for p, c in pairs[lang].items()] for lang in langs}
    for h in heaps.values():
        heapq.heapify(h)
    choosers = {lang for lang in dev_tokens if lang in pairs}

    def best(lang: str):
        h, cnt = heaps[lang], pairs[lang]
        while h:
            negc, p = h[0]
            if cnt.get(p, 0) == -negc:
                return p, -negc
            heapq.heappop(h)  # stale: the count changed since it was pushed
        return None, 0

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pick = None
        # worst-compressed language first; ties broken by name so the result is deterministic
        for lang in sorted(choosers or langs, key=lambda k: (-dev_tokens[k], k)):
            p, c = best(lang)
            if p is not None and c >= min_frequency:
                pick = p
                break
            choosers.discard(lang)
        if pick is None:
            break
        merges.append(pick)
        a, b = pick
        merged = a + b
        changed: dict[str, Counter] = defaultdict(Counter)
        for i in sorted(where.pop(pick, ())):
            old = words[i]
            new, k = [], 0
            while k < len(old):
                if k + 1 < len(old) and old[k] == a and old[k + 1] == b:
                    new.append(merged)
                    k += 2
                else:
                    new.append(old[k])
                    k += 1
            shrink = len(old) - len(new)
            for lang, c in dev_freq[i].items():
                dev_tokens[lang] -= c * shrink
            # net change of this word's pair counts: only the pairs around the merged spots are
            # non-zero, so each language's counts are touched a few times, not once per pair
            diff: dict[tuple[str, str], int] = {}
            for p in zip(old, old[1:], strict=False):
                diff[p] = diff.get(p, 0) - 1
            for p in zip(new, new[1:], strict=False):
                diff[p] = diff.get(p, 0) + 1
            moved = [(p, d) for p, d in diff.items() if d]
            new_pairs = set(zip(new, new[1:], strict=False))
            for p, _ in moved:
                if p in new_pairs:
                    where[p].add(i)
                elif p != pick:
                    where[p].discard(i)
            for lang, c in freq[i].items():
                ch = changed[lang]
                for p, d in moved:
                    ch[p] += d * c
            words[i] = new
        for lang, delta in changed.items():
            cnt = pairs[lang]
            for p, d in delta.items():
                if d:
                    cnt[p] += d
                    if cnt[p] <= 0:
                        del cnt[p]
                    else:  # also when it fell: the old entry is stale now
                        heapq.heappush(heaps[lang], (-cnt[p], p))
        for lang in langs:
            pairs[lang].pop(pick, None)
    return merges


def build_tokenizer(merges: list[tuple[str, str]], special_tokens: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` from ranked merges: specials first, then the 256 byte
    symbols, then one token per merge."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for sym in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(sym, len(vocab))
    kept = []
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return tok
