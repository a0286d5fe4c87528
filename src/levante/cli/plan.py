"""`levante plan NAME`: the planner on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from levante.config import ModelConfig
from levante.errors import LevanteError


def resolve_model(name: str) -> ModelConfig:
    """A preset name, a TOML file with a [model] table, or a checkpoint dir holding config.toml."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.toml").is_file():
            raise LevanteError(f"{path}: directory has no config.toml (expected a Levante checkpoint)")
        return ModelConfig.from_toml(path / "config.toml")
    if path.is_file():
        return ModelConfig.from_toml(path)
    if path.suffix == ".toml" or "/" in name or "\\" in name:  # clearly meant as a path
        raise LevanteError(f"config not found: {name}")
    return ModelConfig.preset(name)  # unknown names raise ConfigError listing the presets


def plan_command(
    name: str = typer.Argument(..., help="Preset name, TOML file with a [model] table, or checkpoint dir."),
    seq_len: int = typer.Option(4096, help="Training sequence length."),
    tokens: str | None = typer.Option(None, help="Training tokens, e.g. 4T (default: 20 x active params)."),
    gpus: int | None = typer.Option(None, help="GPU count (default: the smallest that fits)."),
    gpu: str = typer.Option("h100", help="h100, h200, h800, a100, mi250x, mi300x or gh200."),
    mfu: float = typer.Option(0.4, help="Assumed model FLOPs utilisation, 0..1."),
    days: float | None = typer.Option(None, help="Size the smallest cluster that trains in this many days."),
    gpu_hours: str | None = typer.Option(None, "--gpu-hours",
                                         help="A GPU-hour budget, e.g. 2.664M: the MFU it implies."),
    pue: float = typer.Option(1.2, help="Data-centre power usage effectiveness for the energy figure."),
    price: float | None = typer.Option(None, help="Price per GPU-hour (any currency) for the cost figure."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Parameters, FLOPs, GPU-hours, memory per GPU and KV cache for a model."""
    from levante.plan import plan
    from levante.plan.cluster import parse_amount, size_cluster

    cfg = resolve_model(name)
    days = parse_amount(days, "--days")
    result = plan(cfg, seq_len=seq_len, tokens=parse_amount(tokens, "--tokens"), gpus=gpus, gpu=gpu, mfu=mfu)
    budget = parse_amount(gpu_hours, "--gpu-hours")
    result.update(size_cluster(cfg, result, gpu=gpu.lower(), days=days, gpu_hours=budget, pue=pue, price=price,
                               seq_len=seq_len))
    if json_out:
        typer.echo(json.dumps({"name": name, **result}, indent=2))
        return
    from rich.console import Console

    from levante.plan.render import format_plan

    Console().print(format_plan(result, title=f"Levante plan: {name}"))


def register(app: typer.Typer) -> None:
    app.command("plan", help="Parameters, FLOPs, memory and GPU-hours for a preset or config.")(plan_command)
