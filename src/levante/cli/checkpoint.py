"""Checkpoint verbs: `levante checkpoint consolidate`."""

from __future__ import annotations

from pathlib import Path

import typer

from levante.cli.common import console

checkpoint_app = typer.Typer(no_args_is_help=True, help="Work with training checkpoints.")


@checkpoint_app.command()
def consolidate(
    src: Path = typer.Argument(..., help="A distributed (DCP) checkpoint dir, or a run dir (its newest one)."),
    out: Path = typer.Argument(..., help="Output: one ordinary Levante checkpoint directory."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT."),
):
    """Merge a checkpoint saved at N ranks into one ordinary checkpoint (for export hf, from_pretrained)."""
    from levante.checkpoint.dcp import consolidate as run

    path = run(src, out, overwrite=overwrite)
    console.print(f"consolidated {src} -> {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoint_app, name="checkpoint")
