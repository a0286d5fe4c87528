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
