"""The [parallel] table: defaults, round trip, and one-line errors for impossible layouts."""

import pytest

from levante.config import ConfigError, TrainConfig


def test_defaults_and_round_trip(tmp_path):
    cfg = TrainConfig.from_dict({})
    assert (cfg.parallel.ep, cfg.parallel.activation_checkpointing, cfg.parallel.compile) == (1, "none", False)
    cfg = TrainConfig.from_dict({"model": {"preset": "tiny"},
                                 "parallel": {"ep": 4, "activation_checkpointing": "selective", "compile": True}})
    path = tmp_path / "c.toml"
    path.write_text(cfg.dumps())
    assert TrainConfig.load(path) == cfg


@pytest.mark.parametrize("table, needle", [
    ({"parallel": {"ep": 0}}, "parallel.ep must be >= 1"),
    ({"parallel": {"ep": 3}}, r"parallel.ep \(3\) must divide model.n_routed_experts \(16\)"),
    ({"model": {"preset": "dense-tiny"}, "parallel": {"ep": 2}}, "must divide model.n_routed_experts"),
    ({"parallel": {"activation_checkpointing": "some"}}, "must be one of none, full, selective"),
    ({"parallel": {"eep": 2}}, r"unknown config key 'parallel.eep' \(did you mean 'ep'\?\)"),
    ({"parallel": {"ep": "2"}}, "parallel.ep"),
])
def test_bad_parallel_tables_name_the_problem(table, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(table)


def test_ep_without_torchrun_is_a_clear_error():
    import torch

    from levante.errors import LevanteError
    from levante.parallel.mesh import Dist

    with pytest.raises(LevanteError, match="parallel.ep = 2 needs 2 or more ranks"):
        Dist.from_env(torch.device("cpu"), ep=2)


def test_muon_ns_dtype_is_a_config_field_not_an_environment_switch():
    """optim.muon_ns_dtype picks Newton–Schulz's precision (the exact N-rank tests use "float32")."""
    import torch
    from torch import nn

    from levante.train.optim import build_optimizer, orthogonalize

    with pytest.raises(ConfigError, match="optim.muon_ns_dtype must be 'auto', 'bfloat16' or 'float32'"):
        TrainConfig.from_dict({"optim": {"muon_ns_dtype": "fp8"}})
    g = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = orthogonalize(g, 5, "float32"), orthogonalize(g, 5, "bfloat16")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0)  # the same iteration, coarser rounding
    assert not torch.equal(bf16.float(), fp32)

    def update(ns_dtype: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
        cfg = TrainConfig.from_dict({"optim": {"muon_ns_dtype": ns_dtype}}).optim
        opt = build_optimizer(model, cfg)
        assert opt.ns_dtype == ns_dtype
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        before = model[1].weight.detach().clone()
        opt.step()
        return model[1].weight.detach() - before

    assert not torch.equal(update("float32"), update("bfloat16"))  # the field reaches the optimizer's step
