"""`levante data prepare` vs a datatrove pipeline of its stock blocks, on the same input, in one run.

The input is built once: the first --per-lang bytes of each of the 24 EU languages' train.jsonl in
../shared/data/corpus, plus a file of injected copies (exact and with small word edits) of a sample
of those documents. Each side then runs in its own subprocess, with one worker; the parent takes the
child's CPU time and peak RSS from os.wait4 (which covers the child's own waited-for children too).

datatrove side, stock blocks only: JsonlReader -> PIIFormatter -> GopherRepetitionFilter ->
GopherQualityFilter (stop words: the union of levante's per-language lists, since datatrove's are
English only) -> JsonlWriter, then its four MinHash stages (signatures, buckets, clusters, filter)
and a JsonlWriter. No language ID on that side: datatrove's LanguageFilter downloads a fastText
model at run time and this benchmark stays offline, so levante does strictly more work.

    python benchmarks/bench_prepare.py [--per-lang 200000] [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_input(data: Path, out: Path, per_lang: int, seed: int = 0) -> dict:
    from levante.data.langid import EU_LANGUAGES

    rng = random.Random(seed)
    out.mkdir(parents=True)
    docs: list[str] = []
    for lang in EU_LANGUAGES:
        size = 0
        with open(data / "corpus" / lang / "train.jsonl", encoding="utf-8") as src, \
                open(out / f"{lang}.jsonl", "w", encoding="utf-8") as dst:
            for line in src:
                if size >= per_lang:
                    break
                dst.write(line)
                size += len(line.encode())
                docs.append(json.loads(line)["text"])
    sample = rng.sample(docs, max(1, len(docs) // 10))  # 10% of the documents get a copy
    with open(out / "copies.jsonl", "w", encoding="utf-8") as dst:
        for i, text in enumerate(sample):
            if i % 2:  # near-duplicate: ~2% of the words replaced
                words = text.split(" ")
                for _ in range(max(1, len(words) // 50)):
                    words[rng.randrange(len(words))] = "xq" + str(rng.randrange(1000))
                text = " ".join(words)
            dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    return {"documents": len(docs) + len(sample), "copies": len(sample), "bytes": total}


def run_levante(inp: Path, out: Path) -> dict:
    from levante.data.prepare import prepare

    rep = prepare([inp], out, workers=1)
    return {"kept": rep["kept"], "rejected": sum(rep["rejected"].values()), "duplicates": rep["duplicates"]}


def run_datatrove(inp: Path, out: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from levante.data.filters import STOP_WORDS

    stops = sorted(set().union(*STOP_WORDS.values()))
    n_files = len(list(inp.glob("*.jsonl")))
    # 14 buckets x 8 hashes, 5-grams: datatrove's defaults; sha1 because its xxhash path passes str, which
    # the installed xxhash refuses
    mh = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
    f, sig, buck, clus, res = (str(out / d) for d in ("filtered", "sigs", "buckets", "clusters", "result"))
    logs = str(out / "logs")

    def ex(pipeline, tasks, name):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{logs}/{name}").run()

    ex([JsonlReader(str(inp)), PIIFormatter(), GopherRepetitionFilter(),
        GopherQualityFilter(stop_words=stops, min_stop_words=1), JsonlWriter(f)], n_files, "filter")
    ex([JsonlReader(f), MinhashDedupSignature(output_folder=sig, config=mh)], n_files, "sigs")
    ex([MinhashDedupBuckets(input_folder=sig, output_folder=buck, config=mh)], mh.num_buckets, "buckets")
    ex([MinhashDedupCluster(input_folder=buck, output_folder=clus, config=mh)], 1, "clusters")
    ex([JsonlReader(f), MinhashDedupFilter(input_folder=clus), JsonlWriter(res)], n_files, "result")

    def count(folder: str) -> int:
        import gzip

        return sum(sum(1 for _ in gzip.open(p, "rt", encoding="utf-8")) for p in Path(folder).glob("*.gz"))

    kept_filter, kept = count(f), count(res)
    docs_in = sum(sum(1 for _ in open(p, encoding="utf-8")) for p in inp.glob("*.jsonl"))
    return {"kept": kept, "rejected": docs_in - kept_filter, "duplicates": kept_filter - kept}


def child(which: str, inp: Path, out: Path, result: Path) -> None:
    t = time.perf_counter()
    counts = (run_levante if which == "levante" else run_datatrove)(inp, out)
    counts["wall_in_child_s"] = round(time.perf_counter() - t, 2)
    result.write_text(json.dumps(counts), encoding="utf-8")


def measure(which: str, inp: Path, work: Path, mb: float) -> dict:
    result = work / f"{which}.json"
    log = work / f"{which}.log"  # datatrove logs every task's stats; kept out of the table
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--child", which, "--input", str(inp),
                                 "--out", str(work / f"out-{which}"), "--result", str(result)],
                                stdout=sink, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(log.read_text(encoding="utf-8")[-4000:])
        raise SystemExit(f"error: the {which} run failed (exit {os.waitstatus_to_exitcode(status)})")
    cpu = ru.ru_utime + ru.ru_stime
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "mb_per_s_per_core": round(mb / cpu, 3),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), **json.loads(result.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--per-lang", type=int, default=200_000, help="bytes taken from each language")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=("levante", "datatrove"))
    ap.add_argument("--input", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--result", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.input, args.out, args.result)
    work = Path(tempfile.mkdtemp())
    try:
        info = build_input(args.data, work / "input", args.per_lang)
        mb = info["bytes"] / 1e6
        print(f"input: {info['documents']:,} documents ({info['copies']:,} injected copies), {mb:.2f} MB", flush=True)
        results = {"input": info}
        for which in ("levante", "datatrove"):
            r = results[which] = measure(which, work / "input", work, mb)
            print(f"{which}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, {r['mb_per_s_per_core']} MB/s per core, "
                  f"peak RSS {r['peak_rss_mib']} MiB; kept {r['kept']:,}, rejected {r['rejected']:,}, "
                  f"duplicates {r['duplicates']:,}", flush=True)
    finally:
        shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
