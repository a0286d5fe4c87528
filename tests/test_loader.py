"""Token loader: windows, seeded epochs, exact resume, disjoint ranks; per-language eval windows."""

import json
import math
import random

import numpy as np
import pytest
import torch

from levante.data.loader import TokenLoader, language_eval_windows
from levante.data.shards import open_shards, tokenize_corpus
from levante.errors import LevanteError
from levante.tokenizer import LevanteTokenizer, train_tokenizer

WORDS = {
    "en": "the fox runs home and the dog sleeps near a warm fire".split(),
    "el": "η αλεπού τρέχει σπίτι και ο σκύλος κοιμάται δίπλα στη φωτιά".split(),
    "pl": "lis biegnie do domu a pies śpi przy ciepłym ogniu".split(),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    texts = []
    with open(d / "mixed.jsonl", "w", encoding="utf-8") as f:
        for i in range(90):
            lang = ("en", "el", "pl")[i % 3]
            text = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(3, 40)))
            texts.append((lang, text))
            f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    tok = train_tokenizer([d / "mixed.jsonl"], d / "tok", vocab_size=300)
    tokenize_corpus([d / "mixed.jsonl"], tok.path, d / "shards")
    return open_shards(d / "shards"), LevanteTokenizer(tok.path), texts


def test_batches_are_shifted_windows_of_the_stream(corpus):
    shards, _, _ = corpus
    T = 16
    loader = TokenLoader(shards, seq_len=T, batch_size=4, seed=1)
    inputs, labels = loader.next_batch()
    assert inputs.shape == labels.shape == (4, T) and inputs.dtype == labels.dtype == torch.int64
    stream = torch.from_numpy(np.asarray(shards.tokens).astype(np.int64))
    for row, w in enumerate(loader.last_windows):
        assert torch.equal(inputs[row], stream[w * T : w * T + T])
        assert torch.equal(labels[row], stream[w * T + 1 : w * T + T + 1])


def windows_of(loader, n_batches):
    out = []
    for _ in range(n_batches):
        loader.next_batch()
        out.extend(loader.last_windows.tolist())
    return out


