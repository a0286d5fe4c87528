"""Optimizers: AdamW, and Muon (Newton–Schulz orthogonalised momentum) for hidden matrices.

`build_optimizer` routes parameters by name and shape:

* "adamw": two AdamW groups, decay for every >=2-D weight (embeddings and head included), none for
  norms and other 1-D tensors.
* "muon": one `Muon` optimizer (one state_dict, one set of param groups for LR schedulers) whose
  groups have `kind` "muon" (every >=2-D parameter except the embedding and the LM head: attention
  and MLP matrices, the router, and 3-D stacked experts) or "adamw" (embedding, head, norms, 1-D).

Every group carries `base_lr` (the configured peak rate) and `kind`; `schedule.apply_lr` sets
`lr = base_lr * multiplier`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.optim.adamw import adamw

from levante.config import OptimConfig
from levante.errors import LevanteError
from levante.parallel.muon import orthogonalize_sharded

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon): p(s) = a·s + b·s³ + c·s⁵ applied to the
# singular values. The large slope at 0 (a) lifts small singular values quickly; the iteration does
# not converge to exactly 1 but into a band around it (~0.7–1.2), which trains just as well and needs
# only ~5 steps.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training"): scale the orthogonalised update by
# 0.2·sqrt(max(rows, cols)) so its RMS matches a typical AdamW update (~0.2). An orthogonal m×n matrix
# has RMS 1/sqrt(max(m, n)), so the product has RMS 0.2 whatever the shape, and Muon groups can share
# AdamW's learning rate and weight decay.
_MOONLIGHT_RMS = 0.2


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where CPU bf16 matmuls run on AMX or AVX512-BF16 units (several times fp32 speed)."""
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init_amx is not None:
        try:
            if init_amx():
                return True
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def ns_compute_dtype(device: torch.device, ns_dtype: str = "auto") -> torch.dtype:
    """optim.muon_ns_dtype -> the dtype Newton–Schulz runs in. "auto": bf16 where matmuls are fast in it
    (CUDA; CPUs with AMX / AVX512-BF16), as in the reference Muon (the iteration is robust to bf16);
    fp32 elsewhere. "float32" makes runs comparable to float rounding (e.g. N ranks against 1)."""
    if ns_dtype == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    if ns_dtype not in NS_DTYPES:
        raise LevanteError(f"optimizer: muon_ns_dtype must be 'auto', 'bfloat16' or 'float32', got {ns_dtype!r}")
    return NS_DTYPES[ns_dtype]


