"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values come from a small latent c_kv = RMSNorm(W_dkv x) shared by all heads, plus one
decoupled rope key shared by all heads. Training and prefill expand the latent into per-head keys
and values. Decoding keeps only (c_kv, k_rope) per token in the cache and absorbs the key
up-projection into the query and the value up-projection into the output, so attention runs
directly against the latent (an MQA over kv_lora_rank + rope dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.model.norm import RMSNorm
from levante.model.rope import apply_rope, softmax_scale


@dataclass
class RowSlots:
    """Where a batch sits in a shared cache when its rows are at different positions (continuous
    batching): batch row b uses cache row `rows[b]`, its tokens sit at `positions[b]` [B, T], and
    keys 0..kv_len-1 are read (kv_len > every position). A query sees the keys at positions up to
    its own, so whatever a slot's previous occupant left further along is never read."""

    rows: torch.Tensor
    positions: torch.Tensor
    kv_len: int
    # rows are 0..B-1 in order (the batching engine keeps its running rows packed at the front), so
    # attention reads the cache in place instead of gathering a copy of every row each step
    leading: bool = False


class LatentCache:
    """Per-layer decode cache: the normalised kv latent and the rotated rope key of each token, side by
    side in one tensor [B, S, kv_lora_rank + rope], so the keys are all of it and the values its first
    kv_lora_rank columns: both are views, nothing is concatenated per step."""

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, device, dtype):
        self.kv = torch.zeros(batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device, dtype=dtype)

    def write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        end = start + c_kv.shape[1]
        if end > self.kv.shape[1]:
            raise ValueError(f"cache holds {self.kv.shape[1]} positions, asked to write up to {end}")
        self.kv[:, start:end] = torch.cat((c_kv, k_rope), dim=-1)
        return self.kv[:, :end]

    def write_rows(self, slots: RowSlots, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        self.kv[slots.rows[:, None], slots.positions] = torch.cat((c_kv, k_rope), dim=-1)
        if slots.leading:
            return self.kv[: c_kv.shape[0], : slots.kv_len]
        return self.kv[slots.rows, : slots.kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst`."""
        self.kv[dst, :length] = self.kv[src, :length]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.scale = softmax_scale(cfg)

    def _queries(self, x: torch.Tensor, cos, sin):
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x: torch.Tensor, cos, sin):
        b, t, _ = x.shape
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.view(b, t, 1, self.rope_dim), cos, sin).view(b, t, self.rope_dim)
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start: int | RowSlots = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` (bool [B, 1, T, T], True = may attend) replaces the plain causal mask, e.g. to keep
        packed documents apart; training/prefill only. `start` is the cache offset, or per-row
        `RowSlots` for continuous batching."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_kv, k_rope = self._latent(x, cos, sin)
        if cache is None:
            out = self._expanded(q_nope, q_rope, c_kv, k_rope, attn_mask)
        elif isinstance(start, RowSlots):
            out = self._absorbed(q_nope, q_rope, cache.write_rows(start, c_kv, k_rope), start.positions)
        else:
            out = self._absorbed(q_nope, q_rope, cache.write(start, c_kv, k_rope), start)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, attn_mask=None):
        """Causal attention with per-head keys/values decompressed from the latent (training, prefill)."""
        b, t, h, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None, :].expand(b, t, h, self.rope_dim)), dim=-1)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:  # fused (flash) SDPA kernels want one head dim for q, k and v: pad v, slice after
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            is_causal=attn_mask is None, scale=self.scale
        )
        return out.transpose(1, 2)[..., : self.v_dim]  # [B, T, H, v_dim]

    def _absorbed(self, q_nope, q_rope, kv, start: int | torch.Tensor):
        """Attention straight against the cached latent (`kv` = [c_kv, k_rope] per position, as
        LatentCache holds it): W_uk folds into q, W_uv into the output."""
        b, t, h, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(h, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # [B, H, T, kv_rank + rope]
        mask = None
        if isinstance(start, torch.Tensor):  # per-row positions [B, T]: row b's query i sees keys <= its position
            mask = (torch.arange(kv.shape[1], device=q.device)[None, None, :] <= start[:, :, None])[:, None]
        elif t > 1:  # query i sits at position start + i and sees keys 0..start + i
            q_pos = torch.arange(start, start + t, device=q.device)[:, None]
            mask = torch.arange(kv.shape[1], device=q.device)[None, :] <= q_pos
        # One shared key head (an MQA over the latent): the query heads fold into the query rows,
        # [B, H*T, .] against the keys [B, S, .]; the values are the latent part of the same cache.
        q, v = q.reshape(b, h * t, -1), kv[..., : self.kv_rank]
        if mask is not None:
            mask = mask.expand(b, 1, t, -1) if mask.dim() == 4 else mask[None, None]
            mask = mask.expand(b, h, t, mask.shape[-1]).reshape(b, h * t, -1)
        if t == 1:
            # Decoding: two matmuls read the cache in place. SDPA's CPU paths copy the keys every step
            # (enable_gqa expands them to every head, inductor's decomposition transposes them).
            scores = torch.matmul(q, kv.transpose(1, 2)) * self.scale  # [B, H, S]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.float().softmax(-1).to(kv.dtype), v)
        else:  # prefill, verification: fused kernels, no [H*T, S] score matrix held in memory
            out = F.scaled_dot_product_attention(q[:, None], kv[:, None], v[:, None], scale=self.scale,
                                                 attn_mask=None if mask is None else mask[:, None])[:, 0]
        return torch.einsum("bhtc,hvc->bthv", out.view(b, h, t, -1), w_uv)
