"""`levante tokenizer report --parallel`: premiums checked against the tokenizers library counting
the same text itself."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

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
