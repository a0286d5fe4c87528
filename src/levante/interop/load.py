"""Read model checkpoints from disk: Levante checkpoint dirs, trainer run dirs, DeepseekV3 HF dirs.

`from_pretrained` is the public `levante.from_pretrained`. Everything is safetensors + JSON/TOML
(never pickle). The model is built on the meta device and the loaded tensors are assigned into it,
so loading holds one copy of the weights, not two.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from levante.checkpoint.layout import CONFIG_FILE
from levante.checkpoint.layout import MODEL_FILE as WEIGHTS
from levante.checkpoint.resolve import Checkpoint, resolve_checkpoint
from levante.config import ConfigError, ModelConfig
from levante.errors import LevanteError
from levante.interop.hf_mapping import config_from_hf, hf_to_levante
from levante.model.rope import rope_frequencies
from levante.model.transformer import Transformer

log = logging.getLogger(__name__)

HF_INDEX = "model.safetensors.index.json"
# Routing runs in fp32 (as in DeepSeek's release and transformers): never round these down.
FP32_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------- reading tensors


def _load(handle, name: str, file: Path, dtype: torch.dtype | None, device) -> torch.Tensor:
    try:
        t = handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LevanteError(f"{file}: cannot read tensor '{name}' ({_one_line(e)})") from None
    if dtype is not None and t.is_floating_point() and not name.endswith(FP32_TENSORS):
        t = t.to(dtype)
    return t.to(device)


class _Files:
    """Open safetensors files on demand (memory-mapped) and name the file in every error."""

    def __init__(self, stack: ExitStack):
        self.stack, self.handles, self._keys = stack, {}, {}

    def __call__(self, file: Path):
        if file not in self.handles:
            try:
                self.handles[file] = self.stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise LevanteError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None
        return self.handles[file]

    def keys(self, file: Path) -> set[str]:
        if file not in self._keys:
            self._keys[file] = set(self(file).keys())
        return self._keys[file]


def load_levante_config(ckpt: Path) -> ModelConfig:
    """The model config of a Levante checkpoint dir (its config.toml)."""
    if not (ckpt / CONFIG_FILE).is_file():
        raise LevanteError(f"{ckpt} has no {CONFIG_FILE}")
    return ModelConfig.from_toml(ckpt / CONFIG_FILE)


def read_hf_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LevanteError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise LevanteError(f"{path}: expected a JSON object")
    if raw.get("quantization_config"):
        raise LevanteError(f"{path}: quantized checkpoints are not supported; dequantize to bf16 first")
    try:
        return config_from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).removeprefix('config.json ')}") from None
    except (TypeError, ValueError, KeyError) as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{path}: invalid DeepseekV3 config ({_one_line(e)})") from None


def hf_weight_map(hf_dir: Path, files: _Files) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (from the index, or the single file)."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            out = {str(k): hf_dir / str(v) for k, v in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LevanteError(f"{index}: not a valid safetensors index ({_one_line(e)})") from None
        for file in sorted(set(out.values())):
            if not file.is_file():
                raise LevanteError(f"shard {file.name} listed in {index} is missing")
        return out
    if (hf_dir / WEIGHTS).is_file():
        return {name: hf_dir / WEIGHTS for name in sorted(files.keys(hf_dir / WEIGHTS))}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise LevanteError(f"{hf_dir} has only pickled PyTorch weights; Levante reads safetensors only")
    raise LevanteError(f"{hf_dir} has no {WEIGHTS} or {HF_INDEX}")


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def read_hf(hf_dir: Path, dtype: torch.dtype | None = None, device="cpu"):
    """(ModelConfig, Levante state dict) from a DeepseekV3 HF dir, converted one layer at a time.

    MTP layers are kept when present; a config announcing MTP without its weights (transformers'
    save_pretrained drops them) gives a config with num_nextn_predict_layers = 0.
    """
    cfg = read_hf_config(hf_dir)
    with ExitStack() as stack:
        files = _Files(stack)
        where = hf_weight_map(hf_dir, files)
        n_layers = cfg.num_hidden_layers
        if cfg.num_nextn_predict_layers and not any(_layer_of(n) >= n_layers for n in where):
            log.info("%s announces %d MTP layer(s) but holds no MTP weights: loading without MTP",
                     hf_dir, cfg.num_nextn_predict_layers)
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
        groups: dict[int, list[str]] = {}
        for name in where:
            groups.setdefault(_layer_of(name), []).append(name)
        state: dict[str, torch.Tensor] = {}
        for layer in sorted(groups):
            # One layer's raw tensors at a time: experts are stacked, then the originals are dropped.
            raw = {}
            for name in groups[layer]:
                file = where[name]
                if name not in files.keys(file):
                    raise LevanteError(f"tensor '{name}' is listed in {HF_INDEX} but not in {file.name}")
                raw[name] = _load(files(file), name, file, dtype, device)
            try:
                state.update(hf_to_levante(raw, cfg))
            except ConfigError as e:
                raise ConfigError(f"{hf_dir}: {e}") from None
    if cfg.tie_word_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return cfg, state


def read_levante(ckpt: Path, dtype: torch.dtype | None = None, device="cpu"):
    """(ModelConfig, state dict) from a Levante checkpoint dir."""
    cfg = load_levante_config(ckpt)
    with ExitStack() as stack:
        files = _Files(stack)
        file = ckpt / WEIGHTS
        state = {n: _load(files(file), n, file, dtype, device) for n in sorted(files.keys(file))}
    if cfg.tie_word_embeddings:
        # A tied checkpoint may store the shared matrix once, under either name.
        shared = state.get("embed_tokens.weight", state.get("lm_head.weight"))
        if shared is not None:
            state["embed_tokens.weight"] = state["lm_head.weight"] = shared
    return cfg, state


def read_checkpoint(path: str | Path | Checkpoint, dtype: torch.dtype | None = None, device="cpu"):
    """(ModelConfig, Levante state dict, Checkpoint) for any supported path; the state is validated."""
    ckpt = path if isinstance(path, Checkpoint) else resolve_checkpoint(path)
    reader = read_levante if ckpt.kind == "levante" else read_hf
    cfg, state = reader(ckpt.path, dtype, device)
    check_state(state, cfg, ckpt.path)
    return cfg, state, ckpt


# ------------------------------------------------------------------------------------ validating


def meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source) -> None:
    """Names and shapes must match the model the config describes, exactly."""
    expected = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ConfigError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) "
                          f"for this config")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ConfigError(f"{source}: tensor '{k}' has shape {list(state[k].shape)}, "
                              f"the config expects {list(shape)}")


# --------------------------------------------------------------------------------------- loading


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in named:
        raise LevanteError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return named[str(dtype)]


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype=None) -> Transformer:
    """Load a Levante checkpoint dir, a trainer run dir (newest verified checkpoint) or a DeepseekV3
    HF dir as an eval-mode `Transformer`. `dtype=None` keeps the checkpoint's dtypes."""
    device = torch.device(device)
    cfg, state, _ = read_checkpoint(path, _as_dtype(dtype), device)
    model = meta_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
    del state
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers are not in checkpoints: rebuild them on the target device.
    model.inv_freq = rope_frequencies(cfg)[0].to(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensor '{left[0]}' was not materialised")
    return model.eval()
