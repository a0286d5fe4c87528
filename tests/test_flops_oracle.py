"""Oracle for the training FLOPs per token: torch's FlopCounterMode on a real forward + backward.

`levante.plan.flops_per_token` (behind `levante.train.metrics.model_flops_per_token` and MFU) splits
its count into a matmul part (6 x the weights one token multiplies by) and an attention part
(q.k^T and attn.v). Both are compared with what FlopCounterMode counts on a small MoE with a dense
first layer, shared experts, q_lora on and off, MTP on and off:

- matmul: the mm / addmm / bmm / baddbmm ops it counts (linear layers, router, the per-expert
  matmuls). It has no formula for grouped_mm, so the experts run their per-expert loop here.
  Per token the formula charges every MTP depth in full; depth k runs on T-k of the T positions,
  so the measured count is main x B*T + sum_k depth x B*(T-k).
- attention: the SDPA ops (torch registers formulas for the CUDA kernels; the CPU flash kernel is
  mapped here to torch's own sdpa_flop_count / sdpa_backward_flop_count). Conventions: neither side
  applies a causal discount (full T x T scores, as PaLM-style MFU counts them and as
  FlopCounterMode does), and the formula takes backward = 2 x forward, while FlopCounterMode also
  counts the flash backward's recomputation of q.k^T — so the formula equals 3 x the counted
  forward. MLA pads v to the q/k head dim for fused kernels; the formula counts the model's
  v_head_dim (padding is not model work), so the padded columns are taken off the kernel's count.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from levante import ModelConfig, Transformer
from levante.model import kernels
from levante.model.moe import Router
from levante.plan import flops_per_token
from levante.train.metrics import model_flops_per_token

aten = torch.ops.aten
MATMUL_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
SDPA_FORWARD = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
                aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu}
SDPA_BACKWARD = {aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention_backward,
                 aten._scaled_dot_product_cudnn_attention_backward,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward}
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
}

B, T = 2, 16


def config(q_lora_rank, depth, v_head_dim, tie=False) -> ModelConfig:
    return ModelConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=v_head_dim, first_k_dense_replace=1, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=2, n_group=3, topk_group=2, num_nextn_predict_layers=depth, tie_word_embeddings=tie,
        max_position_embeddings=64,
    ).validate()


CASES = {
    "q-plain, no MTP, v = qk dim, tied head": config(None, 0, 12, tie=True),
    "q-lora, MTP 2, padded v": config(16, 2, 8),
    "q-plain, MTP 1, padded v": config(None, 1, 8),
}


def measured(cfg: ModelConfig, monkeypatch) -> dict:
    """FLOPs of one forward + backward of B x T tokens, by op, plus the router's choices."""
    monkeypatch.setattr(kernels, "_grouped_mm_works", lambda *a: False)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    routed = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, args, out: routed.append(out[1]))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(ids, labels=ids).loss.backward()
    return {"ops": counter.get_flop_counts()["Global"], "routed": routed}


def per_token(cfg: ModelConfig, seq_len: int, part: str) -> tuple[float, float]:
    """(main model, one MTP depth) of the formula's `part`, per token at `seq_len`."""
    main = flops_per_token(cfg, seq_len, include_mtp=False)[part]
    depth = cfg.num_nextn_predict_layers
    mtp = (flops_per_token(cfg, seq_len)[part] - main) / depth if depth else 0.0
    return main, mtp


@pytest.mark.parametrize("name", list(CASES))
def test_flops_formula_matches_flop_counter(name, monkeypatch):
    cfg = CASES[name]
    got = measured(cfg, monkeypatch)
    ops = got["ops"]
    depths = range(1, cfg.num_nextn_predict_layers + 1)

    # The formula assumes exactly top_k distinct experts per token; routing gives that.
    assert len(got["routed"]) == cfg.num_hidden_layers - cfg.first_k_dense_replace + len(depths)
    for ids in got["routed"]:
        assert ids.shape[1] == cfg.num_experts_per_tok
        assert all(len(set(row)) == cfg.num_experts_per_tok for row in ids.tolist())

    unknown = set(ops) - MATMUL_OPS - SDPA_FORWARD - SDPA_BACKWARD
    assert not unknown, f"FlopCounterMode counted ops this test does not sort: {unknown}"

    main, mtp = per_token(cfg, T, "matmul")
    want = main * B * T + sum(mtp * B * (T - k) for k in depths)
    assert sum(ops.get(op, 0) for op in MATMUL_OPS) == want

    # Attention. The kernel also multiplies the zero columns MLA pads v with (to the q/k head
    # dim, for fused kernels): 2*S*S*(qk - v) per head and sequence in the forward; not model work.
    main_attn = per_token(cfg, T, "attention")[0] * B * T
    mtp_attn = sum(per_token(cfg, T - k, "attention")[1] * B * (T - k) for k in depths)
    pad = max(cfg.qk_head_dim - cfg.v_head_dim, 0)
    lengths = [T] * cfg.num_hidden_layers + [T - k for k in depths]
    padding = sum(2 * B * cfg.num_attention_heads * s * s * pad for s in lengths)
    forward = sum(ops.get(op, 0) for op in SDPA_FORWARD)
    backward = sum(ops.get(op, 0) for op in SDPA_BACKWARD)
    assert forward > 0, "no SDPA kernel was counted (did attention fall back to the math path?)"
    assert 3 * (forward - padding) == main_attn + mtp_attn
    assert backward > 2 * forward  # the flash backward recomputes q.k^T; the formula does not count it

    # The trainer's MFU uses the same total.
    assert model_flops_per_token(cfg, T) == flops_per_token(cfg, T)["total"]
