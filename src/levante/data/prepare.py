"""`levante data prepare`: raw text -> clean, deduplicated, provenance-carrying documents.

    reader -> language ID -> quality filters -> PII scrub -> (exact key, MinHash)   one task per input file,
                                                                                   in worker processes
    -> global dedup in document order -> sharded jsonl.zst + rejects + report       the parent, once

Output layout (`DIR`):
  docs/docs-00000.jsonl.zst     kept documents: text, lang, lang_score, source, record, license, dup_cluster
  rejects/rejects-00000.jsonl.zst   one line per rejected record: source, record, reason (+ lang, text)
  report.json  report.html  DATACARD.md

Determinism: each task is one input file, results are merged in input order and dedup decides in
that global order, so the bytes written do not depend on the worker count. Memory: workers stream
their file and write candidates to a scratch file; the parent keeps 16 + 4·num_perm bytes per
document (keys and signatures) and streams the candidates back out.

Accounting: documents_in = kept + sum(rejected) + duplicates, where rejected counts reader
rejections (bad JSON, invalid UTF-8, a truncated archive's tail, ...), language and quality rejects.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from levante.checkpoint.layout import refuse_non_empty
from levante.config import ConfigError, from_dict, read_toml
from levante.data import filters
from levante.data.dedup import DedupConfig, MinHasher, deduplicate, exact_key
from levante.data.langid import LangIdConfig, LanguageIdentifier
from levante.data.pii import PiiConfig, scrub
from levante.data.readers import PREPARED_DOCS, ReadStats, expand_paths, read_file
from levante.errors import LevanteError
from levante.util import atomic_write_text, staged_dir

SIDECAR_SUFFIX = ".license.json"  # <input file>.license.json, or license.json in a folder above it
DIR_SIDECAR = "license.json"
FORMAT, VERSION = "levante-prepared", 1
REJECT_TEXT_CHARS = 20_000  # a reject keeps this much of its text: enough to audit, not a 10 MB copy


@dataclass
class PrepareConfig:
    text_field: str = "text"
    license: str = ""  # licence declared for inputs without a sidecar ("" = undeclared)
    shard_docs: int = 10_000  # kept documents per output shard
    keep_reject_text: bool = True  # rejects carry the text (for audit); False keeps only the reason
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    filters: filters.FilterConfig = field(default_factory=filters.FilterConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    @classmethod
    def load(cls, path: str | Path | None) -> PrepareConfig:
        cfg = cls() if path is None else from_dict(cls, read_toml(path))
        return cfg.validate()

    def validate(self) -> PrepareConfig:
        if self.shard_docs < 1:
            raise ConfigError("shard_docs must be >= 1")
        self.filters.validate()
        self.dedup.validate()
        return self


@dataclass(frozen=True)
class Task:
    index: int
    path: str
    source: str  # the path as recorded in provenance (relative to its input argument where possible)
    license: str


# ------------------------------------------------------------------------------------------ inputs


def _sidecar(path: Path, root: Path) -> dict:
    """The licence sidecar that applies to `path`: its own, else the nearest folder's up to `root`."""
    candidates = [path.with_name(path.name + SIDECAR_SUFFIX)]
    folder = path.parent
    while True:
        candidates.append(folder / DIR_SIDECAR)
        if folder == root or folder == folder.parent or root not in folder.parents:
            break
        folder = folder.parent
    for c in candidates:
        if c.is_file():
            try:
                meta = json.loads(c.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LevanteError(f"{c}: not a valid licence sidecar ({e})") from None
            if not isinstance(meta, dict) or not set(meta) <= {"license", "tdm_opt_out", "source"}:
                raise LevanteError(f"{c}: a licence sidecar is a JSON object with keys license, tdm_opt_out, source")
            return meta
    return {}


def plan_tasks(inputs: list[str | Path], default_license: str) -> tuple[list[Task], list[dict]]:
    """(tasks, excluded): one task per input file in sorted order; TDM opt-out files are excluded."""
    tasks, excluded = [], []
    for arg in map(Path, inputs):
        root = arg if arg.is_dir() else arg.parent
        for path in expand_paths([arg]):
            if path.name.endswith(SIDECAR_SUFFIX) or path.name == DIR_SIDECAR:
                continue
            meta = _sidecar(path, root)
            source = str(path.relative_to(root.parent)) if root.parent in path.parents else str(path)
            source = meta.get("source", source) if isinstance(meta.get("source"), str) else source
            if meta.get("tdm_opt_out") is True:
                excluded.append({"source": source, "reason": "tdm opt-out", "bytes": path.stat().st_size})
                continue
            lic = meta.get("license", default_license)
            tasks.append(Task(len(tasks), str(path), source, lic if isinstance(lic, str) and lic else "undeclared"))
    return tasks, excluded


# ----------------------------------------------------------------------------------------- workers

_ident: LanguageIdentifier | None = None
_hasher: MinHasher | None = None


def _process(args: tuple[Task, PrepareConfig, str]) -> dict:
    """One input file: read, identify, filter, scrub, hash. Writes its candidates and rejects to
    scratch files and returns counts plus the dedup keys and signatures."""
    global _ident, _hasher
    task, cfg, scratch = args
    if _ident is None:
        _ident, _hasher = LanguageIdentifier(cfg.langid), MinHasher(cfg.dedup)
    rejected, pii, lang_rejects = Counter(), Counter(), defaultdict(Counter)
    keys, sigs = [], []
    n_in = n_cand = 0
    with open(Path(scratch) / f"{task.index:06d}.docs.jsonl", "w", encoding="utf-8") as docs_f, \
            open(Path(scratch) / f"{task.index:06d}.rejects.jsonl", "w", encoding="utf-8") as rej_f:

        def reject(reason: str, where: str, **extra) -> None:
            nonlocal n_in
            n_in += 1
            rejected[reason] += 1
            rej_f.write(json.dumps({"source": task.source, "record": where, "reason": reason, **extra},
                                   ensure_ascii=False) + "\n")

        def reader_reject(reason: str, where: str) -> None:  # where = "<path>:<line>" or "<path> row <n>"
            record = where[len(task.path):].lstrip(": ").removeprefix("row ")
            reject(reason, int(record) if record.isdigit() else record)

        stats = ReadStats(text_field=cfg.text_field, on_reject=reader_reject)
        docs = read_file(Path(task.path), stats)
        while True:
            try:
                doc = next(docs)
            except StopIteration:
                break
            except LevanteError as e:  # truncated archive, unreadable parquet: the rest of the file is lost
                reject("truncated or unreadable file", "end", detail=str(e))
                break
            except OSError as e:
                reject("truncated or unreadable file", "end", detail=f"{type(e).__name__}: {e}")
                break
            text_extra = {"text": doc.text[:REJECT_TEXT_CHARS]} if cfg.keep_reject_text else {}
            reason = filters.check_length(doc.text, cfg.filters)  # before language ID: a 10 MB line is cheap
            if reason is not None:
                lang_rejects["und"][reason] += 1
                reject(reason, doc.record, lang="und", **text_extra)
                continue
            result = _ident.identify(doc.text)
            reason = _ident.reject_reason(result) or filters.check(doc.text, result.lang, cfg.filters)
            if reason is not None:
                lang_rejects[result.lang][reason] += 1
                reject(reason, doc.record, lang=result.lang, lang_score=round(result.score, 4), **text_extra)
                continue
            text, _ = scrub(doc.text, cfg.pii, pii)
            n_in += 1
            n_cand += 1
            keys.append(exact_key(text))
            if cfg.dedup.near:
                sigs.append(_hasher.signature(text))
            docs_f.write(json.dumps({"text": text, "lang": result.lang, "lang_score": round(result.score, 4),
                                     "source": task.source, "record": doc.record, "license": task.license},
                                    ensure_ascii=False) + "\n")
    return {"index": task.index, "documents_in": n_in, "candidates": n_cand, "rejected": rejected, "pii": pii,
            "lang_rejects": {k: dict(v) for k, v in lang_rejects.items()},
            "keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16),
            "sigs": np.stack(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), dtype=np.uint32)}


