"""Read raw documents from jsonl / jsonl.gz / jsonl.zst / parquet / txt files and directories.

Every reader yields `Document(text, lang)`. Bad records (malformed JSON, no string `text`, empty
text, invalid UTF-8) are counted per reason in a `ReadStats` and logged, never raised: one broken line
must not kill a multi-hour tokenization run. User mistakes (missing path, unsupported file, a parquet
file without a `text` column, a truncated archive) raise `LevanteError` with a one-line message.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from levante.errors import LevanteError

log = logging.getLogger(__name__)

UNKNOWN_LANG = "und"  # ISO 639-2 "undetermined": the bucket for documents without a language
SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")
SPLITS = ("train", "valid")
PREPARED_MARK, PREPARED_DOCS = "report.json", "docs"  # the layout `levante data prepare` writes

# A language code is 2-3 lowercase letters; these common file/dir names look like codes but are not.
_LANG_RE = re.compile(r"^[a-z]{2,3}$")
_NOT_LANGS = frozenset({"all", "dev", "val", "raw", "tmp", "out", "new", "old", "doc", "txt", "src",
                        "tgt", "dir", "img", "log", "bin", "lib", "etc", "var", "usr", "ok"})
_MAX_LOGGED = 5  # per reason and file: enough to find the bad lines without flooding the log


@dataclass(frozen=True)
class Document:
    text: str
    lang: str | None
    record: int = field(default=0, compare=False)  # jsonl line / parquet row / txt first line


@dataclass
class ReadStats:
    """What a read saw: accepted documents and bytes, and rejected records per reason."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    rejected: Counter = field(default_factory=Counter)
    text_field: str = "text"  # the record field (jsonl key, parquet column) that holds the text
    on_reject: Callable[[str, str], None] | None = None  # (reason, where) for every rejected record

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, where: str) -> None:
        self.rejected[reason] += 1
        if self.on_reject is not None:
            self.on_reject(reason, where)
        if self.rejected[reason] <= _MAX_LOGGED:
            log.warning("rejected record (%s) at %s", reason, where)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "bytes": self.bytes,
                "rejected": dict(sorted(self.rejected.items()))}


