"""Model verbs: `levante eval`, `levante generate`, `levante import hf`, `levante export hf`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from levante.cli.common import console
from levante.errors import LevanteError

import_app = typer.Typer(no_args_is_help=True, help="Import checkpoints from other formats.")
export_app = typer.Typer(no_args_is_help=True, help="Export checkpoints to other formats.")

CHECKPOINT_HELP = "Checkpoint directory, run directory or HF DeepseekV3 dir."
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."


def eval_command(
    checkpoint: Path = typer.Argument(..., help=CHECKPOINT_HELP),
    data: list[Path] = typer.Option(None, "--data", help="Shard directory or raw corpus files."),
    tasks: str = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (example: levante_mc)."),
    limit: int = typer.Option(None, help="lm-eval: at most this many documents per task."),
    num_fewshot: int = typer.Option(None, help="lm-eval: few-shot examples per prompt."),
    include_path: Path = typer.Option(None, help="lm-eval: a directory of extra task YAMLs."),
    seq_len: int = typer.Option(256, help="Evaluation window length."),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Held-out loss and bits-per-byte per language (--data), and/or lm-eval tasks (--tasks)."""
    if not data and not tasks:
        raise LevanteError("give --data (held-out loss per language) and/or --tasks (lm-eval tasks)")
    if tasks:
        _eval_tasks(checkpoint, [t.strip() for t in tasks.split(",") if t.strip()], device, batch_size, limit,
                    num_fewshot, include_path, json_out)
    if not data:
        return
    from levante.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, seq_len=seq_len, batch_size=batch_size, device=device)
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


def _eval_tasks(checkpoint, tasks, device, batch_size, limit, num_fewshot, include_path, json_out):
    try:
        from levante.interop.lm_eval import run_tasks
    except ImportError as e:
        raise LevanteError(f"--tasks needs lm-evaluation-harness: pip install 'levante[eval]' ({e})") from None
    out = run_tasks(checkpoint, tasks, device=device, batch_size=batch_size, limit=limit,
                    num_fewshot=num_fewshot, include_path=include_path)
    if json_out:
        print(json.dumps(out, indent=2, default=str))
        return
    table = Table(title=f"{checkpoint}: lm-eval")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right")
    for task, metrics in out["results"].items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                table.add_row(task, name.split(",")[0], f"{value:.4f}")
    console.print(table)


def generate(
    checkpoint: Path = typer.Argument(..., help=CHECKPOINT_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, help="0 for greedy decoding."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1: off)."),
    seed: int = typer.Option(None, help="Seed for reproducible sampling."),
    ignore_eos: bool = typer.Option(False, help="Keep generating past the end-of-document token."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Continue a prompt with the latent KV cache, streaming text to stdout."""
    from levante.infer.engine import SamplingParams, generate_text
    from levante.infer.load import load_for_inference

    model, tokenizer, _ = load_for_inference(checkpoint, device=device)
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos=not ignore_eos)
    sys.stdout.write(prompt)
    generate_text(model, tokenizer, prompt, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")


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


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command()(generate)
    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")
