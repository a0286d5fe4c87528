"""Supervised fine-tuning on chat data: what `[task] kind = "sft"` changes in the trainer.

Batches are packed conversations (data/chat_data.py) with document masking; the loss is the mean
cross-entropy over assistant tokens only (targets elsewhere are -100), over every answer token of the
global batch: micro-batches and ranks hold different numbers of them, and the trainer weights each
micro-batch's mean by its share (`loss_tokens`), so N ranks train what 1 rank does. The model starts from
`task.init_from`, whose model config replaces `[model]`; periodic evals give the held-out loss per
language on the assistant tokens of `data.valid`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from levante.checkpoint.resolve import resolve_checkpoint
from levante.config import ModelConfig, TrainConfig
from levante.data.chat_data import ChatLoader, pack_conversations, read_conversations
from levante.errors import LevanteError
from levante.model.transformer import IGNORE_INDEX, ModelOutput

log = logging.getLogger("levante")


def resolve_init(cfg: TrainConfig) -> TrainConfig:
    """With task.init_from: the config with the checkpoint's model (and its tokenizer unless
    data.tokenizer is set). A [model] table that says something else is refused."""
    if not cfg.task.init_from:
        return cfg
    from levante.interop.load import load_levante_config, read_hf_config

    ckpt = resolve_checkpoint(cfg.task.init_from)
    model_cfg = (load_levante_config if ckpt.kind == "levante" else read_hf_config)(ckpt.path)
    if cfg.model not in (ModelConfig(), model_cfg):
        raise LevanteError("[model] differs from the model of task.init_from; drop the [model] table "
                           "(post-training keeps the initial model's architecture)")
    tokenizer = cfg.data.tokenizer or str(ckpt.path / "tokenizer.json")
    if not Path(tokenizer).is_file():
        raise LevanteError(f"no tokenizer: set data.tokenizer ({ckpt.path} has no tokenizer.json)")
    return dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def load_init_weights(model: torch.nn.Module, cfg: TrainConfig) -> None:
    from levante.interop.load import read_checkpoint

    _, state, ckpt = read_checkpoint(cfg.task.init_from)
    model.load_state_dict(state, strict=True)
    log.info("initialised from %s", ckpt.path)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position [B, T] (0 where the target is -100)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)


class SFTTask:
    kind = "sft"

    def __init__(self, cfg: TrainConfig, tokenizer):
        seq = cfg.data.seq_len
        convs, report = read_conversations(cfg.data.train, tokenizer, seq)
        self.reports = {"train": report.to_dict()}
        self.loader = ChatLoader(pack_conversations(convs, seq, tokenizer.pad_id, cfg.run.seed),
                                 cfg.run.micro_batch_size, cfg.run.seed)
        self.langs = self.loader.langs
        self.valid = None
        if cfg.data.valid:
            held, vreport = read_conversations(cfg.data.valid, tokenizer, seq)
            self.reports["valid"] = vreport.to_dict()
            self.valid = pack_conversations(held, seq, tokenizer.pad_id, cfg.run.seed)
        self.batch_size = cfg.run.micro_batch_size

    @staticmethod
    def loss_tokens(batch) -> int:
        """Answer tokens of a batch: what its loss averages over (the trainer weights micro-batches by it)."""
        return int((batch[1] != IGNORE_INDEX).sum())

    def forward(self, forward, batch, device) -> tuple[ModelOutput, torch.Tensor]:
        inputs, targets, doc = (t.to(device) for t in batch)
        return forward(inputs, targets=targets, document_ids=doc), targets

    @torch.no_grad()
    def loss_per_language(self, out: ModelOutput, targets: torch.Tensor) -> dict[str, float]:
        token_loss = masked_token_loss(out.logits.detach(), targets).flatten()
        langs = self.loader.label_lang_ids().flatten().to(token_loss.device)
        keep = targets.flatten() != IGNORE_INDEX
        n = len(self.langs)
        sums = torch.zeros(n, device=token_loss.device).index_add_(0, langs[keep], token_loss[keep])
        counts = torch.bincount(langs[keep], minlength=n)
        return {lang: float(sums[i] / counts[i]) for i, lang in enumerate(self.langs) if counts[i]}

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        """Held-out loss on assistant tokens, per language and over all."""
        if self.valid is None:
            return {}
        rows = self.valid
        n = len(rows.langs)
        sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
        for i in range(0, rows.inputs.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            logits = model(rows.inputs[sl].to(device), document_ids=rows.document_ids[sl].to(device)).logits
            targets = rows.targets[sl].to(device)
            loss = masked_token_loss(logits, targets).flatten().double().cpu()
            keep = targets.flatten().cpu() != IGNORE_INDEX
            langs = rows.target_lang[sl].flatten()[keep]
            sums.index_add_(0, langs, loss[keep])
            counts += torch.bincount(langs, minlength=n)
        per_lang = {lang: {"loss": float(sums[j] / counts[j]), "tokens": int(counts[j])}
                    for j, lang in enumerate(rows.langs) if counts[j]}
        return {"per_language": per_lang, "loss": float(sums.sum() / counts.sum().clamp(min=1))}
