"""Oracle for the complementary sequence-wise balance loss: DeepSeek-V3 eqs. 17-20, token by token.

For one sequence of T tokens, N_r routed experts, K_r of them per token and affinities s_{i,t}:

    f_i    = N_r / (K_r T) * sum_t 1(expert i is selected for token t)      (eq. 18)
    s'_i,t = s_{i,t} / sum_j s_{j,t}                                        (eq. 19)
    P_i    = 1/T * sum_t s'_{i,t}                                           (eq. 20)
    L_Bal  = alpha * sum_i f_i P_i                                          (eq. 17)

averaged over the sequences of the batch and summed over the MoE layers (MTP blocks included).

Which selection counts in f_i. Eq. 18 writes Topk(s_t, K_r), the unbiased top-k, because the
paper defines this loss before (and independently of) the routing bias. What the loss is *for* is
the load experts actually receive within a sequence, and that is the routed selection: top-k of
s + b among the kept groups (eq. 16 and the node/group limit). DeepSeek's released HF modeling code
(MoEGate with `seq_aux`) scatters its routed `topk_idx` — group-limited, and under `noaux_tc`
bias-corrected — into f; Levante does the same. The reference below computes the routed selection
from scratch, and the test checks that the other readings give a different loss, so it would fail
if the model switched.
"""

import pytest
import torch

from levante import ModelConfig, Transformer
from levante.model.moe import Router

ALPHA = 0.1


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=ALPHA,
                num_nextn_predict_layers=1, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base).validate()


def affinities(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """s_{i,t} = sigmoid(u_t . e_i)  [T, N_r]  (eq. 15, sigmoid gating)."""
    return 1.0 / (1.0 + torch.exp(-(x.float() @ weight.float().T)))


def routed_selection(s: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int) -> list[set]:
    """Per token: top-k of s + b among the `topk_group` groups with the largest top-2 sums of s + b."""
    per_group = s.shape[1] // n_group
    chosen = []
    for row in (s + bias).tolist():
        groups = [sorted(row[g * per_group:(g + 1) * per_group], reverse=True) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: groups[g][0] + groups[g][1], reverse=True)[:topk_group]
        candidates = [e for e in range(len(row)) if e // per_group in kept]
        chosen.append(set(sorted(candidates, key=lambda e: row[e], reverse=True)[:k]))
    return chosen


def plain_topk(s: torch.Tensor, bias: torch.Tensor | float, k: int) -> list[set]:
    return [set(sorted(range(len(r)), key=lambda e: r[e], reverse=True)[:k]) for r in (s + bias).tolist()]


def balance_loss(s: torch.Tensor, selected: list[set], batch: int, k: int) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence, averaged over the batch (eqs. 17-20)."""
    n_tokens, n_experts = s.shape
    t = n_tokens // batch
    losses = []
    for b in range(batch):
        rows = range(b * t, (b + 1) * t)
        f = [n_experts / (k * t) * sum(1.0 for r in rows if i in selected[r]) for i in range(n_experts)]
        s_norm = torch.stack([s[r] / s[r].sum() for r in rows])
        p = s_norm.sum(0) / t
        losses.append(ALPHA * sum(f[i] * p[i] for i in range(n_experts)))
    return torch.stack(losses).mean()


def prepared_model(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config(**kw)).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.weight.normal_(0, 0.3, generator=g)  # affinities spread over (0, 1), not all ~0.5
                m.e_score_correction_bias.copy_(0.15 * torch.randn(m.n_experts, generator=g))
    return model


def capture_routers(model: Transformer):
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0], out)))
             for m in model.modules() if isinstance(m, Router)]
    return calls, hooks


def test_router_outputs_follow_the_equations():
    model = prepared_model(0)
    router = next(m for m in model.modules() if isinstance(m, Router))
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    weights, ids, scores = router(x)
    s = affinities(x, router.weight)
    torch.testing.assert_close(scores, s, rtol=1e-6, atol=1e-6)
    chosen = routed_selection(s, router.e_score_correction_bias, 2, 4, 2)
    assert [set(r) for r in ids.tolist()] == chosen
    # Gating values: the unbiased affinities of the chosen experts, normalised, times the scaling.
    gathered = s.gather(1, ids)
    torch.testing.assert_close(weights, 2.5 * gathered / gathered.sum(-1, keepdim=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}],
                         ids=["group-limited", "plain-top-k"])
def test_sequence_balance_loss_matches_the_paper(kw):
    model = prepared_model(2, **kw)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    calls, hooks = capture_routers(model)
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    assert len(calls) == 3  # two main MoE layers and the MTP block
    k, batch = cfg.num_experts_per_tok, ids.shape[0]

    ref, unbiased, biased_ungrouped, differing = 0.0, 0.0, 0.0, 0
    for router, x, (_, routed_ids, _) in calls:
        s = affinities(x, router.weight)
        chosen = routed_selection(s, router.e_score_correction_bias, k, cfg.n_group, cfg.topk_group)
        assert [set(r) for r in routed_ids.tolist()] == chosen
        ref = ref + balance_loss(s, chosen, batch, k)
        paper_literal = plain_topk(s, 0.0, k)
        differing += sum(a != b for a, b in zip(chosen, paper_literal, strict=True))
        unbiased = unbiased + balance_loss(s, paper_literal, batch, k)
        biased_ungrouped = biased_ungrouped + balance_loss(s, plain_topk(s, router.e_score_correction_bias, k),
                                                           batch, k)

    torch.testing.assert_close(out.aux_loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss + ref,
                               rtol=1e-6, atol=1e-6)
    # The bias changes many selections here, and the loss tells the readings of eq. 18 apart.
    assert differing >= 10
    assert abs(unbiased.item() - ref.item()) > 1e-3 * ref.item()
    if cfg.n_group > cfg.topk_group:
        assert abs(biased_ungrouped.item() - ref.item()) > 1e-3 * ref.item()

    # Gradients: through P_i only (f_i is a count), into the router weights and everything upstream.
    names, params = zip(*model.named_parameters(), strict=True)
    got = torch.autograd.grad(out.aux_loss, params, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    routers = 0
    for name, a, b in zip(names, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
            routers += name.endswith("gate.weight") and bool(a.abs().sum() > 0)
    assert routers == 3
