"""The DeepSeek-V3 decoder: embeddings, MLA + MoE blocks, final norm, LM head, optional MTP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.model.attention import LatentCache
from levante.model.block import Block
from levante.model.moe import GroupedExperts, Router
from levante.model.mtp import MTPModule
from levante.model.norm import RMSNorm
from levante.model.rope import rope_cos_sin, rope_frequencies

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss + aux_loss: what training minimises
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    # Routed tokens per expert of every MoE layer, main layers then MTP blocks: [n_moe_layers, E]
    # (float32, not differentiable). What aux-loss-free balancing steers by; None for a dense model.
    expert_load: torch.Tensor | None = None


def _collect(value, into: list) -> None:
    if value is not None:
        into.append(value)


def _stack(loads: list) -> torch.Tensor | None:
    return torch.stack(loads) if loads else None


def document_layout(document_ids: torch.Tensor):
    """Packed documents [B, T] -> (rope positions [B, T] restarting at each document, block-diagonal causal
    attention mask [B, 1, T, T] (True = may attend), document run index [B, T]). A document is a
    maximal run of equal ids, so ids may repeat in different places of a row."""
    b, t = document_ids.shape
    idx = torch.arange(t, device=document_ids.device).expand(b, t)
    first = torch.ones(b, 1, dtype=torch.bool, device=document_ids.device)
    is_start = torch.cat((first, document_ids[:, 1:] != document_ids[:, :-1]), dim=1)
    runs = is_start.cumsum(1)
    positions = idx - torch.where(is_start, idx, 0).cummax(1).values
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    mask = (runs[:, :, None] == runs[:, None, :]) & causal
    return positions, mask[:, None], runs


class DecodeCache:
    """Latent caches of every layer plus the number of positions already filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        self.layers = [LatentCache(batch, max_len, cfg, device, dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, k + 1) for k in range(config.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, std=std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        inv_freq, _ = rope_frequencies(self.config)
        self.inv_freq.copy_(inv_freq)

    def new_cache(self, batch: int, max_len: int) -> DecodeCache:
        p = self.embed_tokens.weight
        return DecodeCache(self.config, batch, max_len, p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, cache: DecodeCache | None = None,
                document_ids: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab].

        `labels` follow the transformers convention (aligned with input_ids, shifted inside);
        `targets` are already shifted (targets[:, t] is the token after input_ids[:, t]), as the
        trainer feeds them. Either gives `.loss`; -100 marks positions to ignore.
        `document_ids` [B, T] (packed training sequences): each run of equal ids is one document that
        attends only to itself, with rope positions restarting at 0; no cache.
        """
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        t = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        mask, runs = None, None
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids are for training/prefill without a cache")
            positions, mask, runs = document_layout(document_ids)
        else:
            positions = torch.arange(start, start + t, device=input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_attention_factor, positions)

        h = self.embed_tokens(input_ids)
        aux_losses, loads = [], []
        for i, layer in enumerate(self.layers):
            h, aux, load = layer(h, cos, sin, cache.layers[i] if cache is not None else None, start, mask)
            _collect(aux, aux_losses)
            _collect(load, loads)
        if cache is not None:
            cache.length += t
        h = self.norm(h)
        logits = self.lm_head(h)
        if targets is None:
            return ModelOutput(logits=logits, expert_load=_stack(loads))

        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss = lm_loss
        mtp_loss = (self._mtp_loss(h, input_ids, targets, cos, sin, aux_losses, loads, mask, runs)
                    if len(self.mtp) else None)
        if mtp_loss is not None:
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        if aux_loss is not None:
            loss = loss + aux_loss
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux_loss,
                           expert_load=_stack(loads))

    def _mtp_loss(self, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, cos, sin,
                  aux_losses: list, loads: list, mask=None, runs=None):
        """Mean over depths k of CE(predict token i+k+1 from position i); the sequence shrinks by k.
        With packed documents (`runs`), position i only predicts tokens of its own document."""
        t = targets.shape[1]
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            n = t - k
            if n <= 0:
                break
            # Token i+k from the inputs, not the targets: it is a real token even where its own
            # target is ignored (an SFT prompt), and the prediction of token i+k+1 depends on it.
            next_tokens = input_ids[:, k : k + n]
            tgt = targets[:, k : k + n]
            if runs is None:
                h, aux, load = module(h[:, :n], self.embed_tokens(next_tokens), cos[:n], sin[:n])
            else:
                h, aux, load = module(h[:, :n], self.embed_tokens(next_tokens), cos[:, :n], sin[:, :n],
                                      mask[..., :n, :n])
                # targets[:, i + k] belongs to position i + k's document; the packer already ignores
                # the target past a document's last token.
                tgt = tgt.masked_fill(runs[:, :n] != runs[:, k : k + n], IGNORE_INDEX)
            _collect(aux, aux_losses)
            _collect(load, loads)
            logits = self.lm_head(module.norm(h))
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(),
                                          ignore_index=IGNORE_INDEX))
        return torch.stack(losses).mean() if losses else None

    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """Exact parameter count; `active` counts only the routed experts one token uses."""
        total = 0
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen or (not include_mtp and name.startswith("mtp.")):
                continue
            seen.add(id(p))
            n = p.numel()
            if active and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                n = n // self.config.n_routed_experts * self.config.num_experts_per_tok
            total += n
        return total
