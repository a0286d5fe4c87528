"""Training verbs: `levante train`, `levante quickstart`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from levante.cli.common import console


def train(
    config: Path = typer.Argument(..., help="Training config (TOML): [model] [data] [optim] [schedule] [run]."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, config."),
    resume: bool = typer.Option(False, help="Continue from the newest valid checkpoint in --out."),
    overwrite: bool = typer.Option(False, help="Replace the run that --out holds (its checkpoints and metrics)."),
    nproc: int = typer.Option(1, help="Ranks on this machine: starts torchrun's elastic agent for you."),
):
    """Train a model; checkpoints are resumable bit for bit."""
    from levante.config import TrainConfig

    cfg = TrainConfig.load(config)  # before importing torch: a config mistake is reported at once
    if nproc != 1 and "RANK" not in os.environ:
        from levante.parallel.launch import launch_local

        launch_local(nproc, [str(config), "--out", str(out), *(["--resume"] if resume else []),
                             *(["--overwrite"] if overwrite else [])])
        return
    from levante.parallel.mesh import shutdown
    from levante.progress import train_with_progress

    try:
        result = train_with_progress(cfg, out, resume=resume, overwrite=overwrite, console=console)
    finally:
        shutdown()  # under torchrun; a no-op in one process
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints
        console.print(f"done: {result.steps} steps, {result.tokens:,} tokens, checkpoint {result.checkpoint}")


def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", "-o", help="Output directory."),
    minutes: float = typer.Option(4.0, help="Training time budget in minutes (the whole job adds ~1 min)."),
    steps: int = typer.Option(0, help="Exact number of training steps (overrides --minutes)."),
    overwrite: bool = typer.Option(False, help="Replace a previous quickstart in --out."),
    chat: bool = typer.Option(False, "--chat", help="Then SFT + DPO on the bundled chat set (a few more minutes)."),
    sft_steps: int = typer.Option(100, help="With --chat: SFT steps."),
    dpo_steps: int = typer.Option(50, help="With --chat: DPO steps."),
):
    """The whole flow on the bundled corpus: tokenizer, shards, train `tiny`, eval, samples, report."""
    from levante.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, steps=steps or None, overwrite=overwrite, console=console, chat=chat,
                   chat_steps=(sft_steps, dpo_steps))


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(quickstart)
