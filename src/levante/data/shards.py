"""Token shards: the whole tokenized corpus as one memory-mapped token file plus a small index.

Layout of a shard directory:
  tokens.bin   every document as `<|bos|> text <|eos|>` (the convention of levante.tokenizer.tokenizer),
               concatenated (uint16 if vocab <= 65536
               else uint32, native little-endian)
  docs.npy     int64 [num_documents, 4]: offset, length (tokens incl. bos and eos), lang code
               (index into index.json "langs"), n_bytes (UTF-8 bytes of the text); plain .npy,
               no pickle, memory-mapped on open
  index.json   format version, tokenizer sha256 (the identity that refuses foreign shards),
               vocab size, dtype, bos and eos ids, totals, per-language totals, the reader's rejected counts

The directory is built under a temporary name next to `out_dir` and renamed into place at the end,
so an interrupted run never leaves a half-written shard set that looks complete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from array import array
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from levante.data.readers import UNKNOWN_LANG, ReadStats, read_documents
from levante.errors import LevanteError
from levante.tokenizer.tokenizer import LevanteTokenizer
from levante.util import staged_dir, write_durable

log = logging.getLogger(__name__)

FORMAT = "levante-shards"
VERSION = 2  # 2: documents start with bos
TOKENS_FILE, DOCS_FILE, INDEX_FILE = "tokens.bin", "docs.npy", "index.json"
OFFSET, LENGTH, LANG, NBYTES = range(4)  # columns of docs.npy


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------- tokenizing (workers)

_worker_tok = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    # One process per worker already: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = LevanteTokenizer(tokenizer_path)


def _ordered_results(chunks, tokenizer, workers: int) -> Iterator[tuple]:
    """Encoded chunks in input order. With workers > 1 at most 2 * workers chunks are in flight,
    so memory stays bounded (Pool.imap would read the whole corpus into its queue)."""
    if workers == 1:  # in-process: the tokenizer may use its own threads
        yield from (_encode_with(tokenizer, chunk) for chunk in chunks)
        return
    # spawn, not fork: the caller may hold torch / tokenizer threads that fork would break.
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer.path),))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _encode_with(_worker_tok, texts)


def _encode_with(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (tokens of all docs as `bos text eos`, uint32), per-doc lengths, per-doc UTF-8 bytes."""
    ids = tok.encode_documents(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.uint32, count=int(lengths.sum()))
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lengths, nbytes


def _chunks(docs, size: int, langs_out: list[str]) -> Iterator[list[str]]:
    """Ordered chunks of texts; the languages stay in the parent (workers only need the text)."""
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc.text)
        langs_out.append(doc.lang or UNKNOWN_LANG)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class ShardIndex:
    path: Path
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    bos_id: int
    eos_id: int
    num_tokens: int
    num_documents: int
    langs: list[str]
    per_lang: dict[str, dict[str, int]]  # lang -> {"docs", "tokens", "bytes"}
    rejected: dict[str, int]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "tokenizer_sha256": self.tokenizer_sha256,
                "vocab_size": self.vocab_size, "dtype": self.dtype, "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "num_tokens": self.num_tokens, "num_documents": self.num_documents, "langs": self.langs,
                "per_lang": self.per_lang, "rejected": self.rejected,
                "files": {"tokens": TOKENS_FILE, "docs": DOCS_FILE},
                "docs_columns": ["offset", "length_incl_bos_eos", "lang", "n_bytes"]}


def tokenize_corpus(paths, tokenizer_path, out_dir, workers: int = 1, chunk_docs: int = 256,
                    overwrite: bool = False) -> ShardIndex:
    """Tokenize every document under `paths` into a shard directory `out_dir`.

    Chunks are collected from the worker pool in submission order, so the output is byte-identical
    for any number of workers. Workers are spawned (safe when the caller holds threads), so a script
    calling this with workers > 1 needs the usual `if __name__ == "__main__":` guard.
    """
    if workers < 1 or chunk_docs < 1:
        raise LevanteError(f"workers and chunk_docs must be >= 1, got {workers} and {chunk_docs}")
    tok = LevanteTokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LevanteError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LevanteError(f"output directory {out_dir} is not empty (pass overwrite to replace it)")
    dtype = token_dtype(tok.vocab_size)
    stats = ReadStats()
    docs = read_documents(paths, stats)  # fails here, before any work, on a missing input

    with staged_dir(out_dir) as tmp:
        langs: list[str] = []
        lengths, nbytes = array("q"), array("q")
        with open(tmp / TOKENS_FILE, "wb") as f:
            # closing(): stop the worker pool at once if anything below fails
            with closing(_ordered_results(_chunks(docs, chunk_docs, langs), tok, workers)) as results:
                for flat, lens, nb in results:
                    f.write(flat.astype(dtype).tobytes())
                    lengths.extend(lens.tolist())
                    nbytes.extend(nb.tolist())
            f.flush()
            os.fsync(f.fileno())
        if not lengths:
            raise LevanteError(f"empty corpus: no documents to tokenize "
                               f"({stats.num_rejected} rejected: {dict(stats.rejected)})")
        index = _write_index(tmp, tok, dtype, langs, lengths, nbytes, stats)
        if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:  # appeared while we worked
            raise LevanteError(f"output directory {out_dir} is not empty (pass overwrite to replace it)")
    index.path = out_dir
    log.info("tokenized %d documents into %d tokens in %s", index.num_documents, index.num_tokens, out_dir)
    return index


