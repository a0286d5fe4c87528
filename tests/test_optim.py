import math

import pytest
import torch
from torch import nn

from levante.config import OptimConfig
from levante.errors import LevanteError
from levante.train.optim import Muon, build_optimizer, clip_grad_norm, orthogonalize

V, H, E, INTER = 24, 16, 4, 8


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, H) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(E, H, INTER) * 0.2)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = Experts()

    def forward(self, x):
        # Dense soft mixture over all experts: fine for a test, never for the real model.
        probs = self.gate(x).softmax(-1)
        gate, up = torch.einsum("bth,eih->btei", x, self.experts.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("btei,ehi->bteh", nn.functional.silu(gate) * up, self.experts.down_proj)
        return (probs.unsqueeze(-1) * out).sum(-2)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H, H, bias=False)
        self.o_proj = nn.Linear(H, H, bias=True)  # a bias, to exercise the 1-D no-decay route


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = RMSNorm(H)
        self.self_attn = Attn()
        self.post_attention_layernorm = RMSNorm(H)
        self.mlp = MoE()

    def forward(self, x):
        x = x + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(self.input_layernorm(x))))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Layer()])
        self.norm = RMSNorm(H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (8, 1), generator=g)
    ids = (start + 5 * torch.arange(13)) % V  # a learnable rule: next = current + 5
    return ids[:, :-1], ids[:, 1:]


def loss_of(model, seed=0):
    x, y = batch(seed)
    return nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def kinds(opt):
    names = {id(p): n for n, p in opt._model.named_parameters()}
    return {names[id(p)]: (g["kind"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_newton_schulz_makes_singular_values_near_uniform():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    raw = torch.linalg.svdvals(g)
    assert raw.max() / raw.min() > 3  # a genuinely non-orthogonal input
    out = orthogonalize(g, 5)
    s = torch.linalg.svdvals(out.float())  # bf16 on CPUs with fast bf16 matmuls
    assert s.min() > 0.6 and s.max() < 1.25
    # Same for the transposed (wide) orientation, to the precision of the compute dtype.
    s_t = torch.linalg.svdvals(orthogonalize(g.T, 5).float())
    tol = 1e-4 if out.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(s_t, s, atol=tol, rtol=tol)


def test_three_d_param_is_orthogonalised_per_expert():
    g = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(1))
    g[1] *= 100  # a large expert must not shrink the others (per-matrix normalisation)
    stacked = orthogonalize(g, 5)
    for e in range(3):
        torch.testing.assert_close(stacked[e], orthogonalize(g[e], 5), atol=1e-5, rtol=1e-5)


def test_muon_update_on_3d_param_equals_per_slice_updates():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 10, 6))
    slices = [nn.Parameter(w.detach()[e].clone()) for e in range(3)]
    opt3 = Muon([dict(params=[w], kind="muon")], lr=0.01, weight_decay=0.1)
    opt2 = Muon([dict(params=slices, kind="muon")], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(3, 10, 6)
        w.grad = grad.clone()
        for e, p in enumerate(slices):
            p.grad = grad[e].clone()
        opt3.step()
        opt2.step()
    for e in range(3):
        torch.testing.assert_close(w.detach()[e], slices[e].detach(), atol=1e-6, rtol=1e-6)


def test_param_routing():
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(name="muon", weight_decay=0.1))
    opt._model = model
    k = kinds(opt)
    assert k["embed_tokens.weight"] == ("adamw", 0.1)
    assert k["lm_head.weight"] == ("adamw", 0.1)
    assert k["norm.weight"] == ("adamw", 0.0)
    assert k["layers.0.input_layernorm.weight"] == ("adamw", 0.0)
    assert k["layers.0.self_attn.o_proj.bias"] == ("adamw", 0.0)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.o_proj.weight",
                 "layers.0.mlp.gate.weight", "layers.0.mlp.experts.gate_up_proj",
                 "layers.0.mlp.experts.down_proj"):
        assert k[name] == ("muon", 0.1), name
    assert len(k) == len(list(model.parameters()))
    cfg = OptimConfig(lr=1e-3, muon_lr=0.05)
    for group in build_optimizer(model, cfg).param_groups:
        assert group["base_lr"] == group["lr"] == (0.05 if group["kind"] == "muon" else 1e-3)


def test_adamw_config_uses_two_groups():
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    opt._model = model
    k = kinds(opt)
    assert k["layers.0.mlp.experts.gate_up_proj"] == ("adamw", 0.1)
    assert k["embed_tokens.weight"] == ("adamw", 0.1)
    assert k["norm.weight"] == ("adamw", 0.0)
    assert {g["base_lr"] for g in opt.param_groups} == {1e-3}


def test_adamw_path_matches_torch_adamw_exactly():
    torch.manual_seed(0)
    ref_model = TinyLM()
    model = TinyLM()
    model.load_state_dict(ref_model.state_dict())
    betas, wd = (0.9, 0.95), 0.1
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=betas, eps=1e-8, weight_decay=wd)
    ours = Muon([dict(params=list(model.parameters()), kind="adamw")], lr=3e-3, betas=betas, eps=1e-8,
                weight_decay=wd)
    for step in range(4):
        for m, opt in ((ref_model, ref), (model, ours)):
            opt.zero_grad()
            loss_of(m, seed=step).backward()
            opt.step()
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_params_without_grad_are_left_alone():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = Muon([dict(params=[a], kind="muon"), dict(params=[b], kind="adamw")], weight_decay=0.1)
    before = (a.detach().clone(), b.detach().clone())
    opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert len(opt.state) == 0


def test_muon_rejects_vectors():
    with pytest.raises(LevanteError, match="2-D and 3-D"):
        Muon([dict(params=[nn.Parameter(torch.ones(3))], kind="muon")])


def test_muon_update_rms_matches_moonlight_scale():
    p = nn.Parameter(torch.zeros(48, 16))
    p.grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    Muon([dict(params=[p], kind="muon")], lr=1.0, weight_decay=0.0).step()
    rms = p.detach().pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.22  # 0.2 for an exactly orthogonal update; NS lands slightly below


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_small_model_loss_falls(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2, muon_lr=1e-2, weight_decay=0.0))
    with torch.no_grad():
        first = loss_of(model).item()
    for step in range(40):
        opt.zero_grad()
        loss = loss_of(model, seed=step)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        last = loss_of(model).item()
    assert last < 0.5 * first, (first, last)


def test_muon_is_deterministic_on_cpu():
    def run():
        torch.manual_seed(0)
        model = TinyLM()
        opt = build_optimizer(model, OptimConfig())
        for step in range(3):
            opt.zero_grad()
            loss_of(model, seed=step).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_clip_grad_norm_clips_and_zero_only_measures():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([p], 0) == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    q = nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([math.inf, 1.0])
    assert clip_grad_norm([q], 0) == math.inf
    assert q.grad[1].item() == 1.0  # measuring never rewrites gradients