def test_an_epoch_visits_every_window_once_in_a_seeded_order(corpus):
    shards, _, _ = corpus
    loader = TokenLoader(shards, seq_len=8, batch_size=1, seed=3)
    n = loader.num_windows
    assert n == (shards.num_tokens - 1) // 8
    epoch0, epoch1 = windows_of(loader, n), windows_of(loader, n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and loader.epoch == 2
    assert windows_of(TokenLoader(shards, seq_len=8, batch_size=1, seed=3), n) == epoch0
    assert windows_of(TokenLoader(shards, seq_len=8, batch_size=1, seed=4), n) != epoch0


def test_resume_gives_exactly_the_next_batches(corpus):
    shards, _, _ = corpus
    make = lambda: TokenLoader(shards, seq_len=32, batch_size=5, seed=7, rank=1, world_size=2)
    uninterrupted = make()
    steps = int(uninterrupted.batches_per_epoch) + 3  # the resumed part crosses an epoch boundary
    reference = [uninterrupted.next_batch() for _ in range(2 * steps)]

    first = make()
    for _ in range(steps):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for ref_inputs, ref_labels in reference[steps:]:
        inputs, labels = resumed.next_batch()
        assert torch.equal(inputs, ref_inputs) and torch.equal(labels, ref_labels)
    assert resumed.epoch >= 1


def test_resume_refuses_a_different_setup(corpus):
    shards, _, _ = corpus
    state = TokenLoader(shards, seq_len=32, batch_size=2, seed=7).state_dict()
    with pytest.raises(LevanteError, match="seq_len=32, this run has seq_len=16"):
        TokenLoader(shards, seq_len=16, batch_size=2, seed=7).load_state_dict(state)


def test_ranks_split_the_global_batch_whatever_the_world_size(corpus):
    shards, _, _ = corpus
    make = lambda batch, rank, world: TokenLoader(shards, seq_len=8, batch_size=batch, seed=5, rank=rank,
                                                   world_size=world)
    one = make(12, 0, 1)
    n_batches = int(one.batches_per_epoch) + 2  # crosses an epoch boundary
    reference = [one.next_batch()[0] for _ in range(n_batches)]
    for world in (2, 3, 4):
        loaders = [make(12 // world, r, world) for r in range(world)]
        for ref in reference:
            rows = torch.cat([loader.next_batch()[0] for loader in loaders])
            assert torch.equal(rows, ref), f"world size {world}: the global batch differs from 1 rank's"
        assert len({(loader.epoch, loader.position) for loader in loaders}) == 1  # lockstep
        resumed = make(12 // world, 1, world)
        resumed.load_state_dict(one.state_dict())  # a 1-rank state resumes at any world size
        assert resumed.state_dict() == loaders[1].state_dict()


def test_label_languages_follow_the_documents(corpus):
    shards, _, _ = corpus
    loader = TokenLoader(shards, seq_len=16, batch_size=3, seed=0)
    loader.next_batch()
    langs = loader.label_lang_ids()
    for row, w in enumerate(loader.last_windows):
        for t in range(16):
            pos = w * 16 + 1 + t
            doc = int(np.searchsorted(shards.docs[:, 0], pos, side="right") - 1)
            assert langs[row, t] == shards.docs[doc, 2]


def test_too_few_tokens_is_an_error_with_numbers(corpus):
    shards, _, _ = corpus
    with pytest.raises(LevanteError, match=f"hold {shards.num_tokens} tokens.*seq_len \\+ 1 = "
                                           f"{shards.num_tokens + 1}"):
        TokenLoader(shards, seq_len=shards.num_tokens, batch_size=1, seed=0)
    with pytest.raises(LevanteError, match="batch_size must be a positive integer"):
        TokenLoader(shards, seq_len=8, batch_size=0, seed=0)


def test_eval_windows_score_every_token_of_whole_documents_once(corpus):
    shards, tok, texts = corpus
    T = 24
    evals = language_eval_windows(shards, T)
    assert set(evals) == {"en", "el", "pl"}
    for lang, ev in evals.items():
        docs = [t for lg, t in texts if lg == lang]
        # scored: each document's text and eos; each bos is context only
        expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in docs])
        stream = [i for t in docs for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
        assert ev.num_docs == len(docs)
        assert ev.num_bytes == sum(len(t.encode("utf-8")) for t in docs)
        assert ev.num_tokens == int(ev.mask.sum()) == len(expected)
        assert ev.windows.shape == (math.ceil((len(stream) - 1) / T), T + 1)
        assert torch.cat([ev.windows[0, :1], ev.windows[:, 1:].flatten()])[: len(stream)].tolist() == stream
        assert ev.inputs[0, 0] == tok.bos_id  # the first scored token has its document's bos as context
        assert not (ev.windows[:, 1:][ev.mask] == tok.bos_id).any()
        assert np.array_equal(ev.windows[:, 1:][ev.mask].numpy(), expected)
        assert (ev.labels == -100).sum() == ev.mask.numel() - ev.num_tokens
        assert torch.equal(ev.windows[1:, 0], ev.windows[:-1, -1])  # windows chain without gaps
        assert ev.bits_per_byte(ev.num_bytes * math.log(2)) == pytest.approx(1.0)


def test_eval_window_budget_keeps_whole_documents(corpus):
    shards, _, texts = corpus
    T, cap = 16, 3
    evals = language_eval_windows(shards, T, max_windows_per_lang=cap)
    assert set(evals) == set(shards.langs)  # every language keeps at least one document
    for lang, ev in evals.items():
        code = shards.langs.index(lang)
        rows = [i for i in range(len(shards)) if shards.docs[i, 2] == code]
        chosen_bytes, used, last = 0, 0, 0
        for i in rows:  # the documented rule: whole documents in order until the budget is covered
            if used >= cap * T:
                break
            last = int(shards.docs[i, 1]) - 1  # scored tokens: all but the bos
            used += last
            chosen_bytes += int(shards.docs[i, 3])
        assert (ev.num_tokens, ev.num_bytes) == (used, chosen_bytes)
        assert used - last < cap * T  # only the last document may run past the budget
        assert ev.windows.shape[0] == math.ceil((used + ev.num_docs - 1) / T)
