"""Token premium on FLORES devtest for plain BPE (alpha=1), alpha-balanced BPE and parity-aware BPE
(merges chosen on FLORES dev), all 24 EU languages, trained on the shared corpus.

    python benchmarks/bench_parity.py --vocab 8192 --cap 400000 [--data ../shared/data] [--json out.json]
    python benchmarks/bench_parity.py --vocab 32768 --cap 0 --modes plain,alpha   # the CLI default: no cap
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from levante.data.langid import EU_LANGUAGES
from levante.tokenizer import train_tokenizer
from levante.tokenizer.parity import parallel_summary, parity_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--cap", type=int, default=400_000, help="max training bytes per language (0: no cap)")
    ap.add_argument("--modes", default="plain,alpha,parity", help="comma list of plain, alpha, parity")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    src, dev, test = work / "src", work / "dev", work / "test"
    for d in (src, dev, test):
        d.mkdir()
    for lang in EU_LANGUAGES:  # copied to a scratch dir only so the file names carry the language
        shutil.copy(args.data / "corpus" / lang / "train.jsonl", src / f"{lang}.train.jsonl")
        shutil.copy(args.data / "flores" / "dev" / f"{lang}.txt", dev / f"{lang}.txt")
        shutil.copy(args.data / "flores" / "devtest" / f"{lang}.txt", test / f"{lang}.txt")
    results = {}
    modes = {"plain": ("plain (alpha=1)", 1.0, None), "alpha": ("alpha=0.3", 0.3, None),
             "parity": ("parity-aware (alpha=0.3)", 0.3, [dev])}
    for name, alpha, parity in (modes[m] for m in args.modes.split(",")):
        t = time.perf_counter()
        rep = train_tokenizer([src], work / name.split()[0], args.vocab, alpha=alpha,
                              max_bytes_per_lang=args.cap or None, parity_paths=parity)
        summary = parallel_summary(parity_report(rep.path, [test]))
        results[name] = {"seconds": round(time.perf_counter() - t, 1), "vocab_size": rep.vocab_size, **summary}
        r = results[name]
        print(f"{name}: mean premium {r['mean_premium']}, worst {r['max_premium']}, total tokens "
              f"{r['total_tokens']:,}, vocab {r['vocab_size']:,}, {r['seconds']} s", flush=True)
    shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
