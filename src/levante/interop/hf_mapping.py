"""Pure translations between Levante and the DeepseekV3 checkpoint layout (config + tensor names).

On disk DeepSeek/HF keep one tensor per expert (`mlp.experts.E.{gate,up,down}_proj.weight`) and put
MTP modules after the main layers (`model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.*}`).
Levante stacks experts ([E, 2I, H] gate+up, [E, H, I] down) and keeps MTP in `mtp.k`.
Splitting and concatenating are exact, so import -> export reproduces every tensor bit for bit.
"""

from __future__ import annotations

import re

import torch

from levante.config import ConfigError, ModelConfig

# HF keys that map one-to-one onto ModelConfig fields.
_SAME_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "first_k_dense_replace", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
    "num_nextn_predict_layers",
)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """A config.json that transformers (DeepseekV3ForCausalLM) and vLLM read as DeepSeek-V3."""
    out = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{k: getattr(cfg, k) for k in _SAME_KEYS},
        "num_key_value_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_interleave": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "ep_size": 1,
        "aux_loss_alpha": cfg.aux_loss_alpha,
        "seq_aux": True,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if cfg.n_routed_experts == 0:
        # Dense model: every layer is a dense MLP; keep the MoE keys well-formed for readers
        # (transformers' config validation wants an int here, not null).
        out.update(n_routed_experts=0, first_k_dense_replace=cfg.num_hidden_layers,
                   num_experts_per_tok=None, n_group=1, topk_group=1)
    if cfg.rope_scaling is not None:
        rs = dict(cfg.rope_scaling)
        kind = rs.pop("rope_type", None) or rs.pop("type", "yarn")
        rs.pop("type", None)
        out["rope_scaling"] = {"type": kind, "rope_type": kind, **rs}
    return out


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a DeepseekV3 config.json dict (legacy `rope_scaling` or v5 `rope_parameters`)."""
    if hf.get("model_type") not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, not 'deepseek_v3'")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"unsupported scoring_func {hf.get('scoring_func')!r}: Levante routes with sigmoid")
    kv_heads = hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    if kv_heads != hf.get("num_attention_heads"):
        raise ConfigError("num_key_value_heads differs from num_attention_heads: not an MLA checkpoint")
    fields = {k: hf[k] for k in _SAME_KEYS if k in hf and hf[k] is not None}
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    if not hf.get("n_routed_experts"):
        fields.update(n_routed_experts=0, first_k_dense_replace=hf.get("num_hidden_layers", 0))
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    fields["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "yarn":
            raise ConfigError(f"unsupported rope scaling {kind!r}: Levante implements YaRN")
        fields["rope_scaling"] = {k: v for k, v in scaling.items()
                                  if k in ("factor", "original_max_position_embeddings", "beta_fast",
                                           "beta_slow", "mscale", "mscale_all_dim") and v is not None}
        fields["rope_scaling"]["type"] = "yarn"
    for int_key in ("bos_token_id", "eos_token_id"):
        if fields.get(int_key) is None:
            fields.pop(int_key, None)
    cfg = ModelConfig(**{k: v for k, v in fields.items()})
    if not (0 <= cfg.bos_token_id < cfg.vocab_size):
        cfg.bos_token_id = 0
    if not (0 <= cfg.eos_token_id < cfg.vocab_size):
        cfg.eos_token_id = min(1, cfg.vocab_size - 1)
    return cfg.validate()


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _hf_prefix(name: str, n_layers: int) -> str:
    """Levante name (not an expert stack) -> HF name."""
    if name == "lm_head.weight":
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            rest = rest[len("block."):]
        elif rest == "norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{layer}.{rest}"
    return f"model.{name}"


def levante_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Levante state dict -> DeepSeek/HF tensors (per-expert, MTP after the main layers)."""
    out: dict[str, torch.Tensor] = {}
    inter = cfg.moe_intermediate_size
    for name, t in state.items():
        m = _EXPERT.match(name)
        if m:
            base = _hf_prefix(m.group(1) + ".x", cfg.num_hidden_layers)[: -len(".x")]
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{base}.{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                    out[f"{base}.{e}.up_proj.weight"] = t[e, inter:].contiguous()
                else:
                    out[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
            continue
        out[_hf_prefix(name, cfg.num_hidden_layers)] = t.contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        # DeepSeek's MTP layers carry their own copies of the shared embedding and head.
        layer = cfg.num_hidden_layers + k
        out[f"model.layers.{layer}.embed_tokens.weight"] = state["embed_tokens.weight"].contiguous()
        out[f"model.layers.{layer}.shared_head.head.weight"] = state["lm_head.weight"].contiguous()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _levante_name(hf_name: str, n_layers: int) -> str | None:
    """HF name -> Levante name; None for tensors Levante derives from others (MTP copies)."""
    if hf_name == "lm_head.weight":
        return hf_name
    if not hf_name.startswith("model."):
        raise ConfigError(f"unexpected tensor '{hf_name}' in a DeepseekV3 checkpoint")
    name = hf_name[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        if rest == "shared_head.norm.weight":
            return f"mtp.{k}.norm.weight"
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            return f"mtp.{k}.{rest}"
        return f"mtp.{k}.block.{rest}"
    return name


def hf_to_levante(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """DeepSeek/HF tensors -> Levante state dict (experts stacked)."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for hf_name, t in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = _levante_name(hf_name, cfg.num_hidden_layers)
        if name is None:
            continue
        m = pattern.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        out[name] = t
    for base, per_expert in experts.items():
        n = len(per_expert)
        if sorted(per_expert) != list(range(n)) or any(len(v) != 3 for v in per_expert.values()):
            raise ConfigError(f"incomplete expert tensors under '{base}'")
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[e]["gate_proj"], per_expert[e]["up_proj"]), dim=0) for e in range(n)])
        out[f"{base}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
    return out