# ------------------------------------------------------------------------------------------ output


class _ShardWriter:
    """Numbered jsonl.zst shards of at most `per_shard` lines; zstd level fixed, single-threaded, so
    the same lines give the same bytes."""

    def __init__(self, folder: Path, prefix: str, per_shard: int):
        import zstandard

        self.folder, self.prefix, self.per_shard = folder, prefix, per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cctx = zstandard.ZstdCompressor(level=10)
        self._f = self._z = None
        self.count = self.shards = 0

    def write(self, line: str) -> None:
        if self._z is None or self.count % self.per_shard == 0:
            self.close()
            self._f = open(self.folder / f"{self.prefix}-{self.shards:05d}.jsonl.zst", "wb")
            self._z = self._cctx.stream_writer(self._f, closefd=False)
            self.shards += 1
        self._z.write(line.encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        if self._z is not None:
            self._z.close()
            self._f.flush()
            self._f.close()
            self._z = self._f = None


def process_task(task: Task, cfg: PrepareConfig, scratch: str | Path) -> None:
    """Run one task and leave its results in `scratch` (the .json written last marks it complete)."""
    res = _process((task, cfg, str(scratch)))
    stem = Path(scratch) / f"{task.index:06d}"
    np.savez(f"{stem}.npz", keys=res.pop("keys"), sigs=res.pop("sigs"))
    atomic_write_text(f"{stem}.json", json.dumps(res))


def _load_result(scratch: Path, index: int) -> dict:
    stem = scratch / f"{index:06d}"
    try:
        res = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LevanteError(f"task {index} left no result in {scratch}: did a worker fail?") from None
    with np.load(f"{stem}.npz") as z:
        res["keys"], res["sigs"] = z["keys"], z["sigs"]
    return res


def finalize(stage: Path, scratch: Path, tasks: list[Task], excluded: list[dict], cfg: PrepareConfig,
             started: float) -> dict:
    """The global step: dedup over every task's results in input order, then shards, report, card."""
    from levante.data.datacard import write_datacard, write_html

    results = [_load_result(scratch, t.index) for t in tasks]
    keys = [bytes(k) for r in results for k in r["keys"]]
    sigs = np.concatenate([r["sigs"] for r in results]) if cfg.dedup.near and keys else None
    survivor, dup_reason, cluster = deduplicate(keys, sigs, cfg.dedup)
    report = _write_outputs(stage, scratch, tasks, results, survivor, dup_reason, cluster, cfg)
    report.update({"format": FORMAT, "version": VERSION, "excluded_inputs": excluded,
                   "inputs": [{"source": t.source, "license": t.license} for t in tasks],
                   "config": dataclasses.asdict(cfg)})
    atomic_write_text(stage / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    write_html(stage / "report.html", report)
    write_datacard(stage / "DATACARD.md", report, created=created)
    report.update({"seconds": round(time.time() - started, 2), "created": created})  # not in report.json:
    return report  # the data files stay byte-stable from run to run


def _run_task(args) -> None:
    process_task(*args)


def prepare(inputs: list[str | Path], out_dir: str | Path, config: PrepareConfig | None = None, *,
            workers: int = 1, license: str | None = None, overwrite: bool = False,
            engine: str = "local") -> dict:
    """Run the pipeline; returns the report (also written to DIR/report.json).

    engine "local": a process pool; "datatrove": the same tasks under datatrove's
    LocalPipelineExecutor (see levante.data.engine for its Slurm form)."""
    cfg = dataclasses.replace(config or PrepareConfig())
    if license is not None:
        cfg.license = license
    cfg.validate()
    if workers < 1:
        raise LevanteError("--workers must be >= 1")
    if engine not in ("local", "datatrove"):
        raise LevanteError(f"unknown engine {engine!r}: choose local or datatrove")
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir, overwrite)
    tasks, excluded = plan_tasks(inputs, cfg.license)
    started = time.time()
    with staged_dir(out_dir) as stage:
        scratch = stage / ".scratch"
        scratch.mkdir()
        if engine == "datatrove":
            from levante.data.engine import run_datatrove_local

            run_datatrove_local(tasks, cfg, scratch, workers)
        elif workers == 1 or len(tasks) <= 1:
            for t in tasks:
                process_task(t, cfg, scratch)
        else:
            with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                for _ in pool.imap_unordered(_run_task, [(t, cfg, scratch) for t in tasks]):
                    pass  # results are on disk; finalize reads them in input order
        report = finalize(stage, scratch, tasks, excluded, cfg, started)
        shutil.rmtree(scratch)
    return report


def _write_outputs(stage, scratch, tasks, results, survivor, dup_reason, cluster, cfg) -> dict:
    docs_w = _ShardWriter(stage / PREPARED_DOCS, "docs", cfg.shard_docs)
    rej_w = _ShardWriter(stage / "rejects", "rejects", cfg.shard_docs)
    per_lang = defaultdict(lambda: {"kept": 0, "bytes": 0, "rejected": 0, "duplicates": 0})
    per_license = defaultdict(lambda: {"kept": 0, "bytes": 0})
    rejected, pii, dups = Counter(), Counter(), Counter()
    where: list[tuple[str, int]] = []  # global index -> (source, record), for "duplicate_of"
    g = 0
    try:
        for task, res in zip(tasks, results, strict=True):
            rejected.update(res["rejected"])
            pii.update(res["pii"])
            for lang, reasons in res["lang_rejects"].items():
                per_lang[lang]["rejected"] += sum(reasons.values())
            with open(scratch / f"{task.index:06d}.rejects.jsonl", encoding="utf-8") as f:
                for line in f:
                    rej_w.write(line)
            with open(scratch / f"{task.index:06d}.docs.jsonl", encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    where.append((rec["source"], rec["record"]))
                    if dup_reason[g] is not None:
                        dups[dup_reason[g]] += 1
                        per_lang[rec["lang"]]["duplicates"] += 1
                        src, recno = where[survivor[g]]
                        rej_w.write(json.dumps({"source": rec["source"], "record": rec["record"],
                                                "reason": dup_reason[g], "lang": rec["lang"],
                                                "duplicate_of": {"source": src, "record": recno}},
                                               ensure_ascii=False) + "\n")
                    else:
                        rec["dup_cluster"] = int(cluster[g])
                        n_bytes = len(rec["text"].encode("utf-8"))
                        per_lang[rec["lang"]]["kept"] += 1
                        per_lang[rec["lang"]]["bytes"] += n_bytes
                        per_license[rec["license"]]["kept"] += 1
                        per_license[rec["license"]]["bytes"] += n_bytes
                        docs_w.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    g += 1
    finally:
        docs_w.close()
        rej_w.close()
    documents_in = sum(r["documents_in"] for r in results)
    report = {"documents_in": documents_in, "kept": docs_w.count, "rejected": dict(sorted(rejected.items())),
              "duplicates": sum(dups.values()), "duplicates_by_kind": dict(sorted(dups.items())),
              "pii": dict(sorted(pii.items())), "languages": dict(sorted(per_lang.items())),
              "licenses": dict(sorted(per_license.items())), "shards": docs_w.shards,
              "bytes_kept": sum(v["bytes"] for v in per_lang.values())}
    if documents_in != report["kept"] + sum(rejected.values()) + report["duplicates"]:  # a bug, not user input
        raise AssertionError(f"accounting mismatch: {report}")
    return report


def read_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LevanteError(f"{out_dir} is not a `levante data prepare` output (no report.json)") from None
