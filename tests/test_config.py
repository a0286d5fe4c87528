"""The config tree: TOML round trip, presets with overrides, shipped example configs."""

from pathlib import Path

import pytest

from levante.config import ConfigError, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_toml_round_trip_preserves_every_field(tmp_path):
    cfg = TrainConfig.from_dict({
        "model": {"preset": "small", "num_nextn_predict_layers": 1,
                  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
        "optim": {"name": "adamw", "betas": [0.9, 0.99]},
        "run": {"steps": 7},
    })
    path = tmp_path / "c.toml"
    path.write_text(cfg.dumps())
    assert TrainConfig.load(path) == cfg


def test_preset_fields_can_be_overridden():
    cfg = ModelConfig.from_dict({"preset": "tiny", "num_hidden_layers": 3})
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == ModelConfig.preset("tiny").hidden_size


def test_q_lora_rank_none_survives_toml(tmp_path):
    cfg = TrainConfig(model=ModelConfig.preset("16b"))
    path = tmp_path / "c.toml"
    path.write_text(cfg.dumps())
    assert TrainConfig.load(path).model.q_lora_rank is None


@pytest.mark.parametrize("data, needle", [
    ({"run": {"stpes": 3}}, "run.stpes' (did you mean 'steps'?)"),
    ({"optimizer": {}}, "did you mean 'optim'"),
    ({"model": {"hidden_size": "big"}}, "model.hidden_size: expected an integer"),
    ({"schedule": {"name": "linear"}}, "schedule.name"),
])
def test_bad_configs_name_the_problem(data, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(data)
    assert needle in str(e.value)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    TrainConfig.load(path)
