"""Under bf16 autocast (the GPU training path, exercised here with CPU autocast): routing stays fp32,
and the routed experts' grouped matmul runs in the autocast dtype on either dispatch path."""

from __future__ import annotations

import torch

from levante.config import ModelConfig
from levante.model import kernels
from levante.model.moe import MoE


def _moe() -> MoE:
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe


def test_router_scores_stay_fp32_under_autocast():
    moe = _moe()
    x = torch.randn(64, moe.gate.weight.shape[1])
    weights, ids, scores = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_ac, ids_ac, scores_ac = moe.gate(x)
    assert scores_ac.dtype == torch.float32
    assert torch.equal(scores_ac, scores) and torch.equal(ids_ac, ids) and torch.equal(weights_ac, weights)


def test_grouped_experts_run_in_the_autocast_dtype(monkeypatch):
    moe = _moe()
    e, _, h = moe.experts.gate_up_proj.shape  # [E, 2I, H]
    counts = torch.tensor([5, 0, 7] + [1] * (e - 3))
    x = torch.randn(int(counts.sum()), h)
    reference = moe.experts(x, counts)  # fp32
    outs = {}
    for grouped in (True, False):
        monkeypatch.setattr(kernels, "_grouped_mm_works", lambda device, dtype, g=grouped: g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[grouped] = moe.experts(x, counts)
        assert outs[grouped].dtype == torch.bfloat16
        err = (outs[grouped].float() - reference).abs().max() / reference.abs().max()
        assert err < 2e-2, f"grouped={grouped}: bf16 experts differ from fp32 by {err:.3g}"
    assert torch.allclose(outs[True].float(), outs[False].float(), rtol=2e-2, atol=2e-2 * reference.abs().max().item())
