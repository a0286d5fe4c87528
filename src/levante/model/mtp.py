"""Multi-token prediction module (DeepSeek-V3 §2.2).

Depth k combines the previous depth's hidden state at position i with the embedding of token
i+k, runs one decoder block, and predicts token i+k+1 through the shared output head:
    h'_i = W_eh [enorm(Emb(t_{i+k})); hnorm(h_i)],   h_i^k = Block(h'),   logits = head(norm(h_i^k)).
The embedding and head are the main model's (shared); the main model's final-normed hidden states
feed depth 1, as in DeepSeek's MTP checkpoints served by vLLM.
"""

from __future__ import annotations

import torch
from torch import nn

from levante.config import ModelConfig
from levante.model.block import Block
from levante.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        # Numbered after the main layers, so it is a MoE block whenever the model is MoE.
        self.block = Block(cfg, cfg.num_hidden_layers + depth - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, attn_mask=None):
        h = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))
        return self.block(h, cos, sin, attn_mask=attn_mask)  # (h, aux, load) as a block returns
