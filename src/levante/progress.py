"""Rich progress display for training: a live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from levante.config import TrainConfig
from levante.train.trainer import Trainer, TrainResult


def _num(x: float) -> str:
    return f"{x:.3f}" if x == x and abs(x) != float("inf") else str(x)


def format_record(r: dict) -> str:
    if "eval" in r:
        ev = r["eval"]
        if "reward_margin" in ev:  # DPO
            return (f"eval step {r['step']}: dpo loss {ev['loss']:.3f} | reward margin {ev['reward_margin']:.3f} "
                    f"| reward acc {ev['reward_accuracy']:.1%} | logp acc {ev['logp_accuracy']:.1%}")
        if "bpb" not in ev:  # SFT: loss on assistant tokens
            langs = " ".join(f"{k}={v['loss']:.2f}" for k, v in ev.get("per_language", {}).items())
            return f"eval step {r['step']}: answer loss {ev['loss']:.3f} | {langs}"
        langs = " ".join(f"{k}={v['bpb']:.2f}" for k, v in ev.get("per_language", {}).items())
        return f"eval step {r['step']}: loss {ev['loss']:.3f} bpb {ev['bpb']:.3f} | {langs}"
    parts = [f"step {r['step']}", f"loss {_num(r['loss'])}"]
    if "mtp_loss" in r:
        parts.append(f"mtp {r['mtp_loss']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {_num(r['grad_norm'])}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") == r.get("mfu"):  # not NaN
        parts.append(f"MFU {r['mfu']:.1%}")
    if "load_max_over_mean" in r:
        parts.append(f"load max/mean {r['load_max_over_mean']:.2f}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    parts.append(f"ETA {r['eta_s'] / 60:.1f} min")
    line = " | ".join(parts)
    return f"{line} | SKIPPED: {r['skip_reason']}" if r.get("skipped") else line


def train_with_progress(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                        console: Console | None = None) -> TrainResult:
    console = console or Console()
    if not console.is_terminal:
        # Plain log lines: one record per line, never wrapped, so log files stay greppable.
        trainer = Trainer(cfg, out, on_log=lambda r: console.print(format_record(r), soft_wrap=True))
        return trainer.fit(resume=resume, overwrite=overwrite)

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console)
    task = progress.add_task("train", total=cfg.run.steps, status="starting")

    def on_log(r: dict):
        if "eval" in r:
            progress.console.print(format_record(r))
        else:
            if r.get("skipped"):
                progress.console.print(format_record(r))
            status = f"loss {_num(r['loss'])} | {r['tokens_per_s']:,.0f} tok/s"
            if r.get("mfu") == r.get("mfu"):
                status += f" | MFU {r['mfu']:.1%}"
            if "load_max_over_mean" in r:
                status += f" | load {r['load_max_over_mean']:.2f}"
            if r.get("skipped_steps"):
                status += f" | skipped {r['skipped_steps']}"
            progress.update(task, completed=r["step"], status=status)

    with progress:
        trainer = Trainer(cfg, out, on_log=on_log)
        progress.update(task, completed=trainer.step)
        return trainer.fit(resume=resume, overwrite=overwrite)
