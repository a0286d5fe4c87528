"""One typed config tree: model + data + optimizer + schedule + run, loaded from TOML.

Every section is a plain dataclass. `from_dict` rejects unknown keys by name (suggesting the closest
valid one) and `validate()` rejects impossible values with a one-line reason, so the CLI can turn a
`ConfigError` into a clean exit.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from levante.errors import LevanteError


class ConfigError(LevanteError, ValueError):
    """A user mistake in a config: the message is one line and names the field."""


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, or a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({str(e).splitlines()[0]})") from None


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a field type; TOML ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a dict, naming any unknown key and its closest valid spelling."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Dataclass -> TOML-ready dict (None values are dropped: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters; names follow the HF DeepseekV3 config.

    A dense (Llama-style FFN) model is the same code path with `n_routed_experts = 0`.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU layers
    moe_intermediate_size: int = 128  # each routed / shared expert
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    # Multi-head latent attention
    q_lora_rank: int | None = None  # None: plain q projection
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    first_k_dense_replace: int = 1
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing; 0 disables
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight; 0 disables
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3
    # Positions and the rest
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def validate(self) -> ModelConfig:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"model: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or absent")
        need(0 <= self.first_k_dense_replace, "first_k_dense_replace must be >= 0")
        need(self.intermediate_size > 0 or self.first_k_dense_replace == 0 and self.n_routed_experts > 0,
             "intermediate_size must be positive when the model has dense layers")
        need(self.n_routed_experts >= 0, "n_routed_experts must be >= 0")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                 f"({self.n_routed_experts})")
            need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2,
                 f"group-limited routing scores a group by its top-2 experts: need >= 2 experts per group, "
                 f"got {per_group}")
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group ({self.topk_group}) groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok ({self.num_experts_per_tok}) experts")
            need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor must be positive")
        need(self.bias_update_speed >= 0, "bias_update_speed must be >= 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be positive")
        for tok in ("bos_token_id", "eos_token_id"):
            need(0 <= getattr(self, tok) < self.vocab_size, f"{tok} must be inside the vocabulary")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", f"rope_scaling type must be 'yarn', got {kind!r}")
            known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim"}
            for key in rs:
                need(key in known, f"unknown rope_scaling key '{key}'{_closest(key, known)}")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim"):
                value = rs.get(key)
                need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                     f"rope_scaling.{key} must be a number, got {value!r}")
            need(float(rs.get("factor", 0)) >= 1.0, "rope_scaling.factor must be >= 1")
            need(int(rs.get("original_max_position_embeddings", 0)) > 0,
                 "rope_scaling.original_max_position_embeddings must be positive")
        return self

    # -- presets and files

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}'{_closest(name, PRESETS)}; "
                              f"choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name]).validate()

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """A `[model]` table: optional `preset = NAME` plus overrides of any field."""
        if not isinstance(data, dict):
            raise ConfigError(f"model: expected a table, got {data!r}")
        data = dict(data)
        if "preset" in data and not isinstance(data["preset"], str):
            raise ConfigError(f"model.preset must be a preset name, got {data['preset']!r}")
        base = cls.preset(data.pop("preset")) if "preset" in data else cls()
        override = from_dict(cls, data, "model")
        explicit = {k: getattr(override, k) for k in data}
        return dataclasses.replace(base, **explicit).validate()

    @classmethod
    def from_toml(cls, path: str | Path) -> ModelConfig:
        """The `[model]` table of a training config or of a checkpoint's config.toml.

        The one reader of model tables: only `[model]` is validated, so a checkpoint's other sections
        (data paths, optimizer) need not be valid on the machine that loads it.
        """
        data = read_toml(path)
        if not isinstance(data.get("model"), dict):
            raise ConfigError(f"{path}: no [model] table")
        try:
            return cls.from_dict(data["model"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return to_dict(self)


def _tiny() -> ModelConfig:
    # ~14M total: the CPU quickstart model (hidden 256, 6 layers, 16 experts top-2). Its runs are a
    # few hundred steps: balance the router faster than DeepSeek's 1e-3 (tuned for trillions of tokens).
    return ModelConfig(bias_update_speed=0.01)


PRESETS: dict[str, ModelConfig] = {
    "tiny": _tiny(),
    # ~160M total / ~44M active: CPU experiments.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=10, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=192,
        qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48, first_k_dense_replace=1,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.0, max_position_embeddings=4096,
    ),
    "1b": ModelConfig(
        vocab_size=65536, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=256,
        num_hidden_layers=16, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=288,  # 288+32: vLLM's 320
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
    ),
    # DeepSeek-V2-Lite shape (15.7B total / 2.4B active), V3-style sigmoid routing (Moonlight).
    "16b": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096,
    ),
    # The sovereign flagship: ~100B total, ~10B active.
    "100b": ModelConfig(
        vocab_size=131072, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=42, num_attention_heads=32, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=2,
        n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
    ),
    # The paper's 671B / 37B (DeepSeek-V3 technical report, table 1 of the config).
    "deepseek-v3": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # Dense baselines: same attention, tokenizer and data; every layer a SwiGLU FFN.
    "dense-tiny": ModelConfig(intermediate_size=1024, n_routed_experts=0, first_k_dense_replace=6),
    "dense-small": ModelConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
        num_attention_heads=8, q_lora_rank=256, kv_lora_rank=192, qk_nope_head_dim=48,
        qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=0, first_k_dense_replace=10,
        max_position_embeddings=4096,
    ),
}


# ------------------------------------------------------------------------------------ training tree


@dataclass
class DataConfig:
    tokenizer: str = ""  # tokenizer.json
    train: str = ""  # token-shard directory written by `levante tokenize`
    valid: str = ""  # held-out shard directory (optional)
    seq_len: int = 256
    # Language mixture: p(lang) ∝ windows(lang) ** mix_temperature (1 = natural, 0 = uniform), or
    # ∝ mix_weights[lang] when given (languages not named are not sampled).
    mix_temperature: float = 1.0
    mix_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "muon"  # "muon" (Muon on 2-D hidden matrices + AdamW on the rest) or "adamw"
    lr: float = 3e-3  # AdamW learning rate
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Muon updates are rescaled to AdamW's RMS (Moonlight), so the two can share a learning rate.
    muon_lr: float = 3e-3
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    # Newton–Schulz precision: "auto" (bf16 where the hardware is fast in it, else fp32), "bfloat16" or
    # "float32" (float-rounding agreement between runs, e.g. N ranks against 1, at some speed on GPU).
    muon_ns_dtype: str = "auto"
    grad_clip: float = 1.0  # 0 disables


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # "wsd", "cosine" or "constant"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    min_lr_ratio: float = 0.1


@dataclass
class RunConfig:
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: bool = False
    # Loss-spike / NaN guard (train/guard.py): skip steps beyond spike_sigma over spike_window steps.
    skip_spikes: bool = True
    spike_window: int = 128
    spike_sigma: float = 6.0
    max_consecutive_skips: int = 8


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass
class ParallelConfig:
    """How the run is spread over ranks (levante.parallel); the world size comes from torchrun.

    The data-parallel ranks shard weights with FSDP2; `ep` of them at a time also split the routed
    experts among themselves (expert parallelism is carved out of data parallelism), so every rank
    still trains its own slice of the global batch.
    """

    ep: int = 1  # expert-parallel degree: must divide the world size and n_routed_experts
    activation_checkpointing: str = "none"  # "none", "full" (recompute each block), "selective" (MoE/MLP only)
    compile: bool = False  # torch.compile each block (GPU; on CPU only when asked)


@dataclass
class TaskConfig:
    # "pretrain": token shards. "sft": data.train/valid are chat jsonl (loss on assistant tokens only).
    # "dpo": data.train/valid are preference jsonl; the frozen reference is the init_from model.
    kind: str = "pretrain"
    init_from: str = ""  # Levante checkpoint / run dir / DeepseekV3 HF dir; its model replaces [model]
    beta: float = 0.1  # DPO: strength of the KL anchor to the reference


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        sections = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in sections:
                raise ConfigError(f"unknown config section '{key}'{_closest(key, sections)}")
        cfg = cls(
            model=ModelConfig.from_dict(data.get("model", {})),
            data=from_dict(DataConfig, data.get("data", {}), "data"),
            optim=from_dict(OptimConfig, data.get("optim", {}), "optim"),
            schedule=from_dict(ScheduleConfig, data.get("schedule", {}), "schedule"),
            run=from_dict(RunConfig, data.get("run", {}), "run"),
            task=from_dict(TaskConfig, data.get("task", {}), "task"),
            parallel=from_dict(ParallelConfig, data.get("parallel", {}), "parallel"),
        )
        return cfg.validate()

    def validate(self) -> TrainConfig:
        self.model.validate()
        checks = [
            (self.data.seq_len > 0, "data.seq_len must be positive"),
            (self.data.mix_temperature >= 0, "data.mix_temperature must be >= 0"),
            (all(isinstance(w, (int, float)) and w >= 0 for w in self.data.mix_weights.values()),
             "data.mix_weights must be non-negative numbers"),
            (self.data.seq_len <= self.model.max_position_embeddings,
             f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
             f"({self.model.max_position_embeddings})"),
            (self.optim.name in ("muon", "adamw"),
             f"optim.name must be 'muon' or 'adamw', got '{self.optim.name}'"),
            (self.optim.lr > 0 and self.optim.muon_lr > 0, "learning rates must be positive"),
            (self.optim.muon_ns_dtype in ("auto", "bfloat16", "float32"),
             f"optim.muon_ns_dtype must be 'auto', 'bfloat16' or 'float32', got '{self.optim.muon_ns_dtype}'"),
            (len(self.optim.betas) == 2, "optim.betas must have two values"),
            (self.schedule.name in ("wsd", "cosine", "constant"),
             f"schedule.name must be 'wsd', 'cosine' or 'constant', got '{self.schedule.name}'"),
            (0 <= self.schedule.decay_fraction <= 1, "schedule.decay_fraction must be in [0, 1]"),
            (self.run.steps > 0, "run.steps must be positive"),
            (self.run.micro_batch_size > 0 and self.run.grad_accum > 0,
             "run.micro_batch_size and run.grad_accum must be positive"),
            (self.run.keep_last >= 1, "run.keep_last must be >= 1"),
            (self.run.log_every >= 1 and self.run.eval_batches >= 1,
             "run.log_every and run.eval_batches must be >= 1"),
            (self.run.eval_every >= 0 and self.run.ckpt_every >= 0,
             "run.eval_every and run.ckpt_every must be >= 0 (0: only at the end)"),
            (self.run.device in ("auto", "cpu", "cuda"), "run.device must be auto, cpu or cuda"),
            (self.task.kind in ("pretrain", "sft", "dpo"),
             f"task.kind must be 'pretrain', 'sft' or 'dpo', got '{self.task.kind}'"),
            (self.task.kind != "dpo" or bool(self.task.init_from),
             "task.kind = 'dpo' needs task.init_from (the SFT model, also the frozen reference)"),
            (self.task.beta > 0, "task.beta must be positive"),
            (self.run.spike_window >= 2 and self.run.spike_sigma > 0 and self.run.max_consecutive_skips >= 1,
             "run.spike_window must be >= 2, run.spike_sigma > 0 and run.max_consecutive_skips >= 1"),
            (self.parallel.ep >= 1, f"parallel.ep must be >= 1, got {self.parallel.ep}"),
            (self.parallel.ep <= 1 or (self.model.n_routed_experts > 0
                                       and self.model.n_routed_experts % self.parallel.ep == 0),
             f"parallel.ep ({self.parallel.ep}) must divide model.n_routed_experts "
             f"({self.model.n_routed_experts})"),
            (self.parallel.activation_checkpointing in ACTIVATION_CHECKPOINTING,
             f"parallel.activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
             f"got '{self.parallel.activation_checkpointing}'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_toml(path))

    def to_dict(self) -> dict:
        return to_dict(self)

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())
