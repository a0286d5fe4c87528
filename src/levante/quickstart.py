"""`levante quickstart`: the whole flow on the bundled sample corpus, in minutes on a laptop CPU.

tokenizer -> token shards -> train the `tiny` MoE -> held-out eval per language (before and after)
-> samples in several languages -> report.html. Everything lands in one directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from levante.config import DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig, TaskConfig, TrainConfig
from levante.data.prepare import prepare
from levante.data.readers import bundled_corpus
from levante.data.shards import tokenize_corpus
from levante.errors import LevanteError
from levante.infer.engine import SamplingParams, generate_text
from levante.infer.load import load_for_inference
from levante.progress import train_with_progress
from levante.report import write_report
from levante.tokenizer import train_tokenizer
from levante.train.trainer import Trainer
from levante.util import atomic_write_text

MARKER = ".levante-quickstart"
PROMPTS = [("en", "The old library"), ("de", "Am Morgen"), ("fr", "Le marché"), ("el", "Η θάλασσα")]


def quickstart_config(out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig.preset("tiny"),
        data=DataConfig(tokenizer=str(out / "tokenizer" / "tokenizer.json"), train=str(out / "data" / "train"),
                        valid=str(out / "data" / "valid"), seq_len=256),
        optim=OptimConfig(name="muon", lr=3e-3, muon_lr=3e-3, weight_decay=0.1),
        schedule=ScheduleConfig(name="wsd", warmup_steps=min(20, max(steps // 10, 1)), decay_fraction=0.3),
        run=RunConfig(steps=steps, micro_batch_size=8, grad_accum=1, log_every=max(steps // 40, 1),
                      eval_every=max(steps // 4, 1), eval_batches=4, ckpt_every=max(steps // 4, 1), keep_last=2),
    ).validate()


def post_config(kind: str, init_from: Path, steps: int) -> TrainConfig:
    """SFT on the bundled chat set, or DPO on its preference pairs, from `init_from`."""
    from levante.data.chat_data import bundled_post_corpus

    files = "chat" if kind == "sft" else "prefs"
    lr = 2e-3 if kind == "sft" else 5e-4
    return TrainConfig(
        data=DataConfig(train=str(bundled_post_corpus(files, "train")), valid=str(bundled_post_corpus(files, "valid")),
                        seq_len=256),
        optim=OptimConfig(name="muon", lr=lr, muon_lr=lr, weight_decay=0.0),
        schedule=ScheduleConfig(name="wsd", warmup_steps=min(10, max(steps // 10, 1)), decay_fraction=0.3),
        run=RunConfig(steps=steps, micro_batch_size=8, log_every=max(steps // 10, 1), eval_every=max(steps // 2, 1),
                      ckpt_every=0, keep_last=1),
        task=TaskConfig(kind=kind, init_from=str(init_from), beta=0.1),
    ).validate()


def run_chat_stage(out: Path, base_ckpt: Path, console: Console, sft_steps: int = 100, dpo_steps: int = 50,
                   prompts_per_lang: int = 6) -> dict:
    """SFT then DPO on the bundled post-training set; the base, SFT and DPO models answer the same
    held-out prompts. Writes chat.json; returns what the report's chat section shows."""
    from levante.chat_eval import LanguageGuesser, answer_metrics, logp_accuracy
    from levante.data.chat_data import bundled_post_corpus, read_pairs
    from levante.interop.load import from_pretrained
    from levante.tokenizer import LevanteTokenizer

    console.rule("[bold]6/8 SFT on the bundled chat set")
    sft = train_with_progress(post_config("sft", base_ckpt, sft_steps), out / "sft", console=console)
    console.rule("[bold]7/8 DPO on the bundled preference pairs")
    dpo = train_with_progress(post_config("dpo", sft.checkpoint, dpo_steps), out / "dpo", console=console)

    console.rule("[bold]8/8 chat evaluation")
    tokenizer = LevanteTokenizer(Path(base_ckpt) / "tokenizer.json")
    held = [json.loads(x) for x in bundled_post_corpus("chat", "valid").read_text(encoding="utf-8").splitlines()]
    prompts, per_lang = [], {}
    for rec in held:
        if per_lang.get(rec["lang"], 0) < prompts_per_lang:
            per_lang[rec["lang"]] = per_lang.get(rec["lang"], 0) + 1
            prompts.append((rec["lang"], rec["messages"][:-1]))
    guesser = LanguageGuesser(sorted(per_lang))
    pairs, _ = read_pairs(bundled_post_corpus("prefs", "valid"), tokenizer, 256)
    models = {}
    for name, ckpt in (("base", base_ckpt), ("sft", sft.checkpoint), ("dpo", dpo.checkpoint)):
        model = from_pretrained(ckpt)
        m = answer_metrics(model, tokenizer, prompts, guesser)
        m["preference_accuracy"] = logp_accuracy(model, pairs, tokenizer.pad_id)
        models[name] = m
        console.print(f"{name}: end-of-turn {m['end_of_turn_rate']:.0%}, answers in the prompt's language "
                      f"{m['same_language_rate']:.0%}, held-out preference accuracy {m['preference_accuracy']:.0%}")
    chat = {
        "prompts": [{"lang": lang, "user": msgs[-1]["content"]} for lang, msgs in prompts],
        "models": models, "sft_eval": sft.eval, "dpo_eval": dpo.eval,
        "steps": {"sft": sft.steps, "dpo": dpo.steps}, "checkpoints": {"sft": str(sft.checkpoint),
                                                                       "dpo": str(dpo.checkpoint)},
    }
    atomic_write_text(out / "chat.json", json.dumps(chat, indent=2, ensure_ascii=False))
    return chat


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LevanteError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise LevanteError(f"{out} is not empty and is not a previous quickstart directory; choose --out")
        if not overwrite:
            raise LevanteError(f"{out} holds a previous quickstart; use --overwrite to replace it or choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by levante quickstart; safe to delete\n")


