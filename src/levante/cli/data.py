"""Data verbs: `levante tokenizer train`, `levante tokenize`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from levante.cli.common import console

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[Path] = typer.Argument(None, help="Corpus files or directories (jsonl, jsonl.gz, parquet, txt). "
                                      "Default: the bundled sample corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (or path ending in .json)."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size including special tokens."),
    alpha: float = typer.Option(0.3, help="Language balancing: 1 keeps natural shares, 0 samples uniformly."),
    seed: int = typer.Option(0),
    eval_data: list[Path] = typer.Option(None, "--eval", help="Held-out files for the fertility report."),
    overwrite: bool = typer.Option(False, help="Replace an existing tokenizer at --out."),
):
    """Train a language-balanced byte-level BPE tokenizer and report per-language fertility."""
    from levante.data.readers import bundled_corpus
    from levante.tokenizer import train_tokenizer

    paths = data or bundled_corpus("train")
    report = train_tokenizer(paths, out, vocab_size, alpha=alpha, seed=seed,
                             eval_paths=eval_data or (None if data else bundled_corpus("valid")),
                             overwrite=overwrite)
    table = Table(title=f"tokenizer {report.path} ({report.vocab_size} tokens, sha256 {report.sha256[:12]})")
    for col in ("lang", "docs", "bytes", "natural share", "sampled share", "tokens/byte", "parity vs en"):
        table.add_column(col, justify="right")
    fert = report.fertility or {}
    for lang, s in report.languages.items():
        f = fert.get(lang)
        table.add_row(lang, str(s.docs_seen), f"{s.bytes_seen:,}", f"{s.share_seen:.1%}", f"{s.share_sampled:.1%}",
                      f"{f.tokens_per_byte:.3f}" if f else "-",
                      f"{f.parity:.2f}" if f and f.parity is not None else "-")
    console.print(table)


def tokenize(
    data: list[Path] = typer.Argument(..., help="Corpus files or directories."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json"),
    out: Path = typer.Option(..., "--out", "-o", help="Output shard directory."),
    workers: int = typer.Option(1, help="Tokenizer processes."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Tokenize a corpus into memmap token shards with a per-document index."""
    from levante.data.shards import tokenize_corpus

    index = tokenize_corpus(data, tokenizer, out, workers=workers, overwrite=overwrite)
    table = Table(title=f"{out}: {index.num_tokens:,} tokens from {index.num_documents:,} documents")
    for col in ("lang", "docs", "tokens", "bytes", "tokens/byte"):
        table.add_column(col, justify="right")
    for lang, n in sorted(index.per_lang.items()):
        ratio = n["tokens"] / max(n["bytes"], 1)
        table.add_row(lang, f"{n['docs']:,}", f"{n['tokens']:,}", f"{n['bytes']:,}", f"{ratio:.3f}")
    console.print(table)
    if index.rejected:
        console.print(f"rejected records (counted, not tokenized): {index.rejected}")


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")
    app.command()(tokenize)
