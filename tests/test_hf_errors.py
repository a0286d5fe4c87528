"""Bad inputs to from_pretrained / import_hf / export_hf give one-line LevanteErrors; run dirs load
their newest intact checkpoint. No transformers needed: HF dirs here come from export_hf."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import levante
from levante.checkpoint import write_checksums
from levante.config import ConfigError, ModelConfig, TrainConfig
from levante.errors import LevanteError
from levante.interop.hf import export_hf, import_hf

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                  first_k_dense_replace=1)


def one_line_error(fn, *args, match: str, kind=LevanteError, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def make_checkpoint(directory, seed: int = 0, checksums: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = levante.Transformer(CFG).eval()
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.toml").write_text(TrainConfig(model=CFG).dumps())
    if checksums:
        write_checksums(directory)
    return model


@pytest.fixture
def hf_dir(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    return export_hf(tmp_path / "ckpt", tmp_path / "hf")


def rewrite_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def drop_tensor(file, name: str):
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(tensors, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------ bad paths


def test_missing_path(tmp_path):
    one_line_error(levante.from_pretrained, tmp_path / "nope", match="not found")


def test_dir_that_is_neither(tmp_path):
    msg = one_line_error(levante.from_pretrained, tmp_path, match="expected")
    assert "config.json" in msg and "config.toml" in msg
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))  # weights, no config
    one_line_error(levante.from_pretrained, tmp_path, match="not a model directory")


def test_file_instead_of_dir(tmp_path):
    (tmp_path / "f.txt").write_text("hi")
    one_line_error(levante.from_pretrained, tmp_path / "f.txt", match="expected a checkpoint directory")


# ------------------------------------------------------------------------------------ bad configs


def test_other_model_type(hf_dir):
    rewrite_config(hf_dir, model_type="llama")
    one_line_error(levante.from_pretrained, hf_dir, match="deepseek_v3")
    one_line_error(import_hf, hf_dir, hf_dir.parent / "out", match="deepseek_v3")


def test_config_json_not_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    one_line_error(levante.from_pretrained, hf_dir, match="not valid JSON")


def test_impossible_config_fields(hf_dir, tmp_path):
    rewrite_config(hf_dir, n_group=2, topk_group=3)
    one_line_error(levante.from_pretrained, hf_dir, match="topk_group", kind=ConfigError)
    # The same mistake in a Levante checkpoint's config.toml.
    ckpt = tmp_path / "lv"
    make_checkpoint(ckpt)
    text = (ckpt / "config.toml").read_text().replace("topk_group = 1", "topk_group = 5")
    (ckpt / "config.toml").write_text(text)
    one_line_error(levante.from_pretrained, ckpt, match="topk_group", kind=ConfigError)


def test_wrongly_typed_config_value(hf_dir):
    rewrite_config(hf_dir, hidden_size="wide")
    one_line_error(levante.from_pretrained, hf_dir, match="config.json", kind=ConfigError)


def test_quantized_checkpoint_is_refused(hf_dir):
    rewrite_config(hf_dir, quantization_config={"quant_method": "fp8"})
    one_line_error(levante.from_pretrained, hf_dir, match="quantized")


# ----------------------------------------------------------------------------------- bad weights


def test_truncated_safetensors(hf_dir, tmp_path):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    one_line_error(levante.from_pretrained, hf_dir, match="model.safetensors")
    one_line_error(import_hf, hf_dir, tmp_path / "out", match="model.safetensors")
    assert not (tmp_path / "out").exists()
    (hf_dir / "model.safetensors").write_bytes(b"\x00" * 3)
    one_line_error(levante.from_pretrained, hf_dir, match="not a readable safetensors file")


def test_truncated_levante_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "a")
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    (tmp_path / "a" / "model.safetensors").write_bytes(data[:-100])
    one_line_error(levante.from_pretrained, tmp_path / "a", match="model.safetensors")
    # With checksums.json the damage is caught before reading.
    make_checkpoint(tmp_path / "b", checksums=True)
    (tmp_path / "b" / "model.safetensors").write_bytes(data[:-100])
    one_line_error(levante.from_pretrained, tmp_path / "b", match="verification")


def test_missing_tensor(hf_dir, tmp_path):
    drop_tensor(hf_dir / "model.safetensors", "model.layers.1.mlp.gate.e_score_correction_bias")
    one_line_error(levante.from_pretrained, hf_dir, match="layers.1.mlp.gate.e_score_correction_bias",
                   kind=ConfigError)
    one_line_error(import_hf, hf_dir, tmp_path / "out", match="missing tensor", kind=ConfigError)
    make_checkpoint(tmp_path / "lv")
    drop_tensor(tmp_path / "lv" / "model.safetensors", "norm.weight")
    one_line_error(levante.from_pretrained, tmp_path / "lv", match="missing tensor 'norm.weight'")


def test_missing_expert(hf_dir):
    drop_tensor(hf_dir / "model.safetensors", "model.layers.1.mlp.experts.2.up_proj.weight")
    one_line_error(levante.from_pretrained, hf_dir, match="experts")


def test_unexpected_and_misshapen_tensors(hf_dir):
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    extra = {**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    save_file(extra, str(hf_dir / "model.safetensors"))
    one_line_error(levante.from_pretrained, hf_dir, match="unexpected tensor", kind=ConfigError)
    tensors["model.norm.weight"] = torch.ones(CFG.hidden_size + 1)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    one_line_error(levante.from_pretrained, hf_dir, match="'norm.weight' has shape", kind=ConfigError)


def test_pickle_only_and_missing_shard(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    one_line_error(levante.from_pretrained, hf_dir, match="safetensors only")
    (hf_dir / "pytorch_model.bin").unlink()
    one_line_error(levante.from_pretrained, hf_dir, match="no model.safetensors")
    shard = "model-00001-of-00002.safetensors"
    index = {"metadata": {"total_size": 1}, "weight_map": {"model.norm.weight": shard}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(levante.from_pretrained, hf_dir, match="model-00001-of-00002.safetensors")


# ------------------------------------------------------------------------------ export / import


def test_export_refuses_to_overwrite(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    one_line_error(export_hf, tmp_path / "ckpt", dst, match="not empty")
    assert (dst / "keep.txt").read_text() == "mine"
    export_hf(tmp_path / "ckpt", dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    # Nothing is left behind beside the destination: no temp or old dirs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    one_line_error(export_hf, tmp_path / "ckpt", tmp_path, match="holds the source", overwrite=True)
    one_line_error(export_hf, tmp_path / "ckpt", tmp_path / "ckpt", match="holds the source", overwrite=True)


def test_export_bad_arguments(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    one_line_error(export_hf, tmp_path / "ckpt", tmp_path / "o", dtype="int8", match="dtype")
    one_line_error(export_hf, tmp_path / "ckpt", tmp_path / "o", max_shard_bytes=0, match="max_shard_bytes")
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_nothing(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    drop_tensor(tmp_path / "ckpt" / "model.safetensors", "lm_head.weight")
    one_line_error(export_hf, tmp_path / "ckpt", tmp_path / "out", match="lm_head.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_import_wants_an_hf_dir(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    one_line_error(import_hf, tmp_path / "ckpt", tmp_path / "out", match="import expects a DeepseekV3 dir")


def test_import_writes_verifiable_checkpoint(hf_dir, tmp_path):
    out = import_hf(hf_dir, tmp_path / "lv")
    sums = json.loads((out / "checksums.json").read_text())["files"]
    assert set(sums) == {"model.safetensors", "config.toml"}
    assert TrainConfig.load(out / "config.toml").model == CFG
    (out / "config.toml").write_text((out / "config.toml").read_text() + "\n# edited\n")
    one_line_error(levante.from_pretrained, out, match="config.toml")


# ------------------------------------------------------------------------------------ run dirs


def write_step(run, step: int, seed: int, checksums: bool = True) -> torch.nn.Module:
    return make_checkpoint(run / "checkpoints" / f"step_{step:08d}", seed=seed, checksums=checksums)


def same_weights(a, b) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_run_dir_picks_newest_intact_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_step(run, 100, seed=1)
    second = write_step(run, 200, seed=2)
    assert same_weights(levante.from_pretrained(run), second)
    # Corrupt the newest: the loader falls back to step 100.
    bad = run / "checkpoints" / "step_00000200" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    first = levante.from_pretrained(run)
    assert not same_weights(first, second)
    assert same_weights(first, levante.from_pretrained(run / "checkpoints" / "step_00000100"))
    # A checkpoint without checksums.json is trusted (nothing to verify).
    third = write_step(run, 300, seed=3, checksums=False)
    assert same_weights(levante.from_pretrained(run / "checkpoints"), third)


def test_run_dir_with_only_corrupt_checkpoints(tmp_path):
    run = tmp_path / "run"
    write_step(run, 5, seed=1)
    (run / "checkpoints" / "step_00000005" / "config.toml").write_text("[model]\nvocab_size = 64\n")
    one_line_error(levante.from_pretrained, run, match="no valid checkpoint")


def test_trainer_checkpoint_layout(tmp_path):
    # A trainer checkpoint (with optimizer-free state here) loads and exports as it is written.
    from levante.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = levante.Transformer(CFG)
    path = save_checkpoint(tmp_path / "run", 7, model, None, {}, 2, config_text=TrainConfig(model=CFG).dumps())
    loaded = levante.from_pretrained(tmp_path / "run")
    assert same_weights(loaded, model) and loaded.config == CFG
    out = export_hf(path, tmp_path / "hf")
    assert same_weights(levante.from_pretrained(out), model)


def test_loaded_model_is_complete(tmp_path):
    # Meta-device loading must rebuild the non-persistent buffers and keep parameters trainable.
    model = make_checkpoint(tmp_path / "ckpt").eval()
    loaded = levante.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.inv_freq, model.inv_freq)
    assert all(not t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # dtype=bfloat16 rounds the weights but keeps routing (gate weight, bias) in fp32.
    half = levante.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    assert half.layers[1].mlp.gate.weight.dtype == torch.float32
    one_line_error(levante.from_pretrained, tmp_path / "ckpt", dtype="int4", match="dtype")