def _calibrate(cfg: TrainConfig) -> tuple[float, dict]:
    """Seconds per training step on this machine, and the untrained model's held-out eval.

    A throwaway trainer with the same seed builds the same initial weights as the real run.
    """
    with tempfile.TemporaryDirectory() as tmp:
        probe = Trainer(cfg, tmp)
        untrained = probe.evaluate()
        probe.train_step()  # warm-up: allocator, kernel selection
        t = time.perf_counter()
        for _ in range(2):
            probe.train_step()
        return (time.perf_counter() - t) / 2, untrained


def run_quickstart(out: str | Path = "quickstart", minutes: float = 4.0, steps: int | None = None,
                   overwrite: bool = False, console: Console | None = None, chat: bool = False,
                   chat_steps: tuple[int, int] = (100, 50)) -> dict:
    console = console or Console()
    out = Path(out)
    if steps is None and minutes <= 0:
        raise LevanteError(f"--minutes must be positive, got {minutes}")
    _prepare_dir(out, overwrite)
    stages = 8 if chat else 5
    if chat and min(chat_steps) < 1:
        raise LevanteError(f"--sft-steps and --dpo-steps must be >= 1, got {chat_steps}")
    started = time.perf_counter()
    console.rule(f"[bold]0/{stages} data prepare")
    # the raw bundled text goes through the same pipeline as a real corpus: language ID, filters,
    # PII scrubbing, dedup, provenance; train and valid separately, so the splits stay as shipped
    data_reports = {}
    for split in ("train", "valid"):
        rep = prepare(bundled_corpus(split), out / "prepared" / split, license="CC0-1.0")
        data_reports[split] = rep
        console.print(f"{split}: kept {rep['kept']:,} of {rep['documents_in']:,} documents, rejected "
                      f"{sum(rep['rejected'].values())}, duplicates {rep['duplicates']}")
    train_files, valid_files = [out / "prepared" / "train"], [out / "prepared" / "valid"]

    console.rule(f"[bold]1/{stages} tokenizer")
    tok = train_tokenizer(train_files, out / "tokenizer", vocab_size=8192, eval_paths=valid_files)
    console.print(f"byte-level BPE, {tok.vocab_size} tokens, {len(tok.languages)} languages -> {tok.path}")

    console.rule(f"[bold]2/{stages} token shards")
    workers = max(1, min(2, os.cpu_count() or 1))
    for split, files in (("train", train_files), ("valid", valid_files)):
        index = tokenize_corpus(files, tok.path, out / "data" / split, workers=workers)
        console.print(f"{split}: {index.num_tokens:,} tokens, {index.num_documents} documents")

    console.rule(f"[bold]3/{stages} train tiny MoE")
    probe_cfg = quickstart_config(out, steps=1000)
    step_s, untrained = _calibrate(probe_cfg)
    if steps is None:
        steps = max(20, int(minutes * 60 / step_s))
    cfg = quickstart_config(out, steps)
    console.print(f"{steps} steps (~{step_s:.2f} s each), untrained held-out bpb {untrained['bpb']:.3f}")
    result = train_with_progress(cfg, out, console=console)

    console.rule(f"[bold]4/{stages} evaluation")
    trained = result.eval
    eval_result = {"untrained": untrained, "trained": trained}
    atomic_write_text(out / "eval.json", json.dumps(eval_result, indent=2))
    table = Table(title="held-out bits per byte")
    for col in ("lang", "untrained", "trained"):
        table.add_column(col, justify="right")
    for lang in sorted(trained["per_language"]):
        table.add_row(lang, f"{untrained['per_language'][lang]['bpb']:.3f}",
                      f"{trained['per_language'][lang]['bpb']:.3f}")
    table.add_row("all", f"{untrained['bpb']:.3f}", f"{trained['bpb']:.3f}", style="bold")
    console.print(table)

    console.rule(f"[bold]5/{stages} samples")
    model, tokenizer, _ = load_for_inference(result.checkpoint)
    samples = []
    for i, (lang, prompt) in enumerate(PROMPTS):
        params = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=i)
        text = generate_text(model, tokenizer, prompt, params)
        samples.append((f"[{lang}] {prompt}", prompt + text))
        console.print(f"[bold]{lang}[/bold] {prompt}{text}")
    atomic_write_text(out / "samples.txt", "".join(f"{p}\n{t}\n\n" for p, t in samples))

    chat_result = run_chat_stage(out, result.checkpoint, console, *chat_steps) if chat else None
    elapsed = time.perf_counter() - started
    total, active = model.num_params(), model.num_params(active=True)
    summary = {
        "model": f"tiny MoE, {total / 1e6:.1f}M params ({active / 1e6:.1f}M active per token)",
        "steps": result.steps, "tokens trained": f"{result.tokens:,}",
        "held-out bpb": f"{untrained['bpb']:.3f} untrained -> {trained['bpb']:.3f} trained",
        "checkpoint": str(result.checkpoint), "wall time": f"{elapsed / 60:.1f} min",
    }
    report = write_report(out, eval_result, samples, summary, chat=chat_result,
                          data={split: r["languages"] for split, r in data_reports.items()})
    console.print(f"report: {report}  ({elapsed / 60:.1f} min in all)")
    return {"eval": eval_result, "checkpoint": result.checkpoint, "report": report, "steps": result.steps}
