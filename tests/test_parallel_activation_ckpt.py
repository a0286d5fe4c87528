"""Activation checkpointing applied from outside: the same loss and gradients as without, parameter
names unchanged, and the wrapped parts really are recomputed in the backward."""

import copy

import pytest
import torch

from levante.config import ModelConfig
from levante.model.transformer import Transformer
from levante.parallel.fsdp import apply_activation_checkpointing, blocks


def tiny() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                      n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                      num_nextn_predict_layers=1, aux_loss_alpha=0.01, max_position_embeddings=64)
    return Transformer(cfg)


def calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_model_matches_the_plain_one(mode):
    from levante.model.kernels import _grouped_mm_works

    _grouped_mm_works.cache_clear()  # its first call (a probe) must not happen inside a recomputed region
    plain = tiny()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, mode)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    attn, ffn = calls(blocks(wrapped)[0].self_attn), calls(blocks(wrapped)[-1].mlp.gate)

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    out_wrapped, out_plain = wrapped(ids, labels=ids), plain(ids, labels=ids)
    out_plain.loss.backward()
    out_wrapped.loss.backward()
    assert torch.equal(out_plain.loss, out_wrapped.loss)
    assert torch.equal(out_plain.expert_load, out_wrapped.expert_load)  # loads of the first forward only
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    # forward + recomputation in the backward
    assert (attn[0], ffn[0]) == ((2, 2) if mode == "full" else (1, 2))


def test_eval_under_no_grad_runs_each_block_once():
    model = tiny()
    apply_activation_checkpointing(model, "full")
    counter = calls(blocks(model)[0].self_attn)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    assert counter[0] == 1
