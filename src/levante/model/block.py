"""A pre-norm decoder block: MLA attention, then a dense SwiGLU MLP or a DeepSeekMoE layer."""

from __future__ import annotations

import torch
from torch import nn

from levante.config import ModelConfig
from levante.model.attention import MLA, LatentCache, RowSlots
from levante.model.moe import MLP, MoE
from levante.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos, sin, cache: LatentCache | None = None,
                start: int | RowSlots = 0, attn_mask: torch.Tensor | None = None):
        """-> (hidden states, aux loss or None, routed tokens per expert or None for a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, attn_mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux, load = self.mlp(h)
        else:
            out, aux, load = self.mlp(h), None, None
        return x + out, aux, load
