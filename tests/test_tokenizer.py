"""Byte-level BPE tokenizer: exact round trip, fixed special ids, HF compatibility, language balance."""

import json
import random

import pytest

from levante.errors import LevanteError
from levante.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    LevanteTokenizer,
    parity_report,
    render_chat,
    train_tokenizer,
    write_hf_tokenizer_files,
)

WORDS = {
    "en": "the quick brown fox jumps over a lazy dog and then runs back home to sleep near the fire".split(),
    "de": "der schnelle braune Fuchs springt über den faulen Hund und läuft dann nach Hause".split(),
    "el": "η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο και μετά τρέχει πίσω στο σπίτι".split(),
    "bg": "бързата кафява лисица скача над мързеливото куче и после тича обратно към къщи".split(),
}

SAMPLES = [
    "Hello, world! The fox sleeps.",
    "Der Fuchs läuft über die Straße — schnell.",
    "Η γρήγορη καφέ αλεπού πηδάει.",
    "Бързата кафява лисица скача.",
    "emoji 😀🇪🇺👩‍💻 and tabs\tand\nnewlines\r\n  double  spaces ",
    "中文和日本語のテキスト, never seen in training",
    "literal <|eos|> and <|user|> in a document",
]


def write_lang(path, lang, ndocs, seed=0, words=30):
    rng = random.Random(f"{lang}-{seed}")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(ndocs):
            text = " ".join(rng.choice(WORDS[lang]) for _ in range(words)) + "."
            f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    paths = [write_lang(d / f"{lang}.jsonl", lang, 60) for lang in WORDS]
    report = train_tokenizer(paths, d / "out", vocab_size=400, alpha=0.3, seed=0)
    return d, report


def test_round_trip_is_exact_for_any_script(trained):
    _, report = trained
    tok = LevanteTokenizer(report.path)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    batch = tok.encode_batch(SAMPLES)
    assert batch == [tok.encode(t) for t in SAMPLES]
    # trained merges compress the training languages below one token per character (the default
    # mode spends this tiny vocabulary mostly on Greek and Bulgarian, two bytes a letter)
    english, greek = "the quick brown fox jumps over a lazy dog", " πηδάει πάνω από τον τεμπέλη σκύλο"
    assert len(tok.encode(english)) < 0.8 * len(english)
    assert len(tok.encode(greek)) < 0.75 * len(greek)


def test_special_tokens_have_fixed_ids_and_corpus_text_cannot_forge_them(trained):
    _, report = trained
    tok = LevanteTokenizer(report.path)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "a <|eos|> b"
    assert not set(tok.encode(text)) & set(range(7))  # literal text stays literal
    assert tok.eos_id in tok.encode(text, allow_special=True)
    with_specials = [tok.bos_id] + tok.encode("hi") + [tok.eos_id]
    assert tok.decode(with_specials) == "hi"
    assert tok.decode(with_specials, skip_special_tokens=False) == "<|bos|>hi<|eos|>"
    assert report.vocab_size == tok.vocab_size == 400 and len(tok.sha256) == 64


