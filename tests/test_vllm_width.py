"""Exports vLLM can serve: preset latent widths, and a warning from `export hf` for the others."""

import logging

import pytest

from levante.config import PRESETS
from levante.interop.hf import VLLM_MLA_WIDTHS, export_hf, vllm_width_problem


@pytest.mark.parametrize("name", ["1b", "16b", "100b", "deepseek-v3"])
def test_presets_from_1b_up_have_a_width_vllm_serves(name):
    cfg = PRESETS[name]
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim in VLLM_MLA_WIDTHS
    assert vllm_width_problem(cfg) is None


@pytest.mark.parametrize("kv_rank, warned", [(16, True), (312, False)])
def test_export_warns_about_a_width_vllm_cannot_serve(tmp_path, tiny_workspace, caplog, kv_rank, warned):
    import levante
    from levante.checkpoint import save_checkpoint
    from levante.config import TrainConfig

    cfg = TrainConfig.from_dict(tiny_workspace.config_dict(model={"kv_lora_rank": kv_rank}))
    run = tmp_path / "run"
    save_checkpoint(run, 0, levante.Transformer(cfg.model), None, {}, keep_last=1,
                    tokenizer_path=tiny_workspace.tokenizer, config_text=cfg.dumps())
    with caplog.at_level(logging.WARNING, logger="levante.interop.hf"):
        export_hf(run, tmp_path / "hf")
    messages = [r.getMessage() for r in caplog.records if r.name == "levante.interop.hf"]
    assert bool(messages) == warned
    if warned:
        assert f"= {kv_rank + 8}" in messages[0] and "vLLM" in messages[0]
