"""Data verbs: `levante data prepare`, `levante tokenizer train`, `levante tokenize`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from levante.cli.common import console

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare raw text for training.")


@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Argument(..., help="Files or directories (jsonl, jsonl.gz, jsonl.zst, parquet, txt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (never overwritten without --overwrite)."),
    config: Path = typer.Option(None, "--config", "-c", help="data.toml: language ID, filters, PII, dedup."),
    workers: int = typer.Option(1, help="Worker processes (the output is identical for any number)."),
    license: str = typer.Option(None, "--license", help="Licence of inputs without a .license.json sidecar."),
    text_field: str = typer.Option(None, "--text-field", help="Record field holding the text (default: text)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    engine: str = typer.Option("local", help="local (process pool) or datatrove (its LocalPipelineExecutor)."),
):
    """Language ID, quality filters, PII scrubbing, exact + near dedup, provenance, report and data card."""
    from levante.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig.load(config)
    if text_field:
        cfg.text_field = text_field
    report = prepare(inputs, out, cfg, workers=workers, license=license, overwrite=overwrite,
                     engine=engine)
    table = Table(title=f"{out}: kept {report['kept']:,} of {report['documents_in']:,} documents "
                        f"({report['bytes_kept']:,} bytes) in {report['seconds']:.1f} s")
    for col in ("lang", "kept", "bytes", "rejected", "duplicates"):
        table.add_column(col, justify="right")
    for lang, v in report["languages"].items():
        table.add_row(lang, f"{v['kept']:,}", f"{v['bytes']:,}", f"{v['rejected']:,}", f"{v['duplicates']:,}")
    console.print(table)
    console.print(f"rejected: {report['rejected'] or 'none'}; duplicates: {report['duplicates_by_kind'] or 'none'}; "
                  f"PII replaced: {report['pii'] or 'none'}; excluded inputs: {len(report['excluded_inputs'])}")
    console.print(f"report: {out / 'report.html'}  data card: {out / 'DATACARD.md'}")


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[Path] = typer.Argument(None, help="Corpus files or directories (jsonl, jsonl.gz, parquet, txt). "
                                      "Default: the bundled sample corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (or path ending in .json)."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size including special tokens."),
    alpha: float = typer.Option(None, help="Language balancing: 1 keeps natural shares, 0 samples uniformly "
                                "(default: 0 in mode hybrid, 0.3 otherwise)."),
    seed: int = typer.Option(0),
    eval_data: list[Path] = typer.Option(None, "--eval", help="Held-out files for the fertility report."),
    overwrite: bool = typer.Option(False, help="Replace an existing tokenizer at --out."),
    mode: str = typer.Option("hybrid", help="hybrid: the corpus's most frequent merge unless the worst-"
                             "compressed language is more than --tolerance above the mean, then that "
                             "language's; parity: always the worst language's (arXiv 2508.04796); "
                             "frequency: plain BPE on the alpha-resampled corpus (HF trainer)."),
    tolerance: float = typer.Option(None, help="hybrid only; default 0.005 with held-out documents, 0.06 with "
                                    "--parity (chosen on FLORES dev)."),
    parity: Path = typer.Option(None, "--parity", help="Folder of line-aligned <lang>.txt files: measure "
                                "compression as true token premiums on them instead of tokens per "
                                "character on documents held out from the corpus."),
):
    """Train a language-balanced byte-level BPE tokenizer and report per-language fertility."""
    from levante.data.readers import bundled_corpus
    from levante.tokenizer import train_tokenizer

    paths = data or bundled_corpus("train")
    report = train_tokenizer(paths, out, vocab_size, alpha=alpha, seed=seed,
                             eval_paths=eval_data or (None if data else bundled_corpus("valid")),
                             overwrite=overwrite, parity_paths=[parity] if parity else None,
                             mode=mode, tolerance=tolerance)
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
    if report.merges_by:
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(report.merges_by.items(), key=lambda kv: -kv[1]))
        console.print(f"mode {report.mode} (tolerance {report.tolerance}): merges chosen by {chosen}")


@tokenizer_app.command("report")
def tokenizer_report(
    tokenizer: Path = typer.Argument(..., help="tokenizer.json (or its directory)."),
    parallel: Path = typer.Option(..., "--parallel", help="Folder of line-aligned <lang>.txt files (FLORES)."),
    reference: str = typer.Option("en", help="Language the premium is relative to."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    chart: Path = typer.Option(None, "--chart", help="Write a bar chart of the premium (PNG)."),
):
    """Per language tokens/word, bytes/token and the token premium over the reference (Petrov et al. 2023)."""
    import json

    from levante.errors import LevanteError
    from levante.tokenizer.parity import parallel_summary, parity_report, premium_chart

    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if not tokenizer.is_file():
        raise LevanteError(f"tokenizer not found: {tokenizer}")
    result = parity_report(tokenizer, [parallel], reference)
    if reference not in result:
        raise LevanteError(f"{parallel} holds no {reference} file: the premium needs the reference language")
    summary = parallel_summary(result, reference)
    if chart is not None:
        premium_chart(summary, chart)
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    table = Table(title=f"{tokenizer} on {parallel}: mean premium {summary['mean_premium']}, "
                        f"worst {summary['max_premium']}")
    for col in ("lang", "tokens", "tokens/word", "bytes/token", f"premium vs {reference}"):
        table.add_column(col, justify="right")
    for lang, r in summary["languages"].items():
        table.add_row(lang, f"{r['tokens']:,}", f"{r['tokens_per_word']:.3f}", f"{r['bytes_per_token']:.3f}",
                      f"{r['premium']:.3f}")
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
    app.add_typer(data_app, name="data")
    app.command()(tokenize)