def test_transformers_loads_the_directory_and_agrees(trained):
    transformers = pytest.importorskip("transformers")
    _, report = trained
    tok = LevanteTokenizer(report.path)
    out_dir = report.path.parent
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(out_dir)
        for text in SAMPLES[:-1]:  # the last one holds literal specials, which HF maps to ids
            # documents start with bos: transformers' default tokenization is Levante's prompt
            assert hf(text)["input_ids"] == tok.encode_prompt(text) == [tok.bos_id, *tok.encode(text)]
            assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text)) == text
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hallo"}],
        [{"role": "user", "content": "Γειά σου, τι κάνεις;"}, {"role": "assistant", "content": " Καλά!"},
         {"role": "user", "content": "ok\nbye"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            chat = hf.apply_chat_template(messages, add_generation_prompt=gen)
            ids = chat["input_ids"] if hasattr(chat, "keys") else chat
            assert ids == render_chat(tok, messages, add_generation_prompt=gen)
    ids = render_chat(tok, conversations[0])
    assert ids[0] == 0 and ids[1] == 3 and 4 in ids and ids.count(6) == 2 and ids[-1] == 5


def test_hf_files_exported_to_another_directory(trained, tmp_path):
    _, report = trained
    written = write_hf_tokenizer_files(report.path, tmp_path / "export", model_max_length=512)
    assert sorted(p.name for p in written) == ["special_tokens_map.json", "tokenizer.json",
                                               "tokenizer_config.json"]
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == report.path.read_bytes()
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 512 and config["eos_token"] == "<|eos|>"


def test_language_balance_moves_sampled_shares_and_fertility(tmp_path):
    paths = [write_lang(tmp_path / "en.jsonl", "en", 400), write_lang(tmp_path / "el.jsonl", "el", 20)]
    evals = [write_lang(tmp_path / "v_en.jsonl", "en", 20, seed=1),
             write_lang(tmp_path / "v_el.jsonl", "el", 20, seed=1)]
    reports = {a: train_tokenizer(paths, tmp_path / f"a{a}", 400, alpha=a, eval_paths=evals, mode="frequency")
               for a in (1.0, 0.5, 0.0)}
    natural = reports[1.0].languages["el"].share_seen
    assert natural < 0.15
    el_shares = [reports[a].languages["el"].share_sampled for a in (1.0, 0.5, 0.0)]
    assert el_shares[0] == pytest.approx(natural, abs=0.01)
    assert el_shares[0] < el_shares[1] < el_shares[2]
    assert el_shares[2] == pytest.approx(0.5, abs=0.03)  # alpha=0: uniform over two languages
    assert reports[0.0].languages["el"].docs_sampled > 20  # the minority language was upsampled
    # more Greek in the mix -> more Greek merges -> fewer tokens per Greek byte
    assert reports[0.0].fertility["el"].tokens_per_byte < reports[1.0].fertility["el"].tokens_per_byte
    assert reports[1.0].fertility["en"].parity == 1.0
    assert reports[0.0].fertility["el"].tokens_per_word > 0
    # the hybrid mode balances characters, not bytes: at alpha=0 Greek (two bytes a letter) gets
    # about as much text as English, so well over half the bytes
    hybrid = train_tokenizer(paths, tmp_path / "hybrid", 400, alpha=0.0)
    assert hybrid.languages["el"].share_sampled > 0.6


def test_training_is_deterministic(trained, tmp_path):
    d, report = trained
    again = train_tokenizer([d / f"{lang}.jsonl" for lang in WORDS], tmp_path / "t.json", 400, alpha=0.3, seed=0)
    assert again.path == tmp_path / "t.json"
    assert again.sha256 == report.sha256


def test_vocab_too_small_names_the_minimum(trained, tmp_path):
    d, _ = trained
    with pytest.raises(LevanteError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer([d / "en.jsonl"], tmp_path, vocab_size=MIN_VOCAB_SIZE - 1)
    assert not (tmp_path / "tokenizer.json").exists()


def test_empty_corpus_and_bad_tokenizer_files_are_user_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\nnot json\n')
    with pytest.raises(LevanteError, match="no documents.*2 rejected"):
        train_tokenizer([tmp_path / "empty.jsonl"], tmp_path / "out", 400)
    with pytest.raises(LevanteError, match="tokenizer not found"):
        LevanteTokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LevanteError, match="not a valid tokenizer.json"):
        LevanteTokenizer(tmp_path / "bad.json")


def test_parity_report_on_parallel_files(trained, tmp_path):
    _, report = trained
    (tmp_path / "en.txt").write_text("the dog runs home\nthe fox sleeps\n", encoding="utf-8")
    (tmp_path / "el.txt").write_text("ο σκύλος τρέχει σπίτι\nη αλεπού κοιμάται\n", encoding="utf-8")
    result = parity_report(report.path, [tmp_path])
    assert set(result) == {"en", "el"}
    assert result["en"].premium == 1.0 and result["en"].parity == 1.0
    assert result["el"].premium == result["el"].tokens / result["en"].tokens
