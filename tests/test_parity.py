"""`levante tokenizer report --parallel`: premiums checked against the tokenizers library counting
the same text itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

SHARED = Path("/work/shared/data") if Path("/work/shared/data").is_dir() else \
    Path(__file__).resolve().parents[2] / "shared" / "data"

EN = "The dog runs home.\nThe fox sleeps under the old tree.\n"
DE = "Der Hund läuft nach Hause.\nDer Fuchs schläft unter dem alten Baum.\n"
EL = "Ο σκύλος τρέχει σπίτι.\nΗ αλεπού κοιμάται κάτω από το παλιό δέντρο.\n"


def test_report_json_table_and_chart(run_levante, tiny_workspace, tmp_path):
    par = tmp_path / "par"
    par.mkdir()
    for lang, text in {"en": EN, "de": DE, "el": EL}.items():
        (par / f"{lang}.txt").write_text(text, encoding="utf-8")
    r = run_levante("tokenizer", "report", tiny_workspace.tokenizer, "--parallel", par, "--json",
                    "--chart", tmp_path / "premium.png")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    hf = Tokenizer.from_file(str(tiny_workspace.tokenizer))
    tokens = {lang: len(hf.encode(t.rstrip("\n"), add_special_tokens=False).ids)
              for lang, t in {"en": EN, "de": DE, "el": EL}.items()}
    for lang in tokens:
        row = summary["languages"][lang]
        assert row["tokens"] == tokens[lang]
        assert abs(row["premium"] - tokens[lang] / tokens["en"]) < 1e-3
        assert abs(row["bytes_per_token"] - len((EN, DE, EL)[("en", "de", "el").index(lang)].rstrip("\n")
                                                    .encode()) / tokens[lang]) < 1e-3
    assert summary["max_premium"]["lang"] == max(("de", "el"), key=lambda k: tokens[k])
    assert (tmp_path / "premium.png").read_bytes()[:4] == b"\x89PNG"
    table = run_levante("tokenizer", "report", tiny_workspace.tokenizer, "--parallel", par)
    assert table.returncode == 0 and "premium vs en" in table.stdout
    bad = run_levante("tokenizer", "report", tmp_path / "nope.json", "--parallel", par)
    assert bad.returncode == 2 and "tokenizer not found" in bad.stderr


# ------------------------------------------------------------------------------ parity-aware BPE


def _naive_bpe(counts, num_merges):
    """Textbook BPE, recounting every pair from scratch each step (the oracle for one language)."""
    from collections import Counter

    words = {tuple(w): c for w, c in counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for sym, c in words.items():
            for p in zip(sym, sym[1:], strict=False):
                pairs[p] += c
        if not pairs:
            break
        top = max(pairs.values())
        if top < 2:
            break
        pick = min(p for p, c in pairs.items() if c == top)
        merges.append(pick)
        new_words = {}
        for sym, c in words.items():
            out, k = [], 0
            while k < len(sym):
                if k + 1 < len(sym) and (sym[k], sym[k + 1]) == pick:
                    out.append(sym[k] + sym[k + 1])
                    k += 2
                else:
                    out.append(sym[k])
                    k += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges, words


TEXT = ("the cat sat on the mat and the dog sat on the log; the cats and the dogs ran to the barn "
        "where a farmer fed them bread and water every morning before the sun rose over the hills")


def test_one_language_equals_textbook_bpe_and_hf_encodes_as_trained():
    from levante.tokenizer.parity_bpe import build_tokenizer, train_parity_bpe, word_counts
    from levante.tokenizer.tokenizer import SPECIAL_TOKENS

    counts = word_counts([TEXT * 3])
    merges = train_parity_bpe({"en": counts}, {"en": counts}, 60)
    want, segmented = _naive_bpe(counts, 60)
    assert merges == want
    tok = build_tokenizer(merges, list(SPECIAL_TOKENS))
    from tokenizers import pre_tokenizers

    pieces = []
    for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(TEXT):
        pieces += next(list(s) for s in segmented if "".join(s) == piece)
    assert tok.encode(TEXT, add_special_tokens=False).tokens == pieces


def test_merges_go_to_the_worst_compressed_language():
    from levante.tokenizer.parity_bpe import train_parity_bpe, word_counts

    big = word_counts(["the cat sat on the mat " * 200])
    small = word_counts(["ο σκύλος τρέχει σπίτι " * 5])
    merges = train_parity_bpe({"en": big, "el": small}, {"en": word_counts(["the cat"]),
                                                       "el": word_counts(["ο σκύλος"])}, 40)
    # plain BPE would spend every early merge on English (40x the data); Greek, with two bytes per
    # letter and so the most tokens on the parallel line, gets the first merge
    first = merges[0][0] + merges[0][1]
    assert not first.isascii()
    assert any(m[0].isascii() for m in merges)  # and English gets merges once Greek has caught up


@pytest.mark.skipif(not (SHARED / "flores").is_dir(), reason="../shared/data not present")
def test_parity_mode_lowers_the_worst_premium_on_held_out_parallel_text(tmp_path):
    import shutil

    from levante.tokenizer import train_tokenizer
    from levante.tokenizer.parity import parallel_summary, parity_report

    src, dev, test = tmp_path / "src", tmp_path / "dev", tmp_path / "test"
    for d in (src, dev, test):
        d.mkdir()
    for lang in ("en", "el", "de"):
        shutil.copy(SHARED / "corpus" / lang / "train.jsonl", src / f"{lang}.train.jsonl")
        (dev / f"{lang}.txt").write_text("\n".join((SHARED / "flores" / "dev" / f"{lang}.txt")
                                                   .read_text(encoding="utf-8").splitlines()[:300]))
        shutil.copy(SHARED / "flores" / "devtest" / f"{lang}.txt", test / f"{lang}.txt")
    out = {}
    for mode, parity in (("frequency", None), ("parity", [dev])):
        r = train_tokenizer([src], tmp_path / mode, 700, max_bytes_per_lang=60_000, parity_paths=parity,
                            mode=mode)
        out[mode] = parallel_summary(parity_report(r.path, [test]))
    assert out["parity"]["max_premium"]["premium"] < out["frequency"]["max_premium"]["premium"] - 0.1, out


# ------------------------------------------------------------------- hybrid rule (the default mode)


def _sum_counts(*tables):
    from collections import Counter

    total = Counter()
    for t in tables:
        total.update(t)
    return total


def test_infinite_tolerance_is_plain_bpe_on_the_whole_corpus():
    from levante.tokenizer.parity_bpe import train_parity_bpe, word_counts

    en = word_counts([TEXT * 3])
    # shared words too, so the corpus lane must add the languages' counts, not pick one
    el = word_counts(["ο σκύλος τρέχει σπίτι και η γάτα κοιμάται στο σπίτι " * 4 + "the dog ran to the barn " * 5])
    dev = {"en": word_counts(["the cat"]), "el": word_counts(["ο σκύλος"])}
    merges = train_parity_bpe({"en": en, "el": el}, dev, 80, tolerance=float("inf"),
                              dev_chars={"en": 7, "el": 8})
    want, _ = _naive_bpe(_sum_counts(en, el), 80)
    assert merges == want


def test_a_language_above_tolerance_gets_merges_until_it_is_back_within_it():
    from collections import Counter

    from levante.tokenizer.parity_bpe import GLOBAL, train_parity_bpe, word_counts

    en_text = "the cat sat on the mat and the dog sat on the log " * 40
    el_text = "ο σκύλος τρέχει στο σπίτι και η γάτα κοιμάται " * 4
    train = {"en": word_counts([en_text]), "el": word_counts([el_text])}
    dev_text = {"en": "the dog sat on the mat", "el": "η γάτα τρέχει στο σπίτι"}
    dev = {k: word_counts([v]) for k, v in dev_text.items()}
    chars = {k: len(v) for k, v in dev_text.items()}
    by = {}
    for tol in (0.2, float("inf")):
        by[tol] = Counter()
        train_parity_bpe(train, dev, 30, tolerance=tol, dev_chars=chars, picked_by=by[tol])
    # the corpus is 90% English, so plain BPE (infinite tolerance) picks from the corpus only;
    # Greek, at two bytes a letter, starts far above the mean tokens per character and takes merges
    assert by[float("inf")] == {GLOBAL: 30}
    assert by[0.2]["el"] > 0 and by[0.2][GLOBAL] > 0
    assert by[0.2]["en"] == 0  # English is never the worst here
    # the whole-corpus lane takes over once Greek is within the tolerance: more merges, more corpus
    more = Counter()
    train_parity_bpe(train, dev, 120, tolerance=0.2, dev_chars=chars, picked_by=more)
    assert more[GLOBAL] - by[0.2][GLOBAL] > more["el"] - by[0.2]["el"]


def _write_corpus(root, langs):
    import random

    root.mkdir()
    words = {"en": "the quick brown fox jumps over a lazy dog and runs home".split(),
             "el": "η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο".split(),
             "de": "der schnelle braune Fuchs springt über den faulen Hund".split()}
    for lang, ndocs in langs.items():
        rng = random.Random(lang)
        with open(root / f"{lang}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(ndocs):
                text = " ".join(rng.choice(words[lang]) for _ in range(40))
                f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    return root


def test_default_mode_holds_out_documents_is_deterministic_and_round_trips(tmp_path):
    from levante.tokenizer import LevanteTokenizer, train_tokenizer

    src = _write_corpus(tmp_path / "src", {"en": 200, "el": 30, "de": 60})
    a = train_tokenizer([src], tmp_path / "a", 400)
    b = train_tokenizer([src], tmp_path / "b", 400)
    assert a.sha256 == b.sha256 and a.mode == "hybrid"
    for lang, ndocs in {"en": 200, "el": 30, "de": 60}.items():  # about a tenth, not trained on
        held = a.languages[lang].docs_held_out
        assert 0 < held <= ndocs // 10 and a.languages[lang].docs_seen == ndocs - held
    assert a.merges_by["el"] > 0 and sum(a.merges_by.values()) == 400 - 7 - 256
    tok = LevanteTokenizer(a.path)
    for text in ("the lazy dog", "η γρήγορη αλεπού 😀", "über\tden\n  Hund "):
        assert tok.decode(tok.encode(text)) == text
    plain = train_tokenizer([src], tmp_path / "plain", 400, mode="frequency")
    greek = "η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο"
    assert len(tok.encode(greek)) < len(LevanteTokenizer(plain.path).encode(greek))


def test_bad_mode_and_tolerance_are_one_line_user_errors(run_levante, tmp_path):
    from levante.errors import LevanteError
    from levante.tokenizer import train_tokenizer

    src = _write_corpus(tmp_path / "src", {"en": 20})
    for kwargs, msg in (({"mode": "bogus"}, "mode must be one of"),
                        ({"tolerance": -1.0}, "tolerance must be >= 0"),
                        ({"mode": "parity", "tolerance": 0.5}, "only applies to mode 'hybrid'"),
                        ({"mode": "frequency", "parity_paths": [src]}, "not mode 'frequency'")):
        with pytest.raises(LevanteError, match=msg):
            train_tokenizer([src], tmp_path / "out", 400, **kwargs)
    r = run_levante("tokenizer", "train", src, "--out", tmp_path / "cli", "--vocab-size", "400",
                    "--mode", "bogus")
    assert r.returncode == 2 and "mode must be one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", range(20))
def test_incremental_pair_counts_survive_overlapping_merges(seed):
    # Words from a two- or three-letter alphabet are full of runs ("abab", "aaaa") where merges overlap;
    # the trainer's local count updates must still give the textbook merge order on the summed counts.
    from levante.tokenizer.parity_bpe import train_parity_bpe, word_counts

    r = random.Random(seed)
    x = word_counts([" ".join("".join(r.choice("ab") for _ in range(r.randint(1, 9))) for _ in range(30))])
    y = word_counts([" ".join("".join(r.choice("abc") for _ in range(r.randint(1, 9))) for _ in range(30))])
    merges = train_parity_bpe({"x": x, "y": y}, {"x": x, "y": y}, 40, tolerance=float("inf"),
                              dev_chars={"x": 5, "y": 5})
    assert merges == _naive_bpe(_sum_counts(x, y), 40)[0]