def _write_index(tmp: Path, tok, dtype, langs, lengths, nbytes, stats: ReadStats) -> ShardIndex:
    codes = sorted(set(langs))
    code_of = {lang: i for i, lang in enumerate(codes)}
    table = np.zeros((len(lengths), 4), dtype=np.int64)
    table[:, LENGTH] = np.frombuffer(lengths, dtype=np.int64)
    table[:, OFFSET] = np.cumsum(table[:, LENGTH]) - table[:, LENGTH]
    table[:, LANG] = np.fromiter((code_of[x] for x in langs), dtype=np.int64, count=len(langs))
    table[:, NBYTES] = np.frombuffer(nbytes, dtype=np.int64)
    with open(tmp / DOCS_FILE, "wb") as f:
        np.save(f, table, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    per_lang = {}
    for i, lang in enumerate(codes):
        rows = table[table[:, LANG] == i]
        per_lang[lang] = {"docs": int(len(rows)), "tokens": int(rows[:, LENGTH].sum()),
                          "bytes": int(rows[:, NBYTES].sum())}
    index = ShardIndex(tmp, tok.sha256, tok.vocab_size, dtype.name, tok.bos_id, tok.eos_id,
                       int(table[:, LENGTH].sum()), len(table), codes, per_lang,
                       dict(sorted(stats.rejected.items())))
    write_durable(tmp / INDEX_FILE, (json.dumps(index.to_json(), indent=2) + "\n").encode())
    return index


# ------------------------------------------------------------------------------------------ reading


class Shards:
    """An opened shard directory: memory-mapped tokens and document table plus the index metadata."""

    def __init__(self, path: Path, meta: dict, tokens: np.ndarray, docs: np.ndarray):
        self.path, self.meta, self.tokens, self.docs = path, meta, tokens, docs
        self.langs: list[str] = list(meta["langs"])

    tokenizer_sha256 = property(lambda self: self.meta["tokenizer_sha256"])
    vocab_size = property(lambda self: int(self.meta["vocab_size"]))
    bos_id = property(lambda self: int(self.meta["bos_id"]))
    eos_id = property(lambda self: int(self.meta["eos_id"]))
    num_tokens = property(lambda self: int(self.meta["num_tokens"]))
    num_documents = property(lambda self: int(self.meta["num_documents"]))
    per_lang = property(lambda self: self.meta["per_lang"])

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i: bos, text, eos."""
        off, n = int(self.docs[i, OFFSET]), int(self.docs[i, LENGTH])
        return self.tokens[off:off + n]

    def lang(self, i: int) -> str:
        return self.langs[int(self.docs[i, LANG])]


def open_shards(path, expected_tokenizer_sha256: str | None = None) -> Shards:
    path = Path(path)
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise LevanteError(f"no shard index in {path} (run levante tokenize first)")
    try:
        meta = json.loads(index_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError("not a levante shard index")
        if meta.get("version") != VERSION:
            raise ValueError(f"format version {meta.get('version')}, this levante reads {VERSION}; "
                             "re-run levante tokenize")
        dtype = np.dtype(meta["dtype"])
        num_tokens, num_docs = int(meta["num_tokens"]), int(meta["num_documents"])
        meta["tokenizer_sha256"], meta["langs"], meta["bos_id"], meta["eos_id"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError) as e:
        raise LevanteError(f"corrupt shard index {index_path}: {e}") from None
    have = meta["tokenizer_sha256"]
    if expected_tokenizer_sha256 is not None and have != expected_tokenizer_sha256:
        raise LevanteError(f"shards in {path} were made with tokenizer {have[:12]}, not "
                           f"{expected_tokenizer_sha256[:12]}; re-run levante tokenize")
    tokens_path = path / TOKENS_FILE
    if not tokens_path.is_file() or tokens_path.stat().st_size != num_tokens * dtype.itemsize:
        raise LevanteError(f"corrupt shards in {path}: {TOKENS_FILE} is missing or not "
                           f"{num_tokens} {dtype.name} tokens")
    try:
        docs = np.load(path / DOCS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LevanteError(f"corrupt shards in {path}: cannot read {DOCS_FILE} ({e})") from None
    if docs.shape != (num_docs, 4) or (num_docs and int(docs[-1, OFFSET] + docs[-1, LENGTH]) != num_tokens):
        raise LevanteError(f"corrupt shards in {path}: {DOCS_FILE} does not match the index")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
    return Shards(path, meta, tokens, docs)
