"""DeepSeekMoE with aux-loss-free load balancing (DeepSeek-V3 §2.1.2).

Each token is routed to `num_experts_per_tok` of `n_routed_experts` fine-grained SwiGLU experts
(sigmoid affinities; a per-expert bias steers *selection* only) and always passes through the
shared experts. Dispatch sorts token copies by expert and runs one grouped matmul per projection,
so compute is proportional to the tokens each expert actually receives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.model.kernels import autocast_off, grouped_linear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid top-k router with group-limited selection and a balancing bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # Persistent so checkpoints and HF exports carry it; it is not a parameter: the
        # balancing rule moves it, not the gradient.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts), persistent=True)

    def forward(self, x: torch.Tensor):
        """x [N, H] -> (weights [N, k], expert ids [N, k], scores [N, E]); routing runs in fp32."""
        with autocast_off(x.device.type):  # autocast would run this linear in bf16
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            # Keep the best `topk_group` groups, each scored by the sum of its two best experts.
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.n_experts)
        ids = biased.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores


class GroupedExperts(nn.Module):
    """All routed experts in stacked tensors: gate and up fused as [E, 2I, H], down as [E, H, I]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_linear(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, counts)

    def per_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{ids[n, j]}(x[n]), each token against its own experts' gathered
        weights: no sort and no data-dependent shapes, so a compiled decode step stays one graph. It
        copies k expert matrices per token, so it only pays for a few tokens (see MoE.forward)."""
        gate, up = torch.einsum("nh,nkih->nki", x, self.gate_up_proj[ids]).chunk(2, dim=-1)
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down_proj[ids])
        return (y * weights[..., None].to(y.dtype)).sum(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """-> (output, sequence-wise aux loss or None, routed tokens per expert [E], float32).

        The counts are returned, not accumulated here: the trainer sums them over a step and moves the
        router bias (aux-loss-free balancing), so a recomputed forward cannot count twice.
        """
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, ids, scores = self.gate(flat)
        flat_ids = ids.flatten()
        if self._per_token(flat.shape[0]):
            counts = F.one_hot(flat_ids, self.n_experts).sum(0)  # bincount's length would be data-dependent
            out = self.experts.per_token(flat, ids, weights).to(flat.dtype)
        else:
            counts = torch.bincount(flat_ids, minlength=self.n_experts)
            # Dispatch: sort the N*k (token, expert) pairs by expert so each expert's rows are contiguous.
            order = flat_ids.argsort(stable=True)
            token_of = order // self.top_k
            y_sorted = self.experts(flat[token_of], counts)
            y_sorted = y_sorted * weights.flatten()[order, None].to(y_sorted.dtype)
            out = torch.zeros_like(flat).index_add_(0, token_of, y_sorted.to(flat.dtype))

        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        aux = None
        if self.training and self.aux_loss_alpha > 0:
            aux = self._sequence_balance_loss(scores.view(b, t, -1), ids.view(b, t * self.top_k))
        return out.view(b, t, d), aux, counts.detach().float()

    def _per_token(self, n_tokens: int) -> bool:
        """A compiled inference step over a few tokens (decoding) computes each token against its own
        experts: the sorted dispatch's data-dependent group sizes would break the graph. Bounded so the
        gathered copies stay within twice the layer's expert weights; never with expert parallelism,
        whose rank holds only some experts."""
        return (torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and n_tokens * self.top_k <= 2 * self.n_experts
                and self.experts.gate_up_proj.shape[0] == self.n_experts)

    def _sequence_balance_loss(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence (DeepSeek-V3 eq. 17-20), averaged over sequences.

        f_i counts the routed top-k (bias-corrected, group-limited: the load experts really get), as DeepSeek's
        HF MoEGate feeds its routed topk_idx to seq_aux (eq. 18 writes a plain Topk(s), without the bias)."""
        b, t, e = scores.shape
        probs = scores / scores.sum(-1, keepdim=True)
        p = probs.mean(1)  # [B, E]
        hits = torch.zeros(b, e, device=scores.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
        f = hits * (e / (self.top_k * t))
        return self.aux_loss_alpha * (f * p).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
