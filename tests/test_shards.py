"""Token shards: deterministic across worker counts, every document `bos text eos`, safe to open."""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from levante.data.shards import open_shards, token_dtype, tokenize_corpus
from levante.errors import LevanteError
from levante.tokenizer import SPECIAL_TOKENS, LevanteTokenizer, train_tokenizer

TEXTS = {
    "en": ["The fox runs home.", "A lazy dog sleeps by the fire 🔥.", "Short."],
    "el": ["Η αλεπού τρέχει σπίτι.", "Ο σκύλος κοιμάται."],
    "bg": ["Лисицата тича към къщи.", "Кучето спи до огъня."],
}


def write_corpus(d, n_repeat=8):
    """Three language files with a few broken lines: per-language totals and rejects are known."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for lang, texts in TEXTS.items():
        with open(d / f"{lang}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n_repeat):
                for t in texts:
                    f.write(json.dumps({"text": f"{t} {rng.randint(0, 999)} #{i}", "lang": lang},
                                       ensure_ascii=False) + "\n")
            f.write("{broken json\n")
            f.write('{"text": ""}\n')
    return sorted(d.glob("*.jsonl"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths = write_corpus(d / "corpus")
    report = train_tokenizer(paths, d / "tok", vocab_size=300)
    return d, paths, report.path


def test_shards_are_byte_identical_for_any_worker_count(setup):
    d, paths, tok_path = setup
    one = tokenize_corpus(paths, tok_path, d / "w1", workers=1, chunk_docs=5)
    two = tokenize_corpus(paths, tok_path, d / "w2", workers=2, chunk_docs=5)
    for name in ("tokens.bin", "docs.npy", "index.json"):
        assert (d / "w1" / name).read_bytes() == (d / "w2" / name).read_bytes()
    assert one.num_tokens == two.num_tokens > 0
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_every_document_is_bos_text_eos_and_decodes_back(setup):
    d, paths, tok_path = setup
    index = tokenize_corpus(paths, tok_path, d / "eos", chunk_docs=4)
    tok = LevanteTokenizer(tok_path)
    shards = open_shards(d / "eos", expected_tokenizer_sha256=tok.sha256)
    texts = [json.loads(line)["text"] for p in paths for line in p.read_text(encoding="utf-8").splitlines()
             if line.startswith('{"text": "') and line != '{"text": ""}']
    assert len(shards) == len(texts) == index.num_documents == 8 * sum(map(len, TEXTS.values()))
    assert int(shards.docs[:, 1].sum()) == shards.num_tokens
    assert int(np.count_nonzero(np.asarray(shards.tokens) == tok.eos_id)) == len(texts)
    assert int(np.count_nonzero(np.asarray(shards.tokens) == tok.bos_id)) == len(texts)
    for i, text in enumerate(texts):
        doc = shards.document(i)
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        assert doc[1:-1].tolist() == tok.encode(text)
        assert tok.decode(doc[1:-1]) == text
        assert shards.docs[i, 3] == len(text.encode("utf-8"))
    assert shards.lang(0) == "bg" and shards.lang(len(texts) - 1) == "en"
    assert index.per_lang["el"] == {
        "docs": 16, "tokens": int(shards.docs[shards.docs[:, 2] == shards.langs.index("el"), 1].sum()),
        "bytes": sum(len(t.encode()) for t in texts if any(t.startswith(x) for x in TEXTS["el"]))}
    assert index.rejected == {"malformed json": 3, "empty text": 3}
    assert shards.tokens.dtype == np.uint16


def _big_vocab_tokenizer(path, size):
    """A valid Levante tokenizer whose vocabulary is `size` (filler tokens, no merges)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    while len(vocab) < size:
        vocab[f"filler{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))
    return path


def test_dtype_follows_vocab_size(setup, tmp_path):
    _, paths, _ = setup
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tok_path = _big_vocab_tokenizer(tmp_path / "big.json", 70000)
    index = tokenize_corpus(paths[:1], tok_path, tmp_path / "big")
    shards = open_shards(tmp_path / "big")
    assert index.dtype == "uint32" and shards.tokens.dtype == np.uint32
    assert (tmp_path / "big" / "tokens.bin").stat().st_size == 4 * shards.num_tokens
    tok = LevanteTokenizer(tok_path)
    assert tok.decode(shards.document(0)[:-1]) == json.loads(paths[0].read_text().splitlines()[0])["text"]


def test_foreign_tokenizer_is_refused(setup):
    d, paths, tok_path = setup
    tokenize_corpus(paths, tok_path, d / "foreign")
    sha = LevanteTokenizer(tok_path).sha256
    other = "f" * 64
    with pytest.raises(LevanteError, match=f"made with tokenizer {sha[:12]}, not {other[:12]}; re-run"):
        open_shards(d / "foreign", expected_tokenizer_sha256=other)
    assert open_shards(d / "foreign", expected_tokenizer_sha256=sha).num_tokens > 0


def test_missing_or_corrupt_shards_are_user_errors(setup, tmp_path):
    _, paths, tok_path = setup
    with pytest.raises(LevanteError, match="no shard index"):
        open_shards(tmp_path / "nothing")
    out = tmp_path / "s"
    tokenize_corpus(paths, tok_path, out)
    tokens = (out / "tokens.bin").read_bytes()
    (out / "tokens.bin").write_bytes(tokens[:-2])
    with pytest.raises(LevanteError, match="corrupt shards"):
        open_shards(out)
    (out / "tokens.bin").write_bytes(tokens)
    (out / "index.json").write_text('{"format": "levante-shards", "version": 1')
    with pytest.raises(LevanteError, match="corrupt shard index"):
        open_shards(out)


def test_existing_output_is_kept_unless_overwrite(setup, tmp_path):
    _, paths, tok_path = setup
    out = tmp_path / "s"
    first = tokenize_corpus(paths[:1], tok_path, out)
    with pytest.raises(LevanteError, match="not empty"):
        tokenize_corpus(paths, tok_path, out)
    assert open_shards(out).num_tokens == first.num_tokens
    second = tokenize_corpus(paths, tok_path, out, overwrite=True)
    assert open_shards(out).num_tokens == second.num_tokens > first.num_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_empty_corpus_is_an_error_and_leaves_nothing(setup, tmp_path):
    _, _, tok_path = setup
    (tmp_path / "bad.jsonl").write_text('nope\n{"text": "  "}\n')
    with pytest.raises(LevanteError, match="empty corpus.*2 rejected"):
        tokenize_corpus([tmp_path / "bad.jsonl"], tok_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    with pytest.raises(LevanteError, match="input not found"):
        tokenize_corpus([tmp_path / "missing.jsonl"], tok_path, tmp_path / "out")
