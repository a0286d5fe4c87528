"""`levante` command line: a thin Typer layer over the library.

User mistakes surface as `LevanteError`; `main()` prints them on one line and exits with code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from levante.errors import LevanteError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Levante: train, evaluate, sample and export DeepSeek-V3-class MoE language models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
import_app = typer.Typer(no_args_is_help=True, help="Import checkpoints from other formats.")
export_app = typer.Typer(no_args_is_help=True, help="Export checkpoints to other formats.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[Path] = typer.Argument(None, help="Corpus files or directories (jsonl, jsonl.gz, parquet, txt). "
                                      "Default: the bundled sample corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (or path ending in .json)."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size including special tokens."),
    alpha: float = typer.Option(0.3, help="Language balancing: 1 keeps natural shares, 0 samples uniformly."),
    seed: int = typer.Option(0),
    eval_data: list[Path] = typer.Option(None, "--eval", help="Held-out files for the fertility report."),
):
    """Train a language-balanced byte-level BPE tokenizer and report per-language fertility."""
    from levante.data.readers import bundled_corpus
    from levante.tokenizer import train_tokenizer

    paths = data or bundled_corpus("train")
    report = train_tokenizer(paths, out, vocab_size, alpha=alpha, seed=seed,
                             eval_paths=eval_data or (None if data else bundled_corpus("valid")))
    table = Table(title=f"tokenizer {report.path} ({report.vocab_size} tokens, sha256 {report.sha256[:12]})")
    for col in ("lang", "docs", "bytes", "natural share", "sampled share", "tokens/byte", "parity vs en"):
        table.add_column(col, justify="right")
    fert = getattr(report, "fertility", None) or {}
    for lang, s in report.languages.items():
        f = fert.get(lang)
        table.add_row(lang, str(s.docs_seen), f"{s.bytes_seen:,}", f"{s.share_seen:.1%}", f"{s.share_sampled:.1%}",
                      f"{f.tokens_per_byte:.3f}" if f else "-",
                      f"{f.parity:.2f}" if f and f.parity is not None else "-")
    console.print(table)


@app.command()
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


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training config (TOML): [model] [data] [optim] [schedule] [run]."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, config."),
    resume: bool = typer.Option(False, help="Continue from the newest valid checkpoint in --out."),
):
    """Train a model; checkpoints are resumable bit for bit."""
    from levante.config import TrainConfig
    from levante.progress import train_with_progress

    cfg = TrainConfig.load(config)
    result = train_with_progress(cfg, out, resume=resume, console=console)
    console.print(f"done: {result.steps} steps, {result.tokens:,} tokens, checkpoint {result.checkpoint}")


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory, run directory or HF DeepseekV3 dir."),
    data: list[Path] = typer.Option(..., "--data", help="Shard directory or raw corpus files."),
    seq_len: int = typer.Option(256, help="Evaluation window length."),
    batch_size: int = typer.Option(8),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Held-out loss and bits-per-byte per language."""
    from levante.pipeline import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, seq_len=seq_len, batch_size=batch_size)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{checkpoint}: held-out loss per language")
    for col in ("lang", "tokens", "bytes", "loss (nats/token)", "bits/byte"):
        table.add_column(col, justify="right")
    for lang, r in result["per_language"].items():
        table.add_row(lang, f"{r['tokens']:,}", f"{r['bytes']:,}", f"{r['loss']:.3f}", f"{r['bpb']:.3f}")
    table.add_row("all", "", "", f"{result['loss']:.3f}", f"{result['bpb']:.3f}", style="bold")
    console.print(table)


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory, run directory or HF DeepseekV3 dir."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, help="0 for greedy decoding."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1: off)."),
    seed: int = typer.Option(None, help="Seed for reproducible sampling."),
):
    """Continue a prompt with the latent KV cache, streaming text to stdout."""
    from levante.infer.engine import SamplingParams, generate_text
    from levante.pipeline import load_for_inference

    model, tokenizer, _ = load_for_inference(checkpoint)
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    sys.stdout.write(prompt)
    generate_text(model, tokenizer, prompt, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")


@app.command()
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", "-o", help="Output directory."),
    minutes: float = typer.Option(4.0, help="Training time budget in minutes (the whole job adds ~1 min)."),
    steps: int = typer.Option(0, help="Exact number of training steps (overrides --minutes)."),
):
    """The whole flow on the bundled corpus: tokenizer, shards, train `tiny`, eval, samples, report."""
    from levante.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, steps=steps or None, console=console)


@import_app.command("hf")
def import_hf_command(src: Path = typer.Argument(..., help="DeepseekV3 HF directory."),
                      dst: Path = typer.Argument(..., help="Levante checkpoint directory to write."),
                      overwrite: bool = typer.Option(False, help="Replace a non-empty DST.")):
    """Import a DeepseekV3 checkpoint (config.json + safetensors) as a Levante checkpoint."""
    from levante.interop.hf import import_hf

    import_hf(src, dst, overwrite=overwrite)
    console.print(f"imported {src} -> {dst}")


@export_app.command("hf")
def export_hf_command(
    src: Path = typer.Argument(..., help="Levante checkpoint or run directory."),
    dst: Path = typer.Argument(..., help="Output directory for transformers / vLLM."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Drop the multi-token-prediction modules."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty DST."),
):
    """Export to safetensors + config.json loadable as DeepseekV3ForCausalLM."""
    from levante.interop.hf import export_hf

    export_hf(src, dst, dtype=dtype, include_mtp=not no_mtp, overwrite=overwrite)
    console.print(f"exported {src} -> {dst}")


def _register_plan():
    from levante.cli_plan import plan_command

    app.command("plan", help="Parameters, FLOPs, memory and GPU-hours for a preset or config.")(plan_command)


_register_plan()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()  # click handles usage errors itself (message + exit 2); ours arrive here
    except LevanteError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        err_console.print(f"[red]error:[/red] {escape(str(e.strerror or e))}: {escape(str(e.filename))}",
                          soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
