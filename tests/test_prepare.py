"""`levante data prepare` end to end on a torture input: exact accounting, every bad record counted
under a named reason with its file and line, provenance and licences, dedup with cluster sizes,
identical bytes for 1 and 2 workers, the output fed straight to `levante tokenize`."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from levante.data.prepare import PrepareConfig, prepare
from levante.errors import LevanteError

EN = ("The old harbour of the town was rebuilt after the storm, and the fishermen who had lost their boats "
      "were given new ones by the council. Every morning they sail out before sunrise and come back in the "
      "afternoon with the catch, which is sold in the covered market near the church. Visitors like to watch "
      "the boats arrive, and some of them buy fish directly from the quay.")
DE = ("Die Bibliothek der Stadt wurde im letzten Jahr renoviert und hat jetzt einen großen Lesesaal mit "
      "Blick auf den Park. Viele Studenten kommen am Nachmittag, um dort zu arbeiten, und am Wochenende "
      "gibt es Lesungen für Kinder, die von den Bürgern der Stadt organisiert werden.")
FR = ("Le marché du samedi attire des habitants de toute la région, qui viennent acheter des légumes, du "
      "fromage et du pain chez les producteurs locaux. Les enfants aiment surtout le stand de crêpes, qui "
      "se trouve près de la fontaine, et les musiciens qui jouent sur la place jusqu'au soir.")
IT = ("La biblioteca comunale è stata ristrutturata l'anno scorso e ora ha una grande sala di lettura con "
      "vista sul parco. Molti studenti vengono nel pomeriggio per lavorare, e nel fine settimana ci sono "
      "letture per bambini organizzate dai cittadini del quartiere.")
TR = ("Dün akşam arkadaşlarımla birlikte sinemaya gittik ve çok güzel bir film izledik, sonra da sahilde "
      "uzun bir yürüyüş yaptık ve geç saatte eve döndük.")
PII = ("Für Rückfragen schreiben Sie bitte an anna.muster@beispiel.de oder überweisen Sie den Betrag auf das "
       "Konto DE89 3704 0044 0532 0130 00, damit die Anmeldung für den Kurs im Herbst gültig wird.")
NEAR_EN = EN.replace("storm", "flood").replace("afternoon", "evening")


def _lines(*records) -> bytes:
    out = []
    for r in records:
        out.append(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode("utf-8"))
    return b"\n".join(out) + b"\n"


@pytest.fixture(scope="module")
def torture(tmp_path_factory) -> tuple[Path, int]:
    """(input dir, documents_in it must report)."""
    root = tmp_path_factory.mktemp("torture") / "in"
    (root / "web").mkdir(parents=True)
    (root / "books").mkdir()
    (root / "closed").mkdir()
    n = 0
    (root / "web" / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + _lines(
        {"text": EN}, {"text": DE}, b"this is not json", b"[1, 2, 3]", {"text": 5}, {"text": "   "},
        {"content": FR}, b'{"text": "caf\xe9 latin-1"}', {"text": TR}, {"text": EN.upper()}, {"text": PII},
        {"text": "word " * 2_100_000}, {"text": "Too short."}, {"text": NEAR_EN}))
    n += 14
    (root / "web" / "a.jsonl.license.json").write_text('{"license": "CC-BY-4.0"}')
    (root / "web" / "b.jsonl.gz").write_bytes(gzip.compress(_lines({"text": FR}, {"text": DE}))[:-8])
    n += 2 + 1  # both records are readable before the cut trailer; the cut itself is one counted reject
    good_zst = zstandard.ZstdCompressor().compress(_lines({"text": IT}, {"text": DE + " Ende."}))
    (root / "web" / "c.jsonl.zst").write_bytes(good_zst[: len(good_zst) // 2])
    n += 1  # a half zstd frame yields nothing readable: one reject for the file
    (root / "books" / "en.txt").write_text("\ufeff" + EN.replace(". ", ".\n") + "\n\n" + IT + "\n", encoding="utf-8")
    n += 2
    (root / "books" / "license.json").write_text('{"license": "public-domain"}')
    (root / "books" / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    n += 1
    (root / "closed" / "x.jsonl").write_bytes(_lines({"text": FR}))
    (root / "closed" / "license.json").write_text('{"license": "proprietary", "tdm_opt_out": true}')
    return root, n


def _read_zst_lines(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.jsonl.zst")):
        with zstandard.ZstdDecompressor().stream_reader(open(f, "rb"), read_across_frames=True) as r:
            out += [json.loads(line) for line in r.read().decode("utf-8").splitlines()]
    return out


@pytest.fixture(scope="module")
def prepared(torture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare([torture[0]], out, PrepareConfig(shard_docs=2), workers=1, license="CC0-1.0")
    return out


def test_exact_accounting_and_named_reasons(torture, prepared):
    report = json.loads((prepared / "report.json").read_text())
    assert report["documents_in"] == torture[1]
    assert report["documents_in"] == report["kept"] + sum(report["rejected"].values()) + report["duplicates"]
    assert report["rejected"] == {
        "malformed json": 1, "record is not an object": 1, "text missing or not a string": 2, "empty text": 1,
        "invalid utf-8": 1, "language not allowed": 1, "too long": 1, "too short": 1,
        "truncated or unreadable file": 3}
    assert report["duplicates_by_kind"] == {"exact duplicate": 3, "near duplicate": 1}
    assert report["pii"] == {"email": 1, "iban": 1}
    assert report["excluded_inputs"] == [{"source": "in/closed/x.jsonl", "reason": "tdm opt-out",
                                         "bytes": (torture[0] / "closed" / "x.jsonl").stat().st_size}]
    rejects = _read_zst_lines(prepared / "rejects")
    assert len(rejects) == sum(report["rejected"].values()) + report["duplicates"]
    assert Counter(r["reason"] for r in rejects) == Counter({**report["rejected"], **report["duplicates_by_kind"]})
    bad_json = next(r for r in rejects if r["reason"] == "malformed json")
    assert (bad_json["source"], bad_json["record"]) == ("in/web/a.jsonl", 3)
    assert any(r["reason"] == "truncated or unreadable file" and r["source"] == "in/books/broken.parquet"
               for r in rejects)


def test_kept_documents_carry_provenance_and_scrubbed_text(prepared):
    docs = _read_zst_lines(prepared / "docs")
    report = json.loads((prepared / "report.json").read_text())
    assert len(docs) == report["kept"] and report["shards"] == (len(docs) + 1) // 2
    assert {d["lang"] for d in docs} == {"en", "de", "fr", "it"}
    for d in docs:
        assert set(d) == {"text", "lang", "lang_score", "source", "record", "license", "dup_cluster"}
        assert 0 < d["lang_score"] <= 1
    en = next(d for d in docs if d["source"] == "in/books/en.txt" and d["record"] == 1)  # books/ sorts first
    assert en["lang"] == "en" and en["license"] == "public-domain"
    assert en["dup_cluster"] == 4  # itself (lines re-wrapped), a.jsonl's copy, its upper-case copy, the edit
    de = next(d for d in docs if d["text"] == DE)
    assert de["license"] == "CC-BY-4.0" and de["dup_cluster"] == 2  # the copy in the truncated gzip
    pii = next(d for d in docs if "<EMAIL>" in d["text"])
    assert "<IBAN>" in pii["text"] and "@" not in pii["text"]
    assert {d["license"] for d in docs if d["source"].startswith("in/books/")} == {"public-domain"}
    assert {d["license"] for d in docs if d["source"].endswith(".gz")} == {"CC0-1.0"}  # the --license default
    assert report["licenses"]["public-domain"]["kept"] == sum(d["license"] == "public-domain" for d in docs)
    assert sum(v["bytes"] for v in report["languages"].values()) == sum(len(d["text"].encode()) for d in docs)


def test_report_html_and_datacard(prepared):
    html = (prepared / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    card = (prepared / "DATACARD.md").read_text()
    for needle in ("CC-BY-4.0", "public-domain", "tdm opt-out", "| en |", "malformed json", "email 1"):
        assert needle in card, needle


def test_workers_give_identical_bytes(torture, prepared, tmp_path):
    out2 = tmp_path / "two"
    prepare([torture[0]], out2, PrepareConfig(shard_docs=2), workers=2, license="CC0-1.0")
    files1 = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2
    for rel in files1:
        if rel.suffix == ".zst" or rel.name == "report.json":
            assert (prepared / rel).read_bytes() == (out2 / rel).read_bytes(), rel


def test_output_dir_is_not_overwritten(torture, prepared):
    with pytest.raises(LevanteError, match="not empty"):
        prepare([torture[0]], prepared)


def test_tokenize_reads_the_prepared_dir(prepared, tiny_workspace, tmp_path):
    from levante.data.shards import tokenize_corpus

    index = tokenize_corpus([prepared], tiny_workspace.tokenizer, tmp_path / "shards")
    report = json.loads((prepared / "report.json").read_text())
    assert index.num_documents == report["kept"]  # kept docs only: the rejects next to them are not read
    assert set(index.per_lang) == {"en", "de", "fr", "it"}


def test_cli_prepare_and_bad_config(run_levante, torture, tmp_path):
    bad = tmp_path / "data.toml"
    bad.write_text("[filters.default]\nmin_charz = 3\n")
    r = run_levante("data", "prepare", torture[0] / "books", "--out", tmp_path / "o", "--config", bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "min_charz" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text('text_field = "body"\n[dedup]\nnear = false\n[langid.min_score_per_lang]\nen = 0.3\n')
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jsonl").write_text(json.dumps({"body": EN}) + "\n" + json.dumps({"text": DE}) + "\n")
    r = run_levante("data", "prepare", src, "--out", tmp_path / "o2", "--config", good)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert (report["kept"], report["rejected"]) == (1, {"text missing or not a string": 1})
    r = run_levante("data", "prepare", tmp_path / "missing", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "not found" in r.stderr
