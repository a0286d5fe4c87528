"""The numerical oracle: Levante and transformers' DeepseekV3ForCausalLM give the same logits.

Random tiny configs cover every routing and attention variant Levante implements (q_lora on/off,
group-limited routing, dense prefixes, shared experts, norm_topk_prob, routed scaling, YaRN with
each mscale variant on sequences longer than the original context). Weights are random with
perturbed norms and a non-zero routing bias, so a dropped or misnamed tensor cannot hide behind
its default value.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import levante  # noqa: E402
from levante.config import ModelConfig, TrainConfig  # noqa: E402
from levante.interop.hf import export_hf, import_hf  # noqa: E402

TOL = 1e-4
N_CONFIGS = 14
# Each YaRN variant as DeepSeek configs spell it; None is plain RoPE.
YARN_VARIANTS = [
    None,
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 8.0, "original_max_position_embeddings": 12, "mscale": 0.707},  # mscale_all_dim absent
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8,
     "beta_fast": 16.0, "beta_slow": 2.0},
    {"factor": 2.0, "original_max_position_embeddings": 20, "mscale_all_dim": 1.0},  # mscale absent
]


def oracle_specs(n: int = N_CONFIGS, seed: int = 2024) -> list[dict]:
    """Tiny configs as ModelConfig fields; feature switches cycle with coprime periods so every
    combination class appears, sizes are drawn from a seeded generator."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        n_experts = rng.choice([4, 6, 8])
        groups = [g for g in (2, 3, 4) if n_experts % g == 0 and n_experts // g >= 2]
        n_group = rng.choice(groups) if i % 2 == 0 else 1
        topk_group = rng.randint(1, n_group - 1) if n_group > 1 else 1
        top_k = rng.randint(1, min(3, topk_group * (n_experts // n_group)))
        first_dense = i % 3
        layers = max(rng.randint(2, 4), first_dense + 1)
        spec = dict(
            vocab_size=rng.randint(280, 320), hidden_size=rng.choice([32, 48, 64]),
            intermediate_size=rng.choice([48, 64, 96]), moe_intermediate_size=rng.choice([16, 24, 32]),
            num_hidden_layers=layers, num_attention_heads=rng.choice([2, 4]),
            q_lora_rank=None if (i // 2) % 2 == 0 else rng.choice([16, 24]),
            kv_lora_rank=rng.choice([16, 32]), qk_nope_head_dim=rng.choice([8, 16]),
            qk_rope_head_dim=rng.choice([4, 8]), v_head_dim=rng.choice([8, 16]),
            first_k_dense_replace=first_dense, n_routed_experts=n_experts, num_experts_per_tok=top_k,
            n_shared_experts=1 + (i // 3) % 2, n_group=n_group, topk_group=topk_group,
            norm_topk_prob=i % 4 != 1, routed_scaling_factor=rng.choice([1.0, 1.5, 2.5]) if i else 2.5,
            num_nextn_predict_layers=i % 2,  # transformers saves no MTP weights: import must cope
            max_position_embeddings=128, rope_theta=rng.choice([10000.0, 50000.0]),
            rope_scaling=YARN_VARIANTS[i % len(YARN_VARIANTS)], rms_norm_eps=1e-6,
            tie_word_embeddings=i == 7,
        )
        specs.append(spec)
    return specs


SPECS = oracle_specs()


def levante_config(spec: dict) -> ModelConfig:
    rs = spec["rope_scaling"]
    return ModelConfig(**{**spec, "rope_scaling": None if rs is None else {"type": "yarn", **rs}})


def hf_config(spec: dict) -> DeepseekV3Config:
    kw = {k: v for k, v in spec.items() if k != "rope_scaling"}
    rs = spec["rope_scaling"]
    rope = {"rope_type": "default"} if rs is None else {"rope_type": "yarn", **rs}
    return DeepseekV3Config(**kw, num_key_value_heads=spec["num_attention_heads"],
                            rope_parameters={**rope, "rope_theta": spec["rope_theta"]})


def seq_len(spec: dict) -> int:
    rs = spec["rope_scaling"]
    return 24 if rs is None else 2 * rs["original_max_position_embeddings"] + 7  # past the original context


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, norms away from 1, and a non-zero routing bias (works on both models)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def input_ids(spec: dict, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec["vocab_size"], (2, seq_len(spec)), generator=g)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def save_levante_checkpoint(model, directory) -> None:
    """A Levante checkpoint dir as the trainer lays it out (weights + TrainConfig TOML)."""
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.toml").write_text(TrainConfig(model=model.config).dumps())


def load_hf(directory, dtype=torch.float32):
    model, info = DeepseekV3ForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval(), info


# ------------------------------------------------------------------------------------- the cases


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """Per config index: a transformers save_pretrained dir, inputs, reference logits (built once)."""
    cache = {}

    def build(i: int):
        if i not in cache:
            spec = SPECS[i]
            torch.manual_seed(i)
            model = DeepseekV3ForCausalLM(hf_config(spec)).eval()
            randomize(model, seed=100 + i)
            hf_dir = tmp_path_factory.mktemp(f"hf{i}")
            model.save_pretrained(str(hf_dir))
            ids = input_ids(spec, seed=i)
            with torch.no_grad():
                ref = model(ids).logits
            cache[i] = (hf_dir, ids, ref)
        return cache[i]

    return build


def test_specs_cover_every_variant():
    cfgs = [levante_config(s).validate() for s in SPECS]
    assert {c.q_lora_rank is None for c in cfgs} == {True, False}
    assert any(c.n_group > 1 and c.topk_group < c.n_group for c in cfgs)
    assert {c.first_k_dense_replace for c in cfgs} == {0, 1, 2}
    assert {c.n_shared_experts for c in cfgs} == {1, 2}
    assert {c.norm_topk_prob for c in cfgs} == {True, False}
    assert any(c.routed_scaling_factor != 1.0 for c in cfgs)
    yarn = [c.rope_scaling for c in cfgs if c.rope_scaling]
    assert any("mscale_all_dim" not in r for r in yarn) and any("mscale" not in r for r in yarn)
    assert any("mscale" in r and "mscale_all_dim" in r for r in yarn)
    for spec in SPECS:
        if spec["rope_scaling"]:
            assert seq_len(spec) > spec["rope_scaling"]["original_max_position_embeddings"]


@pytest.mark.parametrize("i", range(N_CONFIGS))
def test_import_matches_transformers_and_round_trips(i, hf_case, tmp_path):
    hf_dir, ids, ref = hf_case(i)
    # (a) import -> Levante checkpoint -> from_pretrained: same logits as transformers.
    lv_dir = import_hf(hf_dir, tmp_path / "levante")
    assert {"model.safetensors", "config.toml", "checksums.json"} <= {p.name for p in lv_dir.iterdir()}
    model = levante.from_pretrained(lv_dir)
    assert not model.training
    with torch.no_grad():
        assert max_abs(model(ids).logits, ref) < TOL
        # ... and straight from the HF dir.
        assert max_abs(levante.from_pretrained(hf_dir)(ids).logits, ref) < TOL

    # (c) import -> export reproduces the original save bit for bit, same names.
    out = export_hf(lv_dir, tmp_path / "export")
    original, exported = read_all(hf_dir), read_all(out)
    assert set(exported) == set(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name


@pytest.mark.parametrize("i", [0, 3, 4, 9, 11])
def test_levante_export_loads_in_transformers(i, tmp_path):
    # (b) random Levante model -> checkpoint -> export -> transformers: same logits.
    spec = SPECS[i]
    torch.manual_seed(i)
    model = levante.Transformer(levante_config(spec)).eval()
    randomize(model, seed=200 + i)
    save_levante_checkpoint(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, [1])  # no tokenizer: no <|end|>
    hf, info = load_hf(out)
    ids = input_ids(spec, seed=i)
    with torch.no_grad():
        assert max_abs(hf(ids).logits, model(ids).logits) < TOL


def test_dense_export_loads_in_transformers(tmp_path):
    # A model without routed experts (the dense-tiny preset's shape): every layer a dense MLP.
    spec = {**SPECS[0], "n_routed_experts": 0}
    model = levante.Transformer(levante_config(spec)).eval()
    randomize(model, seed=300)
    save_levante_checkpoint(model, tmp_path / "ckpt")
    hf, _ = load_hf(export_hf(tmp_path / "ckpt", tmp_path / "hf"))
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in hf.model.layers)
    ids = input_ids(spec, seed=0)
    with torch.no_grad():
        assert max_abs(hf(ids).logits, model(ids).logits) < TOL
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    reimported = levante.from_pretrained(back)
    assert reimported.config.n_routed_experts == 0
    with torch.no_grad():
        assert max_abs(reimported(ids).logits, model(ids).logits) < TOL


def mtp_model(tmp_path, depth: int = 1):
    spec = {**SPECS[5], "num_nextn_predict_layers": depth}
    model = levante.Transformer(levante_config(spec)).eval()
    randomize(model, seed=77)
    save_levante_checkpoint(model, tmp_path / "ckpt")
    return spec, model


def test_mtp_export_layout_and_reimport(tmp_path):
    # (d) MTP modules go after the main layers in DeepSeek's layout and come back unchanged.
    spec, model = mtp_model(tmp_path, depth=2)
    n_layers = spec["num_hidden_layers"]
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    tensors = read_all(out)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 2
    for k in range(2):
        p = f"model.layers.{n_layers + k}"
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                       "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight",
                       "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight"):
            assert f"{p}.{suffix}" in tensors, suffix
        assert torch.equal(tensors[f"{p}.embed_tokens.weight"], model.embed_tokens.weight)
        assert torch.equal(tensors[f"{p}.shared_head.head.weight"], model.lm_head.weight)
        assert torch.equal(tensors[f"{p}.eh_proj.weight"], model.mtp[k].eh_proj.weight)
        assert torch.equal(tensors[f"{p}.shared_head.norm.weight"], model.mtp[k].norm.weight)
    assert not any(k.startswith(f"model.layers.{n_layers + 2}.") for k in tensors)

    back = levante.from_pretrained(import_hf(out, tmp_path / "back"))
    assert back.config.num_nextn_predict_layers == 2
    original = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    reloaded = back.state_dict()
    assert original and all(torch.equal(reloaded[k], v) for k, v in original.items())

    # transformers has no MTP modules: it must still load the main model exactly.
    hf, info = load_hf(out)
    assert all(k.startswith(tuple(f"model.layers.{n_layers + k}." for k in range(2)))
               for k in info["unexpected_keys"])
    ids = input_ids(spec, seed=5)
    with torch.no_grad():
        assert max_abs(hf(ids).logits, model(ids).logits) < TOL


def test_export_without_mtp(tmp_path):
    spec, _ = mtp_model(tmp_path)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", include_mtp=False)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    layers = {int(k.split(".")[2]) for k in read_all(out) if k.startswith("model.layers.")}
    assert max(layers) == spec["num_hidden_layers"] - 1


def test_sharded_export_loads_everywhere(tmp_path):
    # (e) tiny shards: an index with every tensor, and both loaders read it.
    spec = SPECS[3]
    model = levante.Transformer(levante_config(spec)).eval()
    randomize(model, seed=33)
    save_levante_checkpoint(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert set(index["weight_map"].values()) == set(shards)
    tensors = read_all(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # only oversized single tensors may exceed the limit
        with safe_open(str(out / shard), "pt") as f:
            names = list(f.keys())
            assert len(names) == 1 or sum(f.get_tensor(n).nbytes for n in names) <= 40_000

    ids = input_ids(spec, seed=3)
    with torch.no_grad():
        want = model(ids).logits
        assert max_abs(load_hf(out)[0](ids).logits, want) < TOL
        assert max_abs(levante.from_pretrained(out)(ids).logits, want) < TOL
    back = levante.from_pretrained(import_hf(out, tmp_path / "back")).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_bf16_export(tmp_path):
    # (f) bf16 weights, fp32 routing bias (as DeepSeek ships it); both loaders agree on them.
    spec = SPECS[2]
    model = levante.Transformer(levante_config(spec)).eval()
    randomize(model, seed=22)
    save_levante_checkpoint(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, t in read_all(out).items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name
    ids = input_ids(spec, seed=2)
    with torch.no_grad():
        hf = load_hf(out, dtype=torch.float32)[0](ids).logits
        ours = levante.from_pretrained(out, dtype="float32")(ids).logits
        assert max_abs(hf, ours) < TOL
        # Rounding to bf16 moves the logits only a little on average (a near-tie in routing may
        # flip an expert for a token or two, so the max is not a fair measure here).
        full = model(ids).logits
        assert (ours - full).abs().mean() < 0.03 * full.abs().mean()
        native = levante.from_pretrained(out)
        assert native.embed_tokens.weight.dtype == torch.bfloat16
        assert native.layers[-1].mlp.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.isfinite(native(ids).logits).all()


def test_tokenizer_files_exported_and_passed_through(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from levante.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "bonjour le monde", "hola mundo"] * 20, trainer)
    model = levante.Transformer(levante_config(SPECS[1]))
    save_levante_checkpoint(model, tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))

    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "hello monde, ¿qué tal? ☃"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1)

    # HF tokenizer files survive import -> export byte for byte.
    again = export_hf(import_hf(out, tmp_path / "lv"), tmp_path / "hf2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
