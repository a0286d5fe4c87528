"""Expert parallelism from outside the model: the routed experts of every MoE layer are split over the
mesh's "ep" dimension, and each layer's dispatched tokens travel to their experts' rank and back with
`all_to_all_single` (differentiable here; gloo and NCCL both have it).

Expert parallelism is carved out of data parallelism: every rank still routes its own slice of the
batch (router, shared experts and expert loads are computed locally, as without EP); only the
routed-expert matmuls run where their weights live. Rank j of an ep group keeps experts
[j*E/ep, (j+1)*E/ep) (sliced from the identically initialised full stacks, so the model equals the
single-process one) and FSDP shards those over the "dp" ranks that hold the same experts (fsdp.py);
each expert's gradient sums the tokens of ep ranks, so it is divided by ep (`local_forward`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from levante.model.kernels import grouped_linear
from levante.model.moe import GroupedExperts
from levante.parallel.mesh import Dist


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ExpertParallelForward:
    """Replaces `GroupedExperts.forward(x_sorted, counts)`: rows sorted by global expert id in, the
    experts' outputs in the same order out."""

    def __init__(self, experts: GroupedExperts, ep: int, group):
        self.experts, self.ep, self.group = experts, ep, group

    def local_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """GroupedExperts.forward on this rank's experts, their weight gradients divided by ep: each
        sums the tokens of ep ranks, and FSDP averages over the dp ranks only, so this makes the
        mean over every rank's batch (gloo has no pre-multiplied reduce-scatter to do it there)."""
        e = self.experts
        gate_up, down = _ScaleGrad.apply(e.gate_up_proj, 1 / self.ep), _ScaleGrad.apply(e.down_proj, 1 / self.ep)
        gate, up = grouped_linear(x, gate_up, counts).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, down, counts)

    def __call__(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep, counts.numel() // self.ep
        # How many rows every rank sends to every rank, per local expert: [ep (source), local].
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv_counts = recv_counts.view(ep, local)
        in_splits = counts.view(ep, local).sum(1).tolist()  # the host sync EP needs for its buffers
        out_splits = recv_counts.sum(1).tolist()
        x_recv = all_to_all(x_sorted, out_splits, in_splits, self.group)
        # Received rows come grouped by source rank, then expert: regroup them by expert.
        expert_of = torch.arange(local, device=counts.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        order = expert_of.argsort(stable=True)
        y_local = self.local_forward(x_recv[order], recv_counts.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)
        return all_to_all(y_recv, in_splits, out_splits, self.group)


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, dist_ctx: Dist) -> None:
    """Keep this rank's share of every expert stack and route tokens to the owners."""
    ep_mesh = dist_ctx.mesh["ep"]
    j, ep, group = ep_mesh.get_local_rank(), dist_ctx.ep, ep_mesh.get_group()
    for experts in expert_modules(model):
        n = experts.gate_up_proj.shape[0]
        if n % ep:
            raise ValueError(f"{n} experts cannot be split over ep = {ep} ranks")
        per = n // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full[j * per:(j + 1) * per].clone(),
                                                requires_grad=full.requires_grad))
        experts.forward = ExpertParallelForward(experts, ep, group)
