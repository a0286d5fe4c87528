"""CPU decoding, applied from outside the model: weight layouts the CPU kernels read fastest.

A decode step multiplies a few rows (one per running sequence) by every weight. Which kernel does
that best depends on the weight's layout in memory; bench_infer.py measures both choices made here.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


def column_major_linears(model: torch.nn.Module) -> None:
    """Store every linear weight [out, in] transposed in memory (same values, shape and Parameter).

    CPU BLAS streams a weight stored [in, out] 2-3x faster than one stored [out, in] for a one-row
    product once it is past the caches; F.linear picks the faster kernel by itself from the strides.
    """
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.is_contiguous():
            mod.weight.data = mod.weight.data.t().contiguous().t()  # .data: a tied weight stays tied


_PACKED: dict[int, torch.Tensor] = {}  # key -> a weight reordered into oneDNN's blocked layout


@torch.library.custom_op("levante::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    # An opaque op: torch.compile keeps the call and never sees the blocked (mkldnn) tensor.
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[key], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear:
    """`F.linear(x, weight)` for several rows at once through oneDNN, over a copy of the weight
    reordered once into its blocked layout; one row still goes through `F.linear`.

    For the output head of a batch-16 step ([16, 256] x [256, 8192] in `tiny`) this is ~2x faster
    than the BLAS call on the plain weight. The copy is made here: a weight changed later is not seen.
    """

    def __init__(self, weight: torch.Tensor, rows_hint: int):
        self.weight, self.out_features = weight, weight.shape[0]
        self.key = id(self)
        _PACKED[self.key] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        weakref.finalize(self, _PACKED.pop, self.key, None)

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # one row: the plain kernel is faster (and a compiled b1 graph is static)
            return F.linear(x, self.weight)
        return packed_linear(x, self.key, self.out_features)
