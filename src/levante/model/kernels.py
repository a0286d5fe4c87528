"""Grouped matmul for routed experts: `grouped_mm` where this build has it, a per-expert loop otherwise."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None when it is off."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """A context that keeps autocast away (routing must stay fp32 under bf16 autocast)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this build has a grouped-matmul kernel (forward and backward) for device and dtype."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    # Deterministic inputs: the probe must not consume the global RNG (exact resume relies on it).
    x = torch.ones(16, 16, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
    try:
        with torch.enable_grad():  # the first call may come from an eval under no_grad
            y = fn(x, w, offs=offs)
            y.backward(torch.ones_like(y))  # a dense gradient, as the model produces
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ weight[e].T, rows sorted by expert.

    `weight` is [E, out, in]; `counts` holds the number of rows of each expert. Under torch.compile
    this runs eagerly (data-dependent group sizes; the fake kernel also wants bf16).
    """
    if torch.compiler.is_compiling():
        return _eager_grouped_linear()(x, weight, counts)
    return _grouped_linear(x, weight, counts)


@functools.cache
def _eager_grouped_linear():
    # Made on first use under compile: torch.compiler.disable imports torch._dynamo, which plain
    # `import levante.model` should not pay for.
    return torch.compiler.disable(_grouped_linear)


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA's grouped_mm wants 16-byte-aligned rows (in and out widths a multiple of 8 in bf16); token
    groups need no padding in bf16, and offsets stay on the device (no host sync)."""
    per = 16 // x.element_size()
    return x.device.type != "cuda" or (weight.shape[1] % per == 0 and weight.shape[2] % per == 0)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:  # autocast does not see this op: cast as it would for a linear (bf16 grouped_mm)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.device.type == "cpu" and not torch.is_grad_enabled() and 0 < x.shape[0] < weight.shape[0]:
        # Decoding: fewer rows than experts, so most experts are empty. CPU grouped_mm still runs a
        # matmul per expert; here only the experts with rows run (same products, bitwise equal).
        chunks = x.split(counts.tolist())
        return torch.cat([c @ w.T for w, c in zip(weight.unbind(0), chunks, strict=True) if len(c)], dim=0)
    if _grouped_mm_works(x.device.type, x.dtype) and weight.dtype == x.dtype and _aligned(x, weight):
        fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
        offs = counts.cumsum(0).to(torch.int32)
        return fn(x, weight.transpose(1, 2), offs=offs)
    # Fallback: one matmul per expert over its contiguous slice.
    # unbind, not weight[e]: its backward stacks the per-expert grads instead of filling E full-size zeros.
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w.T for w, chunk in zip(weight.unbind(0), chunks, strict=True)], dim=0)
