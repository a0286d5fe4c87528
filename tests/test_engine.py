"""Sampling and cached generation."""

import pytest
import torch

from levante import ModelConfig, Transformer
from levante.errors import LevanteError
from levante.infer.engine import SamplingParams, generate_ids, sample_next


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0), g), best)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g), best)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-6), g), best)


def test_top_k_and_top_p_never_sample_outside_their_set():
    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0, -3.0, -4.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, SamplingParams(temperature=2.0, top_k=3), g)
    assert set(ids.tolist()) == {0, 1, 2}
    # probabilities ~0.665, 0.245, 0.09, ...: a nucleus of 0.8 keeps exactly tokens 0 and 1
    ids = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(ids.tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    n_routed_experts=4, moe_intermediate_size=16, intermediate_size=32))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    a = list(generate_ids(model, [0, 5, 9], params))
    b = list(generate_ids(model, [0, 5, 9], params))
    assert a == b and len(a) == 12
    # greedy generation through the cache equals repeated full forwards
    greedy = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    ids = [0, 5, 9]
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(generate_ids(model, [0, 5, 9], greedy)) == ids[3:]


def test_bad_sampling_requests_are_refused():
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    n_routed_experts=0, first_k_dense_replace=1, max_position_embeddings=16))
    with pytest.raises(LevanteError, match="max_position_embeddings"):
        list(generate_ids(model, [1] * 10, SamplingParams(max_new_tokens=10)))
    with pytest.raises(LevanteError, match="top_p"):
        list(generate_ids(model, [1], SamplingParams(top_p=0.0)))
    with pytest.raises(LevanteError, match="empty"):
        list(generate_ids(model, [], SamplingParams()))