def orthogonalize(g: torch.Tensor, steps: int, ns_dtype: str = "auto") -> torch.Tensor:
    """Approximate U·Vᵀ of g = U·S·Vᵀ for the last two dims (batched over any leading dims), computed in
    `ns_compute_dtype(g.device, ns_dtype)`. Returns a tensor in that dtype; the caller casts."""
    a, b, c = _NS_COEFFS
    x = g.to(ns_compute_dtype(g.device, ns_dtype))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation so the Gram matrix x·xᵀ is the smaller one
        x = x.mT
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1 (inside the
    # iteration's basin of convergence). Per matrix, so each expert is normalised on its own.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for groups with kind "muon", AdamW for groups with kind "adamw", in one optimizer.

    Group keys: lr, base_lr, kind, weight_decay (decoupled, both kinds), momentum and ns_steps (muon),
    betas and eps (adamw). Muon params must be 2-D or 3-D; a 3-D param is a stack of matrices
    (experts) and each is orthogonalised separately.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_dtype: str = "auto"):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise LevanteError(f"optimizer: lr, eps and weight_decay must be >= 0 (lr={lr}, eps={eps}, "
                               f"weight_decay={weight_decay})")
        if not 0 <= momentum < 1:
            raise LevanteError(f"optimizer: muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise LevanteError(f"optimizer: muon ns_steps must be >= 1, got {ns_steps}")
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise LevanteError(f"optimizer: betas must be two values in [0, 1), got {tuple(betas)}")
        ns_compute_dtype(torch.device("cpu"), ns_dtype)  # rejects an unknown name now, not at the first step
        # Kept on the optimizer, not in its param groups: a resumed run follows its config, not the checkpoint.
        self.ns_dtype = ns_dtype
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, kind="muon")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kind"] not in ("muon", "adamw"):
            raise LevanteError(f"optimizer: group kind must be 'muon' or 'adamw', got {group['kind']!r}")
        if group["kind"] == "muon":
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise LevanteError(f"optimizer: Muon handles 2-D and 3-D parameters, got shape "
                                       f"{tuple(p.shape)}")
        group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # A param without grad is frozen this step (e.g. an expert no token reached): no update.
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise LevanteError("optimizer: sparse gradients are not supported")
            if group["kind"] == "muon":
                for p in params:
                    self._muon_update(p, group)
            elif params:
                self._adamw_update(params, group)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        grad = p.grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.mul_(mu).add_(grad)
        update = grad.add(buf, alpha=mu)  # Nesterov: look ahead along the momentum
        steps = group["ns_steps"]
        ortho = orthogonalize_sharded(update, lambda m: orthogonalize(m, steps, self.ns_dtype).to(p.dtype))
        scale = _MOONLIGHT_RMS * math.sqrt(max(p.size(-2), p.size(-1)))
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-lr * scale)

    def _adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's own AdamW kernels (foreach on CUDA, the single-tensor path on CPU, as
        torch.optim.AdamW picks them), with torch's state layout: bit-exact with torch.optim.AdamW."""
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], foreach=None, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def uses_muon(name: str, p: torch.Tensor) -> bool:
    """Hidden matrices (incl. router and 3-D experts) go to Muon; embedding and head stay on AdamW:
    their rows are looked up / scored one token at a time, not used as a linear map on the
    residual stream, so orthogonalising them has no justification (Muon paper, Moonlight)."""
    return p.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer for `model` as configured; only parameters with requires_grad are included."""
    if cfg.name not in ("muon", "adamw"):
        raise LevanteError(f"optim.name must be 'muon' or 'adamw', got '{cfg.name}'")
    if len(cfg.betas) != 2:
        raise LevanteError("optim.betas must have two values")
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LevanteError("optimizer: the model has no trainable parameters")
    matrices = [p for n, p in named if cfg.name == "muon" and uses_muon(n, p)]
    matrix_ids = {id(p) for p in matrices}
    decay = [p for _, p in named if p.ndim >= 2 and id(p) not in matrix_ids]
    no_decay = [p for _, p in named if p.ndim < 2]
    adamw_groups = [
        dict(params=decay, kind="adamw", lr=cfg.lr, base_lr=cfg.lr, weight_decay=cfg.weight_decay),
        dict(params=no_decay, kind="adamw", lr=cfg.lr, base_lr=cfg.lr, weight_decay=0.0),
    ]
    if cfg.name == "adamw":
        groups = [g for g in adamw_groups if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    muon_group = dict(params=matrices, kind="muon", lr=cfg.muon_lr, base_lr=cfg.muon_lr,
                      weight_decay=cfg.weight_decay)
    groups = [g for g in [muon_group, *adamw_groups] if g["params"]]
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                betas=betas, eps=cfg.eps, ns_dtype=cfg.muon_ns_dtype)


def grad_norm_tensor(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global gradient norm as a 0-d tensor (no host sync); reduced over ranks under FSDP2."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(total, "full_tensor"):  # DTensor under FSDP2
        total = total.full_tensor()
    return total


def sharded_grad_norm(params: Iterable[torch.Tensor], all_reduce) -> torch.Tensor:
    """The global gradient norm when parameters live on different meshes (expert parallelism: experts
    sharded over "dp", the rest over every rank): every rank's local shards are disjoint pieces of the
    model, so the squared norm is the all-reduced sum of the local squares."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
    squares = torch.stack([g.float().pow(2).sum() for g in local]).sum()
    return all_reduce(squares).sqrt()


def clip_grads_(params: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients so their global norm is at most `max_norm` (0 disables), given that norm."""
    if max_norm <= 0:
        return
    params = [p for p in params if p.grad is not None]
    meshes = {id(p.grad.device_mesh) for p in params if hasattr(p.grad, "device_mesh")}
    if len(meshes) <= 1:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
        return
    # Gradients on several meshes (expert parallelism): torch's formula, applied to the local shards.
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).mul_(coef)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0 disables clipping) and return the norm before."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm_tensor(params)
    clip_grads_(params, max_norm, total)
    return float(total)
