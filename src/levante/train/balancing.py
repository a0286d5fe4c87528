"""Aux-loss-free load balancing (DeepSeek-V3 §2.1.2), applied by the trainer from outside the model.

Each forward returns the routed tokens per expert of every MoE layer (`ModelOutput.expert_load`).
The balancer sums them over the micro-batches of an optimizer step (and, under data parallelism,
over ranks: `reduce` all-reduces them first, so every rank moves the bias identically), then moves
each router's bias by γ·sign(mean load − load) and centres it. Only the forwards the trainer sees
are counted, so activation recomputation cannot count a batch twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from levante.model.moe import moe_layers


class RouterBalancer:
    def __init__(self, model: nn.Module, speed: float):
        self.routers = [moe.gate for moe in moe_layers(model)]
        self.speed = speed
        self.load: torch.Tensor | None = None  # [n_moe_layers, E], this step so far

    def observe(self, expert_load: torch.Tensor | None) -> None:
        if expert_load is None:
            return
        load = expert_load.detach()
        self.load = load.clone() if self.load is None else self.load + load

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Sum this step's loads over ranks (in place), before `stats` and `step`."""
        if self.load is not None:
            all_reduce(self.load)

    def stats(self) -> dict[str, float]:
        """max/mean routed load per MoE layer this step (1.0 = perfectly even): worst and average."""
        if self.load is None:
            return {}
        used = self.load[self.load.sum(-1) > 0]
        if not len(used):
            return {}
        ratios = used.max(-1).values / used.mean(-1)
        return {"load_max_over_mean": float(ratios.max()), "load_max_over_mean_avg": float(ratios.mean())}

    @torch.no_grad()
    def step(self) -> None:
        """b_i += γ·sign(mean load − load_i), then centre b; resets the step's loads."""
        if self.load is not None and self.speed > 0:
            if self.load.shape[0] != len(self.routers):
                raise RuntimeError(f"expert loads of {self.load.shape[0]} layers for {len(self.routers)} routers")
            for router, load in zip(self.routers, self.load, strict=True):
                bias = router.e_score_correction_bias
                # no load at all: sign(0) = 0 leaves the bias as it is
                bias += self.speed * torch.sign(load.mean() - load).to(bias.dtype)
                bias -= bias.mean()
        self.discard()

    def discard(self) -> None:
        """Forget this step's loads (a skipped step moves no bias)."""
        self.load = None
