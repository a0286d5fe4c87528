"""Model behaviour that the oracle comparison does not cover: training signals, balancing, caching."""

import dataclasses

import pytest
import torch

import levante
from levante import ConfigError, ModelConfig, Transformer
from levante.model import kernels
from levante.model import moe as moe_mod
from levante.model.moe import moe_layers
from levante.train.balancing import RouterBalancer


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                first_k_dense_replace=1, max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base).validate()


def test_public_api_returns_logits_and_hf_style_loss():
    torch.manual_seed(0)
    model = levante.Transformer(small_config())
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 128) and out.loss is None
    with_labels = model(ids, labels=ids)
    # labels are shifted inside (transformers convention): same as pre-shifted targets
    manual = torch.nn.functional.cross_entropy(with_labels.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(with_labels.lm_loss, manual, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = small_config(q_lora_rank=8, n_shared_experts=1, num_nextn_predict_layers=1, aux_loss_alpha=0.01,
                       n_group=2, topk_group=1)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 128, (4, 32))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    cfg = small_config(q_lora_rank=8, rope_scaling={"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 8,
                                                    "mscale": 1.0, "mscale_all_dim": 1.0})
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 30)
        parts = [model(ids[:, :11], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(11, 30)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_grouped_matmul_and_loop_fallback_agree(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(small_config()).train()
    ids = torch.randint(0, 128, (2, 16))
    out_a = model(ids, labels=ids)
    out_a.loss.backward()
    grads_a = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(kernels, "_grouped_mm_works", lambda *a: False)
    out_b = model(ids, labels=ids)
    out_b.loss.backward()
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads_a[n], p.grad, atol=1e-5), n


def test_dispatch_only_computes_routed_tokens(monkeypatch):
    """The experts see N*k rows (sorted by expert), never N*E."""
    torch.manual_seed(0)
    cfg = small_config()
    model = Transformer(cfg)
    seen = []
    original = moe_mod.GroupedExperts.forward

    def spy(self, x_sorted, counts):
        seen.append((x_sorted.shape[0], int(counts.sum())))
        return original(self, x_sorted, counts)

    monkeypatch.setattr(moe_mod.GroupedExperts, "forward", spy)
    model(torch.randint(0, 128, (2, 16)))
    n = 2 * 16 * cfg.num_experts_per_tok
    assert seen and all(rows == n and total == n for rows, total in seen)


def test_bias_update_evens_out_a_skewed_router():
    torch.manual_seed(0)
    cfg = small_config(bias_update_speed=0.01)
    model = Transformer(cfg).train()
    with torch.no_grad():
        for m in moe_layers(model):  # skew: a large bias makes experts 0 and 1 win almost every token
            m.gate.weight.normal_(std=0.5)
            m.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0] + [-0.2] * 6))
    ids = torch.randint(0, 128, (8, 32))
    balancer = RouterBalancer(model, cfg.bias_update_speed)

    def imbalance():
        probe = RouterBalancer(model, 0.0)
        with torch.no_grad():
            probe.observe(model(ids).expert_load)
        return probe.stats()["load_max_over_mean"]

    before = imbalance()
    for _ in range(150):
        with torch.no_grad():
            balancer.observe(model(ids).expert_load)
        balancer.step()
    after = imbalance()
    assert before > 3.0  # top-2 of 8 on two experts: max/mean = 4
    assert after < 1.5
    for m in moe_layers(model):  # centred
        assert abs(float(m.gate.e_score_correction_bias.mean())) < 1e-5


def test_bias_is_untouched_when_speed_is_zero():
    model = Transformer(small_config()).train()
    balancer = RouterBalancer(model, 0.0)
    balancer.observe(model(torch.randint(0, 128, (2, 8))).expert_load)
    balancer.step()
    for m in moe_layers(model):
        assert torch.count_nonzero(m.gate.e_score_correction_bias) == 0
    assert balancer.load is None  # counts reset every step


def test_expert_load_counts_every_routed_token_once_per_forward():
    """Loads come out of the forward (not a module buffer): k per token per MoE layer, MTP included,
    and a recomputed forward (activation checkpointing) cannot add to what the trainer counts."""
    cfg = small_config(num_nextn_predict_layers=1)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids)
    n_moe = len(moe_layers(model))
    assert out.expert_load.shape == (n_moe, cfg.n_routed_experts) and not out.expert_load.requires_grad
    per_layer = out.expert_load.sum(-1)
    assert torch.equal(per_layer[:-1], torch.full((n_moe - 1,), 2.0 * 16 * cfg.num_experts_per_tok))
    assert per_layer[-1] == 2 * 15 * cfg.num_experts_per_tok  # MTP depth 1 sees T - 1 positions
    assert not any(b.dtype.is_floating_point and "load" in n for n, b in model.named_buffers())


def test_mtp_loss_is_finite_and_decreases():
    torch.manual_seed(0)
    model = Transformer(small_config(num_nextn_predict_layers=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 24))
    losses = []
    for _ in range(30):
        out = model(ids, labels=ids)
        assert torch.isfinite(out.mtp_loss)
        losses.append(out.mtp_loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


def test_sequence_aux_loss_only_when_enabled():
    ids = torch.randint(0, 128, (2, 8))
    assert Transformer(small_config()).train()(ids, labels=ids).aux_loss is None
    aux = Transformer(small_config(aux_loss_alpha=0.1)).train()(ids, labels=ids).aux_loss
    assert aux is not None and aux.item() > 0


def test_dense_preset_has_no_experts():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("dense-tiny"))
    assert moe_layers(model) == []
    assert model.num_params() == model.num_params(active=True)


def test_big_presets_build_on_meta_device_for_free():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("deepseek-v3"))
    assert 600e9 < model.num_params() < 700e9


@pytest.mark.parametrize("change, needle", [
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(n_routed_experts=10, n_group=4), "not divisible"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=5), "even"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "yarn"),
])
def test_impossible_configs_are_rejected_with_one_line(change, needle):
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(small_config(), **change).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("tiniest")


def test_grouped_mm_probe_is_not_fooled_by_no_grad():
    """The first MoE forward is often an eval under no_grad; the kernel probe must still see backward."""
    kernels._grouped_mm_works.cache_clear()
    try:
        with torch.no_grad():
            under_no_grad = kernels._grouped_mm_works("cpu", torch.float32)
        kernels._grouped_mm_works.cache_clear()
        assert under_no_grad == kernels._grouped_mm_works("cpu", torch.float32)
    finally:
        kernels._grouped_mm_works.cache_clear()


def test_per_token_experts_equal_the_sorted_dispatch():
    # The compiled decode path computes each token against its own gathered experts; it must give
    # what the sorted grouped dispatch gives, for every token and every routing.
    torch.manual_seed(0)
    moe = moe_layers(Transformer(small_config()))[0].eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        want, _, load = moe(x)
        weights, ids, _ = moe.gate(x.view(-1, 32))
        routed = moe.experts.per_token(x.view(-1, 32), ids, weights)
        got = routed + moe.shared_experts(x.view(-1, 32))
    torch.testing.assert_close(got.view(1, 6, 32), want)
    assert load.sum() == 6 * moe.top_k


def test_compiled_decode_moe_is_one_graph_and_counts_the_same_load():
    # fullgraph=True raises on a graph break: the sorted dispatch (data-dependent group sizes) would
    # break; a few tokens under no_grad take the per-token path instead, with the same outputs.
    torch.manual_seed(0)
    moe = moe_layers(Transformer(small_config()))[0].eval()
    x = torch.randn(2, 1, 32)
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want, _, want_load = moe(x)
        got, _, got_load = compiled(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_load, want_load)
