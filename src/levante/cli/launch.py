"""Launch verbs: `levante launch slurm` writes an sbatch script for a multi-node run."""

from __future__ import annotations

from pathlib import Path

import typer

from levante.cli.common import console

launch_app = typer.Typer(no_args_is_help=True, help="Launch training on clusters.")


@launch_app.command()
def slurm(
    config: Path = typer.Argument(..., help="Training config (TOML)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (the script is written into it)."),
    nodes: int = typer.Option(..., help="Number of nodes."),
    gpus_per_node: int = typer.Option(..., help="GPUs (ranks) per node."),
    partition: str = typer.Option(None, help="Slurm partition."),
    time: str = typer.Option(None, help="Time limit, e.g. 2-00:00:00."),
    port: int = typer.Option(29500, help="Rendezvous port on the first node."),
):
    """Write OUT/train.sbatch: srun starts one torchrun agent per node (c10d rendezvous on the first)."""
    from levante.config import TrainConfig
    from levante.parallel.launch import slurm_script

    TrainConfig.load(config)  # a config mistake now, not after the job waited in the queue
    text = slurm_script(config, out, nodes, gpus_per_node, partition, time, port)
    out.mkdir(parents=True, exist_ok=True)
    from levante.util import atomic_write_text

    script = out / "train.sbatch"
    atomic_write_text(script, text)
    script.chmod(0o755)
    console.print(f"wrote {script}: sbatch {script}")


def register(app: typer.Typer) -> None:
    app.add_typer(launch_app, name="launch")
