"""Parity-aware byte-level BPE (Foroutan et al. 2025, arXiv 2508.04796).

Plain BPE merges the pair most frequent in the whole corpus, so the languages with the most data
get the best compression. Parity-aware BPE keeps per-language pair counts and, at every step,
takes the merge from the language that is currently *worst* compressed on a parallel development
set (here: the most tokens for the same content, i.e. the highest premium), then applies that merge
to every language. The result is an ordinary BPE (vocab + ranked merges) that HF `tokenizers`
encodes exactly as trained.

The hybrid rule (the default of `levante tokenizer train`) sits between the two: the corpus-wide
counts are one more lane, and a step takes the worst language's merge only while that language is
more than a tolerance above the mean; pure parity is tolerance 0, plain BPE tolerance infinity.

Written on word-frequency tables with incremental pair counts and one lazy max-heap per lane,
so each merge costs time proportional to the words that contain the merged pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

from tokenizers import pre_tokenizers

_PRE = pre_tokenizers.ByteLevel(add_prefix_space=False)
GLOBAL = "\0all"  # the lane of corpus-wide counts; never a language code


def word_counts(texts) -> Counter:
    """Byte-level pre-tokenized words (GPT-2 split, bytes mapped to printable symbols) with counts."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(piece for piece, _ in _PRE.pre_tokenize_str(text))
    return counts


def train_parity_bpe(train: dict[str, Counter], dev: dict[str, Counter], num_merges: int,
                     min_frequency: int = 2, tolerance: float = 0.0,
                     dev_chars: dict[str, int] | None = None,
                     picked_by: Counter | None = None) -> list[tuple[str, str]]:
    """Ranked merges. `train[lang]` / `dev[lang]`: word counts; languages missing from `dev` still
    receive every merge but never choose one.

    A language's cost is its token count on `dev`: on parallel text (the same content in every
    language) that is its premium up to a constant. With `dev_chars` (held-out monolingual text, no
    parallel set) it is tokens per character instead: characters per unit of content vary far less
    across languages than bytes do (Greek and Bulgarian take two bytes a letter).

    Each step takes the worst language's most frequent pair while that language's cost is more than
    `(1 + tolerance)` times the mean cost, and otherwise the pair most frequent in the whole training
    corpus (so the summed counts are one more lane in the same incremental structure).
    `tolerance=0` is pure parity-aware BPE, `inf` plain BPE on `train`. `picked_by`, if given,
    counts the merges taken per language (GLOBAL for the corpus-frequency ones)."""
    langs = sorted(train)
    lanes = [*langs, GLOBAL]
    index: dict[str, int] = {}
    words: list[list[str]] = []
    freq: list[dict[str, int]] = []  # per word: lane -> train count
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
    for f in freq:
        if f:
            f[GLOBAL] = sum(f.values())
    pairs: dict[str, Counter] = {lane: Counter() for lane in lanes}
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    dev_tokens = Counter()
    for i, sym in enumerate(words):
        for lang, c in dev_freq[i].items():
            dev_tokens[lang] += c * len(sym)
        for p in zip(sym, sym[1:], strict=False):
            where[p].add(i)
            for lane, c in freq[i].items():
                pairs[lane][p] += c
    heaps = {lane: [(-c, p) for p, c in pairs[lane].items()] for lane in lanes}
    for h in heaps.values():
        heapq.heapify(h)
    choosers = {lang for lang in dev_tokens if lang in train}
    units = {lang: max(dev_chars.get(lang, 0), 1) if dev_chars else 1 for lang in choosers}

    # Lazy max-heaps: a pair is pushed when its count rises, so its highest entry is never below
    # its count; an entry found above the count at the top is lowered in place. The top that
    # matches its count is then the exact maximum (ties: smallest pair), as a full recount gives.
    def best(lane: str):
        h, cnt = heaps[lane], pairs[lane]
        while h:
            negc, p = h[0]
            c = cnt.get(p, 0)
            if c == -negc:
                return p, c
            if c > 0:
                heapq.heapreplace(h, (-c, p))
            else:
                heapq.heappop(h)
        return None, 0

    def choose():
        while choosers:
            cost = {lang: dev_tokens[lang] / units[lang] for lang in sorted(choosers)}
            worst = max(cost, key=cost.get)  # ties go to the first name: deterministic
            if cost[worst] <= (1 + tolerance) * sum(cost.values()) / len(cost):
                break
            p, c = best(worst)
            if p is not None and c >= min_frequency:
                return p, worst
            choosers.discard(worst)  # nothing left to merge in it
        p, c = best(GLOBAL)
        return (p, GLOBAL) if p is not None and c >= min_frequency else (None, None)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pick, lane = choose()
        if pick is None:
            break
        merges.append(pick)
        if picked_by is not None:
            picked_by[lane] += 1
        a, b = pick
        merged = a + b
        changed: dict[str, dict] = {lane: {} for lane in lanes}
        for i in where.pop(pick, ()):
            old = words[i]
            n = len(old)
            # merge left to right; the pair counts change only around the merged spots: the pairs
            # that touched a merged (a, b) go, the pairs that touch the new token come. (a, b)
            # itself is gone from every word afterwards and is dropped from the counts below.
            new, spots, diff, k, prev = [], [], {}, 0, -2
            while k < n:
                if old[k] == a and k + 1 < n and old[k + 1] == b:
                    if k and prev != k - 2:  # else the previous merge already took this pair
                        p = (old[k - 1], a)
                        diff[p] = diff.get(p, 0) - 1
                    if k + 2 < n:
                        p = (b, old[k + 2])
                        diff[p] = diff.get(p, 0) - 1
                    spots.append(len(new))
                    new.append(merged)
                    prev = k
                    k += 2
                else:
                    new.append(old[k])
                    k += 1
            last = len(new) - 1
            for s, j in enumerate(spots):
                if j:
                    p = (new[j - 1], merged)
                    diff[p] = diff.get(p, 0) + 1
                if j < last and not (s + 1 < len(spots) and spots[s + 1] == j + 1):  # else: its left
                    p = (merged, new[j + 1])
                    diff[p] = diff.get(p, 0) + 1
            diff.pop(pick, None)
            shrink = n - len(new)
            for lang, c in dev_freq[i].items():
                dev_tokens[lang] -= c * shrink
            moved = [(p, d) for p, d in diff.items() if d]
            new_pairs = None
            for p, d in moved:
                if d > 0:
                    where[p].add(i)
                elif p != pick:  # a fallen count may still be positive: keep the word then
                    if new_pairs is None:
                        new_pairs = set(zip(new, new[1:], strict=False))
                    if p not in new_pairs:
                        where[p].discard(i)
            words[i] = new
            for lane, c in freq[i].items():
                ch = changed[lane]
                for p, d in moved:
                    ch[p] = ch.get(p, 0) + d * c
        for lane, delta in changed.items():
            cnt, h = pairs[lane], heaps[lane]
            for p, d in delta.items():
                if d:
                    c = cnt.get(p, 0) + d
                    if c <= 0:
                        cnt.pop(p, None)
                    else:
                        cnt[p] = c
                        if d > 0:
                            heapq.heappush(h, (-c, p))
        for lane in lanes:
            pairs[lane].pop(pick, None)
    return merges


def build_tokenizer(merges: list[tuple[str, str]], special_tokens: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` from ranked merges: specials first, then the 256 byte
    symbols, then one token per merge."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is a set: random order
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
