"""The training loop: one process on CPU or GPU; parallelism and compile are applied from outside the model.

Per optimizer step: `grad_accum` micro-batches forward/backward, clip, the spike guard's verdict,
optimizer step, then the aux-loss-free router-bias update from the expert loads of the whole step.
Checkpoints capture weights, optimizer, data position, RNG states and the guard's window, so
`resume=True` continues bit for bit. A directory that holds a run is never restarted over unless
`overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from levante.checkpoint import claim_run_dir, save_checkpoint
from levante.config import TrainConfig
from levante.data.loader import TokenLoader, language_eval_windows
from levante.data.shards import open_shards
from levante.errors import LevanteError
from levante.evaluation import evaluate_languages, summarize
from levante.model.transformer import Transformer
from levante.parallel.fsdp import parallelize
from levante.parallel.mesh import Dist
from levante.plan import GPUS
from levante.tokenizer import LevanteTokenizer
from levante.train.balancing import RouterBalancer
from levante.train.guard import SpikeGuard
from levante.train.metrics import MetricsWriter, measure_cpu_matmul_peak, mfu, model_flops_per_token
from levante.train.optim import build_optimizer, clip_grads_, grad_norm_tensor, sharded_grad_norm
from levante.train.schedule import apply_lr, lr_multiplier
from levante.util import atomic_write_text, resolve_device

log = logging.getLogger("levante")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float
    eval: dict = field(default_factory=dict)
    checkpoint: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":  # dense bf16 peak of a card the planner knows; NaN (no MFU) otherwise
        name = torch.cuda.get_device_name(device).lower()
        return next((gpu["peak_flops"] for key, gpu in GPUS.items() if key in name), float("nan"))
    return measure_cpu_matmul_peak(seconds=0.5)


class _NoMetrics:
    """The metrics log of a rank other than 0: writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, on_log: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.on_log = on_log or (lambda record: None)
        device = resolve_device(cfg.run.device)
        # Under torchrun: process group + DeviceMesh; one process otherwise (world size 1).
        self.dist = Dist.from_env(device, cfg.parallel.ep)
        self.device = self.dist.device(device)
        if not self.dist.is_main:  # only rank 0 prints
            self.on_log = lambda record: None
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())

        if cfg.task.kind != "pretrain":
            from levante.train.sft import resolve_init

            cfg = self.cfg = resolve_init(cfg)  # the init checkpoint's model (and tokenizer)
        if not cfg.data.tokenizer or not cfg.data.train:
            raise LevanteError("config needs data.tokenizer and data.train (run `levante tokenize` first)")
        self.tokenizer = LevanteTokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise LevanteError(f"tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                               f"{cfg.model.vocab_size}")
        if (self.tokenizer.bos_id, self.tokenizer.eos_id) != (cfg.model.bos_token_id, cfg.model.eos_token_id):
            raise LevanteError("model.bos_token_id/eos_token_id do not match the tokenizer's special tokens")
        self.task = None  # pretraining; SFTTask / DPOTask supply batches, loss and evals otherwise
        if cfg.task.kind == "pretrain":
            sha = self.tokenizer.sha256
            self.train_shards = open_shards(cfg.data.train, expected_tokenizer_sha256=sha)
            self.valid_shards = (open_shards(cfg.data.valid, expected_tokenizer_sha256=sha)
                                 if cfg.data.valid else None)
        else:
            from levante.train.dpo import DPOTask
            from levante.train.sft import SFTTask

            self.task = (SFTTask if cfg.task.kind == "sft" else DPOTask)(cfg, self.tokenizer)
            self.task.loader.set_rank(self.dist.rank, self.dist.world_size)
            self.valid_shards = None

        seed_everything(cfg.run.seed)
        model = Transformer(cfg.model).to(self.device)
        if cfg.task.init_from:
            from levante.train.sft import load_init_weights

            load_init_weights(model, cfg)
            if cfg.task.kind == "dpo":  # a frozen copy, split and sharded as the policy is: no rank holds it whole
                self.task.set_reference(model)
                parallelize(self.task.reference, self.dist, cfg.parallel, self.device)
        self.model = parallelize(model, self.dist, cfg.parallel, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.balancer = RouterBalancer(self.model, cfg.model.bias_update_speed)
        self.guard = SpikeGuard(cfg.run.spike_window, cfg.run.spike_sigma, cfg.run.max_consecutive_skips,
                                enabled=cfg.run.skip_spikes)
        self.loader = (self.task.loader if self.task else
                       TokenLoader(self.train_shards, cfg.data.seq_len, cfg.run.micro_batch_size, cfg.run.seed,
                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                   mix_temperature=cfg.data.mix_temperature, mix_weights=cfg.data.mix_weights))
        # Periodic evals score whole held-out documents, up to eval_batches batches per language.
        self.eval_sets = (language_eval_windows(self.valid_shards, cfg.data.seq_len,
                                                max_windows_per_lang=cfg.run.eval_batches * cfg.run.micro_batch_size)
                          if self.valid_shards is not None else {})
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        self.step = 0
        self.tokens = 0
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(self.device) * self.dist.world_size  # tokens/s counts every rank

    # ---------------------------------------------------------------- state

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                "guard": self.guard.state_dict()}

    def save(self) -> Path:
        if self.dist.enabled:
            from levante.checkpoint.dcp import save_distributed

            return save_distributed(self.out_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                    self.dist, keep_last=self.cfg.run.keep_last,
                                    tokenizer_path=self.tokenizer.path, config_text=self.cfg.dumps())
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                               keep_last=self.cfg.run.keep_last, tokenizer_path=self.tokenizer.path,
                               config_text=self.cfg.dumps())

    def resume(self) -> bool:
        from levante.checkpoint.dcp import load_latest_any

        found = load_latest_any(self.out_dir, self.model, self.optimizer, self.dist)
        if found is None:
            return False
        path, state = found
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loader.load_state_dict(state["loader"])
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _claim(self, resume: bool, overwrite: bool) -> None:
        claim_run_dir(self.out_dir, resume=resume, overwrite=overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.toml", self.cfg.dumps())
        if self.task is not None:  # what the post-training data kept and rejected, per reason
            atomic_write_text(self.out_dir / "data_report.json", json.dumps(self.task.reports, indent=2))

    # ---------------------------------------------------------------- loop

    def train_step(self, per_language: bool = False) -> dict:
        """One optimizer step (or a skipped one: `record["skipped"]`). With `per_language`, also the
        last micro-batch's loss per language and the step's expert-load statistics."""
        cfg = self.cfg
        model = self.model
        model.train()
        apply_lr(self.optimizer, lr_multiplier(self.step, cfg.run.steps, cfg.schedule))
        # Losses stay on the device until the end of the step: one host sync per step, not per micro-batch.
        sums: dict[str, torch.Tensor] = {}
        lang_loss = {}
        batches = [self.loader.next_batch() for _ in range(cfg.run.grad_accum)]
        weights = self._micro_weights(batches)
        for micro, batch in enumerate(batches):
            with self.autocast:
                out, targets = self._micro_forward(batch)
            (out.loss * weights[micro]).backward()
            self.balancer.observe(out.expert_load)
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
                value = getattr(out, key)
                if value is not None:
                    sums[key] = sums.get(key, 0) + value.detach() * weights[micro]
            self.tokens += batch[0].numel() * self.dist.world_size
            if per_language and micro == cfg.run.grad_accum - 1:
                lang_loss = (self.task.loss_per_language(out, targets) if self.task
                             else self._loss_per_language(out.logits, targets))
            del out  # free this micro-batch's logits before the next forward
        norm = (sharded_grad_norm(model.parameters(), self.dist.all_reduce) if self.dist.ep > 1
                else grad_norm_tensor(model.parameters()))  # global under FSDP
        keys = list(sums)
        losses = self.dist.all_reduce(torch.stack([sums[k].float() for k in keys]), "avg")  # ranks' mean
        # Loads summed over ranks before the bias update: every rank moves the bias identically.
        self.balancer.reduce(self.dist.all_reduce)
        values = torch.cat([losses, norm.float()[None]]).tolist()  # the one sync
        record = dict(zip(keys, values[:-1], strict=True))
        grad_norm = values[-1]
        record.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"])
        if per_language:
            record.update(self.balancer.stats())
            record["loss_per_language"] = lang_loss
            if isinstance(self.loader, TokenLoader):  # realised language shares of the windows since the last log
                record["mix"] = self.loader.pop_mix()
        if not self.guard.enabled and not math.isfinite(grad_norm):
            raise LevanteError(f"gradient norm is {grad_norm} at step {self.step + 1}: training diverged "
                               "(lower the learning rate, or enable run.skip_spikes)")
        reason = self.guard.reason_to_skip(record["loss"], grad_norm)
        self.step += 1
        if reason is None:
            self.guard.accept(record["loss"], grad_norm)
            clip_grads_(model.parameters(), cfg.optim.grad_clip, norm)
            self.optimizer.step()
            self.balancer.step()
        else:
            log.warning("skipping step %d: %s", self.step, reason)
            self.guard.skip()
            self.balancer.discard()
        self.optimizer.zero_grad(set_to_none=True)
        record.update(skipped=reason is not None, skipped_steps=self.guard.skipped)
        if reason is not None:
            record["skip_reason"] = reason
        return record

    def _micro_weights(self, batches: list) -> torch.Tensor | list[float]:
        """Each micro-batch's weight in the step's loss (the ranks' losses are then averaged).

        Equal (1 / grad_accum) unless the task's loss is a mean over a varying number of tokens per
        micro-batch (SFT: the answer tokens). Then each weighs its tokens over the step's tokens on all
        ranks, times the world size: the step minimises the mean over every answer token of the global
        batch, as one rank holding the whole batch would, not a mean of micro-batch means.
        """
        count = getattr(self.task, "loss_tokens", None)
        if count is None:
            return [1 / len(batches)] * len(batches)
        n = torch.tensor([count(b) for b in batches], dtype=torch.float64, device=self.device)
        total = self.dist.all_reduce(n.sum(), "sum").clamp(min=1)
        return (n * self.dist.world_size / total).float()

    def _micro_forward(self, batch):
        """-> (model output with .loss, targets for the per-language loss)."""
        if self.task is not None:
            return self.task.forward(self.forward, batch, self.device)
        inputs, targets = (t.to(self.device) for t in batch)
        return self.forward(inputs, targets=targets), targets

    @torch.no_grad()
    def _loss_per_language(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        token_loss = torch.nn.functional.cross_entropy(logits.detach().float().flatten(0, 1), targets.flatten(),
                                                       reduction="none")
        langs = self.loader.label_lang_ids().flatten().to(token_loss.device)
        n = len(self.train_shards.langs)
        sums = torch.zeros(n, device=token_loss.device).index_add_(0, langs, token_loss)
        counts = torch.bincount(langs, minlength=n).float()
        both = self.dist.all_reduce(torch.stack([sums, counts]))  # over every rank's slice of the batch
        sums, counts = both[0], both[1]
        return {lang: float(sums[i] / counts[i]) for i, lang in enumerate(self.train_shards.langs) if counts[i]}

    def evaluate(self) -> dict:
        if self.task is not None:
            with self.autocast:
                return self.task.evaluate(self.model, self.device)
        if not self.eval_sets:
            return {}
        self.model.eval()
        with self.autocast:
            per_lang = evaluate_languages(self.model, self.eval_sets, batch_size=self.cfg.run.micro_batch_size,
                                          device=self.device)
        return {"per_language": per_lang, **summarize(per_lang)}

    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        cfg = self.cfg
        self.dist.run_on_main(self._claim, resume, overwrite)  # rank 0 writes the run directory
        if resume:
            self.resume()
        # Only rank 0 logs; the others see the same (all-reduced) records.
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl", resume_step=self.step) if self.dist.is_main \
            else _NoMetrics()
        start_time, start_step = time.perf_counter(), self.step
        # Throughput counts training steps only; evals and checkpoints are excluded from tokens/s.
        window_time, window_tokens = 0.0, 0
        record, eval_result, ckpt = {}, {}, None
        try:
            while self.step < cfg.run.steps:
                log_now = (self.step + 1) % cfg.run.log_every == 0 or self.step + 1 == cfg.run.steps
                t0, tokens0 = time.perf_counter(), self.tokens
                record = self.train_step(per_language=log_now)
                now = time.perf_counter()
                window_time += now - t0
                window_tokens += self.tokens - tokens0
                if log_now or record["skipped"]:  # every skipped step is in metrics.jsonl
                    tps = window_tokens / max(window_time, 1e-9)
                    done = self.step - start_step
                    eta = (now - start_time) / max(done, 1) * (cfg.run.steps - self.step)
                    record.update(step=self.step, tokens=self.tokens, tokens_per_s=tps, eta_s=eta,
                                  mfu=mfu(tps, self.flops_per_token, self.peak), elapsed_s=now - start_time)
                    if self.device.type == "cuda":  # this rank's peak; rank 0 logs it
                        record["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
                    metrics.write(record)
                    self.on_log(record)
                    window_time, window_tokens = 0.0, 0
                if record["skipped"]:
                    self.guard.check_not_stuck(self.step, record["skip_reason"])
                if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < cfg.run.steps:
                    eval_result = self.evaluate()
                    if eval_result:
                        metrics.write({"step": self.step, "eval": eval_result})
                        self.on_log({"step": self.step, "eval": eval_result})
                if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0 and self.step < cfg.run.steps:
                    ckpt = self.save()
            eval_result = self.evaluate()
            if eval_result:
                metrics.write({"step": self.step, "eval": eval_result})
                self.on_log({"step": self.step, "eval": eval_result})
            ckpt = self.save()
        finally:
            metrics.close()
        return TrainResult(self.out_dir, self.step, self.tokens, record.get("loss", float("nan")),
                           eval_result, ckpt)
