"""Language-ID accuracy per EU language: py3langid closed to the 24 EU languages, py3langid open to
all its labels, and Levante's decision (open set + group evidence, levante.data.langid).

Data (read in place): FLORES dev + devtest sentences, and lines > 40 characters of the shared
corpus's valid split (news / legal / fiction prose from UD, Common Voice, Tatoeba, Gutenberg).
A document counts as correct only when it is kept with the right label (a rejection is an error).

    python benchmarks/bench_langid.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from common import cpu_model
from levante.data.langid import EU_LANGUAGES, LangIdConfig, LanguageIdentifier


def load(data: Path, lang: str) -> dict[str, list[str]]:
    flores = []
    for split in ("dev", "devtest"):
        flores += (data / "flores" / split / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
    corpus = []
    with open(data / "corpus" / lang / "valid.jsonl", encoding="utf-8") as f:
        for line in f:
            corpus += [p for p in json.loads(line)["text"].split("\n") if len(p) > 40]
    return {"flores": flores, "corpus": corpus[:500]}


def accuracy(ident: LanguageIdentifier, texts: list[str], lang: str, *, use_reject: bool) -> float:
    good = 0
    for t in texts:
        r = ident.identify(t)
        good += r.lang == lang and (not use_reject or ident.reject_reason(r) is None)
    return good / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sides = {
        "py3langid closed (24 EU)": (LanguageIdentifier(LangIdConfig(combine=False), restrict=EU_LANGUAGES), False),
        "py3langid open": (LanguageIdentifier(LangIdConfig(combine=False)), False),
        "levante (open + groups + thresholds)": (LanguageIdentifier(), True),
    }
    n_labels = len(LanguageIdentifier().labels)
    rows, t0, n = {}, time.perf_counter(), 0
    for lang in EU_LANGUAGES:
        sets = load(args.data, lang)
        for name, texts in sets.items():
            n += len(texts)
            rows[(lang, name)] = {side: accuracy(ident, texts, lang, use_reject=rej)
                                  for side, (ident, rej) in sides.items()}
            rows[(lang, name)]["n"] = len(texts)
    secs = time.perf_counter() - t0
    print(f"# language ID, {date.today()}, {cpu_model()}, open set = {n_labels} labels\n")
    print("| lang | set | n | " + " | ".join(sides) + " |")
    print("|---|---|---:|" + "---:|" * len(sides))
    for (lang, name), r in rows.items():
        print(f"| {lang} | {name} | {r['n']} | " + " | ".join(f"{100 * r[s]:.1f}%" for s in sides) + " |")
    for s in sides:
        worst = min(rows.items(), key=lambda kv: kv[1][s])
        print(f"\n{s}: worst {worst[0][0]} {worst[0][1]} {100 * worst[1][s]:.1f}%", end="")
    print(f"\n\n{n} texts x {len(sides)} sides in {secs:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"date": str(date.today()), "cpu": cpu_model(), "argv": sys.argv,
                                         "labels": n_labels,
                                         "rows": [{"lang": k[0], "set": k[1], **v} for k, v in rows.items()]},
                                        indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