def lang_from_path(path: Path) -> str | None:
    """`en.txt`, `en.train.jsonl` or `.../en/anything` -> "en"; the file name wins over the dir."""
    stem = path.name.split(".", 1)[0]
    for candidate in (stem, path.parent.name):
        if _LANG_RE.match(candidate) and candidate not in _NOT_LANGS:
            return candidate
    return None


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_paths(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files named directly (any supported kind) plus, for directories, every supported file below,
    in sorted order so every run sees the documents in the same order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and (p / PREPARED_MARK).is_file() and (p / PREPARED_DOCS).is_dir():
            p = p / PREPARED_DOCS  # a `levante data prepare` output: its kept documents, not its rejects
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise LevanteError(f"no {'/'.join(SUFFIXES)} files under {p}")
            files.extend(found)
        elif p.is_file():
            if not _suffix(p):
                raise LevanteError(f"unsupported file type: {p} (expected one of {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise LevanteError(f"input not found: {p}")
    if not files:
        raise LevanteError("no input files given")
    return files


def _zst_lines(path: Path) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file, streamed. zstandard's stream_reader returns nothing, without
    an error, for a truncated frame: decompress frame by frame and insist the last one is complete."""
    try:
        import zstandard
    except ImportError:
        raise LevanteError(f"reading {path} needs the zstandard package: pip install zstandard") from None
    dctx = zstandard.ZstdDecompressor()
    dobj, pending, fed = dctx.decompressobj(), b"", False
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            while chunk:
                fed = True
                try:
                    out = dobj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise LevanteError(f"{path}: truncated or corrupt archive ({e})") from None
                chunk = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, fed = dctx.decompressobj(), False
                lines = (pending + out).split(b"\n")
                pending = lines.pop()
                yield from (line + b"\n" for line in lines)
    if fed:  # bytes went into a frame that never ended
        if pending:
            yield pending  # the readable part of a cut line: it will be counted as malformed
        raise LevanteError(f"{path}: truncated or corrupt archive (zstd frame incomplete)")
    if pending:
        yield pending


def _valid_text(text, stats: ReadStats, where: str) -> str | None:
    if not isinstance(text, str):
        stats.reject("text missing or not a string", where)
        return None
    if not text.strip():
        stats.reject("empty text", where)
        return None
    try:
        stats.bytes += len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style JSON escapes
        stats.reject("invalid unicode", where)
        return None
    stats.documents += 1
    return text


def _read_jsonl(path: Path, raw, stats: ReadStats) -> Iterator[Document]:
    default_lang = lang_from_path(path)
    for lineno, line in enumerate(raw, 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue  # blank lines are layout, not records
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark is an editor's artefact, not part of the record
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            stats.reject("invalid utf-8", where)
            continue
        except json.JSONDecodeError:
            stats.reject("malformed json", where)
            continue
        if not isinstance(record, dict):
            stats.reject("record is not an object", where)
            continue
        text = _valid_text(record.get(stats.text_field), stats, where)
        if text is None:
            continue
        lang = record.get("lang")
        yield Document(text, lang if isinstance(lang, str) and lang else default_lang, lineno)


def _read_parquet(path: Path, stats: ReadStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LevanteError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    field_name = stats.text_field
    if field_name not in names:
        raise LevanteError(f"{path}: parquet file has no '{field_name}' column (columns: {', '.join(names)})")
    columns = [field_name] + (["lang"] if "lang" in names and field_name != "lang" else [])
    default_lang = lang_from_path(path)
    row = 0
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            texts = batch.column(field_name).to_pylist()
            langs = batch.column("lang").to_pylist() if "lang" in columns else [None] * len(texts)
            for text, lang in zip(texts, langs, strict=True):
                row += 1
                text = _valid_text(text, stats, f"{path} row {row}")
                if text is not None:
                    yield Document(text, lang if isinstance(lang, str) and lang else default_lang, row)
    except pa.ArrowException as e:
        raise LevanteError(f"{path}: corrupt parquet data ({str(e).splitlines()[0]})") from None


def _read_txt(path: Path, stats: ReadStats) -> Iterator[Document]:
    """Paragraphs (separated by blank lines) are documents: streamed, so huge files stay cheap."""
    lang = lang_from_path(path)
    para: list[str] = []
    start = 1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.reject("invalid utf-8", f"{path}:{lineno}")
                continue
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                yield from _txt_doc(para, lang, stats, path, start)
                para = []
        if para:
            yield from _txt_doc(para, lang, stats, path, start)


def _txt_doc(lines: list[str], lang, stats, path, start: int) -> Iterator[Document]:
    text = _valid_text("".join(lines).rstrip("\r\n"), stats, f"{path}:{start}")
    if text is not None:
        yield Document(text, lang, start)


def read_file(path: Path, stats: ReadStats) -> Iterator[Document]:
    """The documents of one supported file (LevanteError on a truncated archive or unreadable parquet)."""
    return _read_file(path, stats)


def _read_file(path: Path, stats: ReadStats) -> Iterator[Document]:
    kind = _suffix(path)
    stats.files += 1
    if kind == ".parquet":
        yield from _read_parquet(path, stats)
    elif kind == ".txt":
        yield from _read_txt(path, stats)
    else:
        if kind == ".jsonl.zst":
            yield from _read_jsonl(path, _zst_lines(path), stats)
            return
        opener = {".jsonl": lambda p: open(p, "rb"), ".jsonl.gz": gzip.open}[kind]
        try:
            with opener(path) as raw:
                yield from _read_jsonl(path, raw, stats)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise LevanteError(f"{path}: truncated or corrupt archive ({e})") from None


def read_documents(paths, stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield every valid document under `paths` in a deterministic order; `stats` (if given) collects
    accepted and rejected counts. Missing inputs fail before the first document is yielded."""
    stats = ReadStats() if stats is None else stats
    files = expand_paths(paths)  # eager: a missing input fails at the call, before any work starts

    def documents() -> Iterator[Document]:
        for path in files:
            before = stats.num_rejected
            yield from _read_file(path, stats)
            if stats.num_rejected > before:
                log.warning("%s: %d records rejected", path, stats.num_rejected - before)

    return documents()


def bundled_corpus(split: str) -> list[Path]:
    """The package's sample corpus files (`<lang>.<split>.jsonl`) for split "train" or "valid"."""
    import levante

    if split not in SPLITS:
        raise LevanteError(f"unknown corpus split '{split}': choose 'train' or 'valid'")
    folder = Path(levante.__file__).parent / "sample_corpus"
    files = sorted(folder.glob(f"*.{split}.jsonl"))
    if not files:
        raise LevanteError(f"bundled sample corpus has no {split} files in {folder}; reinstall levante")
    return files
