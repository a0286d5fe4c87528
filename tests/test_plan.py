"""The planner: exact parameter counts against the meta model, paper numbers, FLOPs, memory, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from levante.config import PRESETS, ModelConfig
from levante.errors import LevanteError
from levante.plan import GPUS, USABLE_MEMORY, memory_per_gpu, min_gpus, plan

B = 1e9


def meta_model(cfg: ModelConfig):
    from levante.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def close(x: float, target: float, rel: float) -> bool:
    return abs(x - target) <= rel * target


# ------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_equals_meta_model(name):
    cfg = ModelConfig.preset(name)
    p, model = plan(cfg), meta_model(cfg)
    assert sum(p["breakdown"]["total"].values()) == p["total_params"] == model.num_params()
    assert p["active_params_with_embedding"] == model.num_params(active=True)
    assert p["total_params"] + p["mtp_params"] == model.num_params(include_mtp=True)
    assert sum(p["breakdown"]["mtp"].values()) == p["mtp_params"]


@pytest.mark.parametrize("change", [
    {"tie_word_embeddings": True},
    {"q_lora_rank": 64, "n_shared_experts": 0, "num_nextn_predict_layers": 2},
    {"n_routed_experts": 0, "first_k_dense_replace": 6},
])
def test_analytic_count_equals_meta_model_for_variants(change):
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), **change).validate()
    p, model = plan(cfg), meta_model(cfg)
    assert p["total_params"] == model.num_params()
    assert p["active_params_with_embedding"] == model.num_params(active=True)
    assert p["total_params"] + p["mtp_params"] == model.num_params(include_mtp=True)


def test_deepseek_v3_matches_the_paper():
    p = plan(ModelConfig.preset("deepseek-v3"))
    assert close(p["total_params"], 671 * B, 0.02)
    assert close(p["active_params"], 37 * B, 0.02)
    # The HF checkpoint's 685B = 671B main + ~14B MTP, whose module stores its own copies of the
    # embedding and head; the trainable MTP parameters share them.
    assert close(p["mtp_params_in_hf_checkpoint"], 14 * B, 0.05)
    assert close(p["total_params"] + p["mtp_params_in_hf_checkpoint"], 685 * B, 0.01)
    assert p["mtp_params_in_hf_checkpoint"] - p["mtp_params"] == 2 * 129280 * 7168


def test_16b_has_deepseek_v2_lite_shape():
    p = plan(ModelConfig.preset("16b"))
    assert close(p["total_params"], 15.7 * B, 0.03)
    assert close(p["active_params"], 2.4 * B, 0.03)


@pytest.mark.parametrize("name, total, active", [
    ("tiny", (10e6, 20e6), None),
    ("small", (100e6, 200e6), None),
    ("1b", (0.85 * B, 1.15 * B), None),
    ("100b", (95 * B, 105 * B), (8 * B, 12 * B)),
])
def test_preset_sizes_hit_their_targets(name, total, active):
    p = plan(ModelConfig.preset(name))
    assert total[0] <= p["total_params"] <= total[1], f"{name}: {p['total_params']:,} total"
    if active:
        assert active[0] <= p["active_params"] <= active[1], f"{name}: {p['active_params']:,} active"


def test_active_counts_only_top_k_experts():
    cfg = ModelConfig.preset("tiny")
    p = plan(cfg)
    bd = p["breakdown"]
    routed = bd["total"]["routed_experts"]
    assert bd["active"]["routed_experts"] == routed // cfg.n_routed_experts * cfg.num_experts_per_tok
    assert bd["active"]["embedding"] == 0
    assert p["active_params"] < p["total_params"]


# ------------------------------------------------------------------------------------------ FLOPs


def test_dense_flops_are_six_n_plus_attention():
    cfg = ModelConfig.preset("dense-small")
    seq = 2048
    p = plan(cfg, seq_len=seq)
    bd = p["breakdown"]["total"]
    n_matmul = p["total_params"] - bd["embedding"] - bd["norms"]
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq
    assert p["flops_per_token"] == 6 * n_matmul + attention
    # Dense: active params (embedding table excluded) are the matmul params up to the norm gains.
    assert close(p["flops"]["matmul"], 6 * p["active_params"], 0.001)


def test_moe_flops_follow_active_not_total_params():
    base = ModelConfig.preset("small")
    more = dataclasses.replace(base, n_routed_experts=2 * base.n_routed_experts).validate()
    a, b = plan(base), plan(more)
    assert b["total_params"] > 1.5 * a["total_params"]
    assert close(b["flops_per_token"], a["flops_per_token"], 0.01)  # only the router grows


def test_attention_term_is_linear_in_seq_len_and_mtp_adds_compute():
    cfg = ModelConfig.preset("100b")
    short, long = plan(cfg, seq_len=1024)["flops"], plan(cfg, seq_len=4096)["flops"]
    assert long["attention"] == 4 * short["attention"] and long["matmul"] == short["matmul"]
    no_mtp = plan(dataclasses.replace(cfg, num_nextn_predict_layers=0))
    assert plan(cfg)["flops_per_token"] > no_mtp["flops_per_token"]


@pytest.mark.parametrize("name", ["dense-tiny", "dense-small"])
def test_trainer_flops_match_the_real_dense_model(name):
    """For a dense model every matmul weight is active: 6 x (parameters the model multiplies by,
    counted on the real meta-device model) + the attention term."""
    import torch

    from levante.model.transformer import Transformer
    from levante.train.metrics import model_flops_per_token

    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 512
    assert model_flops_per_token(cfg, 512) == 6 * matmul + attention


def test_gpu_hours_scale_with_peak_and_match_deepseek_order_of_magnitude():
    p = plan(ModelConfig.preset("deepseek-v3"), tokens=14.8e12, mfu=0.4)
    hours = p["gpu_hours"]
    assert close(hours["a100"] / hours["h100"], 989.4 / 312, 1e-9)
    # DeepSeek-V3 pre-training took 2.664M H800 GPU-hours (H100-class compute, FP8) for 14.8T tokens.
    assert 2e6 < hours["h100"] < 4.5e6
    assert p["tokens_note"] == "given"
    default = plan(ModelConfig.preset("deepseek-v3"))
    assert default["tokens"] == 20 * default["active_params"]


# ----------------------------------------------------------------------------------------- memory


def test_memory_accounting():
    cfg = ModelConfig.preset("16b")
    kw = {"seq_len": 4096, "micro_batch": 1, "expert_parallel": None}
    m8 = memory_per_gpu(cfg, 8, zero_stage="fsdp", **kw)
    m64 = memory_per_gpu(cfg, 64, zero_stage="fsdp", **kw)
    params = plan(cfg)["total_params"]
    assert close(m8["state_bytes"]["adamw"], 16 * params / 8, 1e-6)  # 2+2+4+8 bytes, all sharded
    assert m8["state_bytes"]["muon"] < m8["state_bytes"]["adamw"]
    assert m64["state_bytes"]["adamw"] < m8["state_bytes"]["adamw"]
    assert memory_per_gpu(cfg, 8, zero_stage="ddp", **kw)["state_bytes"]["adamw"] > m8["state_bytes"]["adamw"]
    acts = m8["activation_bytes"]
    assert acts["full_recompute"] < acts["no_recompute"]
    two = memory_per_gpu(cfg, 8, zero_stage="fsdp", seq_len=4096, micro_batch=2, expert_parallel=None)
    assert two["activation_bytes"]["full_recompute"] == 2 * acts["full_recompute"]


def test_min_gpus_is_the_first_count_that_fits():
    cfg = ModelConfig.preset("deepseek-v3")
    kw = {"seq_len": 4096, "micro_batch": 1, "zero_stage": "fsdp"}
    n80, n141 = min_gpus(cfg, 80e9, **kw), min_gpus(cfg, 141e9, **kw)
    assert n80 is not None and n141 is not None and n141 < n80
    fits = memory_per_gpu(cfg, n80, expert_parallel=None, **kw)["total_bytes"]["adamw"]
    short = memory_per_gpu(cfg, n80 - 8, expert_parallel=None, **kw)["total_bytes"]["adamw"]
    assert fits <= USABLE_MEMORY * 80e9 < short
    p = plan(cfg)  # no gpus given: memory is reported at the minimum for the chosen card
    assert p["gpus"] == n80 and p["memory"]["fits"] and p["min_gpus"] == {"80GB": n80, "141GB": n141}
    assert min_gpus(ModelConfig.preset("tiny"), 80e9, **kw) == 1


def test_kv_cache_mla_versus_mha():
    kv = plan(ModelConfig.preset("deepseek-v3"))["kv_cache"]
    assert kv["mla_bytes_per_token"] == (512 + 64) * 61 * 2
    assert kv["mha_bytes_per_token"] == 128 * (192 + 128) * 61 * 2
    assert kv["mha_over_mla"] > 50


@pytest.mark.parametrize("kwargs", [
    {"gpu": "v100"}, {"mfu": 0.0}, {"mfu": 1.5}, {"seq_len": 0}, {"gpus": 0}, {"tokens": -1.0},
    {"zero_stage": "zero4"}, {"gpus": 8, "expert_parallel": 3},
])
def test_bad_inputs_raise_one_line_errors(kwargs):
    with pytest.raises(LevanteError) as e:
        plan(ModelConfig.preset("tiny"), **kwargs)
    assert "\n" not in str(e.value)


def test_format_plan_renders():
    from rich.console import Console

    from levante.plan.render import format_plan

    console = Console(width=120, record=True)
    console.print(format_plan(plan(ModelConfig.preset("100b"))))
    text = console.export_text()
    assert "routed_experts" in text and "GPU-hours" in text and "KV cache" in text


# -------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def run_cli():
    from levante.cli.plan import plan_command

    app = typer.Typer()
    app.command()(plan_command)
    return lambda *args: CliRunner().invoke(app, list(args))


def test_cli_json_has_the_keys(run_cli):
    r = run_cli("tiny", "--json", "--tokens", "1e9", "--gpus", "2", "--gpu", "h200")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["total_params"] == plan(ModelConfig.preset("tiny"))["total_params"]
    for key in ("active_params", "mtp_params", "breakdown", "flops_per_token", "gpu_hours", "memory",
                "kv_cache", "min_gpus"):
        assert key in out
    assert out["tokens"] == 1e9 and out["gpus"] == 2 and out["gpu"] == "h200"


def test_cli_table(run_cli):
    r = run_cli("small", "--seq-len", "1024")
    assert r.exit_code == 0, r.output
    assert "main model" in r.output


def test_cli_reads_toml_and_checkpoint_dirs(run_cli, tmp_path):
    (tmp_path / "m.toml").write_text('[model]\npreset = "tiny"\nnum_hidden_layers = 3\n')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.toml").write_text('[model]\nhidden_size = 128\n[run]\nsteps = 5\n')
    for name, cfg in [(str(tmp_path / "m.toml"), dataclasses.replace(ModelConfig(), num_hidden_layers=3)),
                      (str(ckpt), dataclasses.replace(ModelConfig(), hidden_size=128))]:
        r = run_cli(name, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["total_params"] == meta_model(cfg).num_params()


@pytest.mark.parametrize("name, message", [
    ("tinyy", "choose one of: tiny, small"),
    ("missing/model.toml", "not found"),
])
def test_cli_bad_names_raise_levante_errors(run_cli, name, message):
    r = run_cli(name)
    assert isinstance(r.exception, LevanteError) and message in str(r.exception)


def test_cli_toml_without_model_table(run_cli, tmp_path):
    (tmp_path / "x.toml").write_text("[run]\nsteps = 1\n")
    r = run_cli(str(tmp_path / "x.toml"))
    assert isinstance(r.exception, LevanteError) and "[model]" in str(r.exception)


def test_gpu_table_has_the_documented_peaks():
    assert {k: g["peak_flops"] / 1e12 for k, g in GPUS.items()} == {
        "h100": 989.4, "h200": 989.4, "h800": 989.4, "a100": 312, "mi250x": 383, "mi300x": 1307.4, "gh200": 989.4}


# ------------------------------------------------------------------------ cluster sizing (--days etc.)


def plan_json(run_cli, *args) -> dict:
    r = run_cli(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_deepseek_v3_budget_implies_a_plausible_mfu(run_cli):
    # DeepSeek-V3 report: 14.8T tokens, 2.664M H800 GPU-hours of pre-training. The crude 6 * 37B * tokens
    # over that budget is 31% of dense bf16 peak; our FLOPs add attention and MTP, so a little more.
    d = plan_json(run_cli, "deepseek-v3", "--gpu", "h800", "--tokens", "14.8T", "--gpu-hours", "2.664M")
    crude = 6 * 37e9 * 14.8e12 / (2.664e6 * 3600 * 989.4e12)
    assert crude < d["implied_mfu"] < 1.6 * crude
    assert d["train_flops_per_token"] > 6 * 37e9
    # Round trip: planning at the implied MFU needs exactly the budget.
    again = plan_json(run_cli, "deepseek-v3", "--gpu", "h800", "--tokens", "14.8T", "--mfu", str(d["implied_mfu"]))
    assert again["gpu_hours"]["h800"] == pytest.approx(2.664e6, rel=1e-9)
    assert d["energy_kwh"] == pytest.approx(2.664e6 * 0.7 * 1.2)


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_days_gives_the_smallest_cluster_that_finishes(run_cli, gpu):
    d = plan_json(run_cli, "100b", "--tokens", "4T", "--days", "30", "--gpu", gpu, "--price", "2.5")
    hours, gpus = d["gpu_hours"][gpu], d["gpus"]
    assert gpus % 8 == 0 and d["days"] <= 30 and hours / (gpus - 8) / 24 > 30  # 8 fewer would not finish
    assert d["days"] == pytest.approx(hours / gpus / 24)
    mem = d["memory"]
    assert mem["fits"] and mem["activation_checkpointing"] == "full" and mem["gpus"] == gpus
    assert gpus % mem["expert_parallel"] == 0
    assert d["cost"] == pytest.approx(hours * 2.5)


def test_days_is_bounded_below_by_memory(run_cli):
    d = plan_json(run_cli, "deepseek-v3", "--tokens", "1B", "--days", "365", "--gpu", "a100")
    assert d["gpus"] == min_gpus(ModelConfig.preset("deepseek-v3"), 80e9, seq_len=4096, micro_batch=1,
                                 zero_stage="fsdp")


@pytest.mark.parametrize("args, needle", [
    (("--tokens", "lots"), "--tokens must be a number"),
    (("--gpu-hours", "-3"), "--gpu-hours must be positive"),
    (("--days", "0"), "--days must be positive"),
    (("--pue", "0.5"), "pue must be >= 1"),
    (("--gpu", "h900"), "unknown gpu"),
])
def test_cluster_options_reject_bad_values(run_cli, args, needle):
    r = run_cli("tiny", *args)
    assert isinstance(r.exception, LevanteError) and needle in str(r.exception)
