"""Document readers: every supported format, language from records or paths, rejected records counted."""

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from levante.data.readers import Document, ReadStats, bundled_corpus, lang_from_path, read_documents
from levante.errors import LevanteError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

GOOD = [
    {"text": "Hello world.", "lang": "en"},
    {"text": "Καλημέρα κόσμε 🌍", "lang": "el"},
    {"text": "Здравей, свят!", "lang": "bg"},
]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def read(paths):
    stats = ReadStats()
    return list(read_documents(paths, stats)), stats


def test_jsonl_counts_every_kind_of_bad_record(tmp_path):
    p = tmp_path / "mixed.jsonl"
    bad = (b'{"text": "broken\n'                   # malformed json
           b'{"lang": "en"}\n'                     # no text
           b'{"text": 42}\n'                       # text not a string
           b'{"text": "   \\n "}\n'               # empty after whitespace
           b'["a", "list"]\n'                      # not an object
           b'{"text": "caf\xe9"}\n'                # latin-1 byte: invalid utf-8
           b'{"text": "\\ud800 lone surrogate"}\n'  # unencodable text
           b"\n")                                  # blank line: layout, not a record
    p.write_bytes(jsonl_bytes(GOOD[:1]) + bad + jsonl_bytes(GOOD[1:]))
    docs, stats = read([p])
    assert docs == [Document(r["text"], r["lang"]) for r in GOOD]
    assert stats.rejected == {"malformed json": 1, "text missing or not a string": 2, "empty text": 1,
                              "record is not an object": 1, "invalid utf-8": 1, "invalid unicode": 1}
    assert stats.documents == 3 and stats.files == 1
    assert stats.bytes == sum(len(r["text"].encode()) for r in GOOD)


def test_gzip_reads_like_plain_and_lang_falls_back_to_path(tmp_path):
    records = [{"text": "Guten Tag."}, {"text": "Bonjour.", "lang": "fr"}]
    (tmp_path / "de").mkdir()
    plain, gz = tmp_path / "de" / "train.jsonl", tmp_path / "de" / "train.jsonl.gz"
    plain.write_bytes(jsonl_bytes(records))
    gz.write_bytes(gzip.compress(jsonl_bytes(records)))
    want = [Document("Guten Tag.", "de"), Document("Bonjour.", "fr")]
    assert read([plain])[0] == want
    assert read([gz])[0] == want


def test_truncated_gzip_is_a_one_line_error(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl_bytes(GOOD * 50))[:-30])
    with pytest.raises(LevanteError, match="truncated or corrupt"):
        read([p])


def test_zstd_without_package_names_the_fix(tmp_path, monkeypatch):
    p = tmp_path / "x.jsonl.zst"
    p.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(LevanteError, match="pip install zstandard"):
        read([p])


def test_zstd_reads_when_installed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    p = tmp_path / "x.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(GOOD)))
    assert read([p])[0] == [Document(r["text"], r["lang"]) for r in GOOD]


def test_parquet_text_and_optional_lang(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["Hola.", None, "", "Olá."], "lang": ["es", "es", "es", None],
                             "extra": [1, 2, 3, 4]}), p)
    docs, stats = read([p])
    assert docs == [Document("Hola.", "es"), Document("Olá.", None)]
    assert stats.rejected == {"text missing or not a string": 1, "empty text": 1}

    (tmp_path / "it").mkdir()
    q = tmp_path / "it" / "nolang.parquet"
    pq.write_table(pa.table({"text": ["Ciao."]}), q)
    assert read([q])[0] == [Document("Ciao.", "it")]


def test_parquet_without_text_column_is_a_user_error(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["x"]}), p)
    with pytest.raises(LevanteError, match="no 'text' column.*content"):
        read([p])


def test_txt_paragraphs_are_documents(tmp_path):
    p = tmp_path / "de.txt"
    p.write_text("Erster Absatz,\nzweite Zeile.\n\n\n  \nZweiter Absatz.\n", encoding="utf-8")
    docs, _ = read([p])
    assert docs == [Document("Erster Absatz,\nzweite Zeile.", "de"), Document("Zweiter Absatz.", "de")]


@pytest.mark.parametrize("rel, lang", [
    ("en.txt", "en"), ("fr.train.txt", "fr"), ("el/book.txt", "el"), ("dev/pt.txt", "pt"),
    ("notes.txt", None), ("dev/notes.txt", None), ("books/EN.txt", None),
])
def test_lang_from_path(rel, lang):
    assert lang_from_path(Path("/corpus") / rel) == lang


def test_directory_recursion_is_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "nl").mkdir(parents=True)
    (tmp_path / "b" / "sv.txt").write_text("Hej.\n", encoding="utf-8")
    (tmp_path / "a" / "nl" / "x.txt").write_text("Hallo.\n", encoding="utf-8")
    (tmp_path / "a" / "z.jsonl").write_bytes(jsonl_bytes([{"text": "Cześć.", "lang": "pl"}]))
    (tmp_path / "a" / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "en.txt").write_text("hidden\n", encoding="utf-8")
    docs, stats = read([tmp_path])
    assert docs == [Document("Hallo.", "nl"), Document("Cześć.", "pl"), Document("Hej.", "sv")]
    assert stats.files == 3


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(LevanteError, match="input not found"):
        read([tmp_path / "missing.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LevanteError, match="unsupported file type"):
        read([tmp_path / "x.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LevanteError, match="no .* files under"):
        read([tmp_path / "empty"])


def test_bundled_corpus():
    with pytest.raises(LevanteError, match="choose 'train' or 'valid'"):
        bundled_corpus("test")
    try:
        files = bundled_corpus("valid")
    except LevanteError:
        pytest.skip("bundled sample corpus not written yet")
    assert files == sorted(files) and all(f.name.endswith(".valid.jsonl") for f in files)
    docs, stats = read(files[:2])
    assert docs and stats.num_rejected == 0
    assert {d.lang for d in docs} <= {f.name.split(".")[0] for f in files[:2]}


def test_shared_corpus_languages_match_directories():
    path = SHARED / "corpus" / "el" / "valid.jsonl"
    if not path.is_file():
        pytest.skip("shared data not present")
    docs, stats = read([path])
    assert len(docs) >= 5 and stats.num_rejected == 0
    assert {d.lang for d in docs} == {"el"}
