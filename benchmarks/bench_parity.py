"""Token premium on FLORES devtest for plain BPE (alpha=1), alpha-balanced BPE, the default hybrid
mode of `levante tokenizer train` (held-out documents as the signal, no parallel set), the hybrid
and pure parity-aware modes steered by FLORES dev (`--parity`), all 24 EU languages, trained on the
shared corpus. Every mode trains in its own process, so its peak RSS is its own.

    python benchmarks/bench_parity.py --vocab 32768 --cap 0 [--data ../shared/data] [--json out.json]
    python benchmarks/bench_parity.py --vocab 8192 --cap 400000 --modes plain,default
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from levante.data.langid import EU_LANGUAGES

# name -> (label, train_tokenizer keyword arguments; "parity" gets the FLORES dev folder)
MODES = {
    "plain": ("plain BPE (frequency, alpha=1)", {"mode": "frequency", "alpha": 1.0}),
    "alpha": ("frequency, alpha=0.3 (old default)", {"mode": "frequency", "alpha": 0.3}),
    "default": ("default: hybrid, held-out signal", {}),
    "hybrid_dev": ("hybrid, --parity FLORES dev", {"mode": "hybrid", "parity": True}),
    "parity": ("pure parity-aware, --parity FLORES dev", {"mode": "parity", "parity": True}),
}


def run_one(name: str, work: Path, vocab: int, cap: int) -> dict:
    from levante.tokenizer import train_tokenizer
    from levante.tokenizer.parity import parallel_summary, parity_report

    kwargs = dict(MODES[name][1])
    if kwargs.pop("parity", False):
        kwargs["parity_paths"] = [work / "dev"]
    t = time.perf_counter()
    rep = train_tokenizer([work / "src"], work / name, vocab, max_bytes_per_lang=cap or None, **kwargs)
    seconds = time.perf_counter() - t
    out = {"label": MODES[name][0], "seconds": round(seconds, 1), "vocab_size": rep.vocab_size,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
           "tolerance": rep.tolerance, "merges_by": rep.merges_by}
    for split in ("dev", "devtest"):
        out[split] = parallel_summary(parity_report(rep.path, [work / split]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--cap", type=int, default=0, help="max training bytes per language (0: no cap)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one mode in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.work, args.vocab, args.cap)))
        return
    work = Path(tempfile.mkdtemp())
    for d in ("src", "dev", "devtest"):
        (work / d).mkdir()
    for lang in EU_LANGUAGES:  # copied to a scratch dir only so the file names carry the language
        shutil.copy(args.data / "corpus" / lang / "train.jsonl", work / "src" / f"{lang}.train.jsonl")
        for split in ("dev", "devtest"):
            shutil.copy(args.data / "flores" / split / f"{lang}.txt", work / split / f"{lang}.txt")
    results = {}
    for name in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work), "--vocab",
                               str(args.vocab), "--cap", str(args.cap)], capture_output=True, text=True,
                              check=True)
        r = results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        test = r["devtest"]
        plain = results.get("plain", {}).get("devtest", {}).get("total_tokens")
        over = sorted(k for k, v in test["languages"].items() if v["premium"] > 1.4)
        print(f"{r['label']}: devtest mean {test['mean_premium']}, worst {test['max_premium']}, > 1.4 "
              f"{over or 'none'}, total {test['total_tokens']:,}"
              + (f" ({test['total_tokens'] / plain:.3f}x plain)" if plain else "")
              + f"; dev mean {r['dev']['mean_premium']}, total {r['dev']['total_tokens']:,}; "
              f"{r['seconds']} s, {r['peak_rss_mb']} MB", flush=True)
    shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
