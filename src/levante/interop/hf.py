"""`levante export hf` / `levante import hf`: Levante checkpoints <-> DeepseekV3 HF directories.

Export writes what transformers and vLLM load as `DeepseekV3ForCausalLM`: safetensors shards with
`{"format": "pt"}` metadata (+ an index when sharded), config.json, generation_config.json and the
tokenizer files. Import writes a Levante checkpoint (model.safetensors, config.toml, checksums.json).
Both build the result in a temp dir next to the destination and rename it into place, so a crash
never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from levante.checkpoint import write_checksums
from levante.checkpoint.resolve import Checkpoint, resolve_checkpoint
from levante.config import ModelConfig, TrainConfig
from levante.errors import LevanteError
from levante.interop.hf_mapping import config_to_hf, levante_to_hf
from levante.interop.load import HF_INDEX, WEIGHTS, read_checkpoint
from levante.util import fsync_file, staged_dir, write_durable

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers counts it
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_EXPORT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16}
# DeepSeek's released checkpoints keep the routing bias in fp32: bf16 would move expert selection.
_KEEP_FP32 = ("e_score_correction_bias",)


# ------------------------------------------------------------------------------ atomic directories


def _write_json(path: Path, obj) -> None:
    write_durable(path, (json.dumps(obj, indent=2) + "\n").encode())


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise LevanteError(f"destination {dst} is a file; expected a directory")
    if src.resolve().is_relative_to(dst.resolve()):
        raise LevanteError(f"destination {dst} holds the source checkpoint {src}; choose another directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise LevanteError(f"destination {dst} is not empty; pass overwrite=True (--overwrite) to replace it")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers requires "format"
    fsync_file(path)


# ------------------------------------------------------------------------------------------ export


def _export_dtype(dtype) -> tuple[torch.dtype, str]:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _EXPORT_DTYPES:
        raise LevanteError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    torch_dtype = _EXPORT_DTYPES[dtype]
    return torch_dtype, str(torch_dtype).removeprefix("torch.")


def _plan_shards(tensors: dict[str, torch.Tensor], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy shards in name order; a tensor larger than `limit` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        if shards[-1] and used + sizes[name] > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _write_hf_weights(hf: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, limit: int) -> None:
    def target(name: str, t: torch.Tensor) -> torch.dtype:
        keep = not t.is_floating_point() or name.endswith(_KEEP_FP32)
        return t.dtype if keep else dtype

    sizes = {n: t.numel() * torch.empty((), dtype=target(n, t)).element_size() for n, t in hf.items()}
    shards = _plan_shards(hf, sizes, limit)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, shard in zip(names, shards, strict=True):
        # Copies are made one shard at a time: experts are views into stacked tensors, and
        # safetensors wants each tensor to own its memory.
        _save_safetensors({n: hf[n].to(target(n, hf[n]), copy=True) for n in shard}, out / file)
    if len(shards) > 1:
        weight_map = {n: file for file, shard in zip(names, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_json(out / HF_INDEX, index)


def _export_tokenizer(ckpt_dir: Path, out: Path, cfg: ModelConfig) -> None:
    if not (ckpt_dir / "tokenizer.json").is_file():
        return
    if (ckpt_dir / "tokenizer_config.json").is_file():
        # Tokenizer files that came from an HF import: pass them through untouched.
        for name in HF_TOKENIZER_FILES:
            if (ckpt_dir / name).is_file():
                write_durable(out / name, (ckpt_dir / name).read_bytes())
        return
    from levante.tokenizer import write_hf_tokenizer_files

    write_hf_tokenizer_files(ckpt_dir / "tokenizer.json", out, model_max_length=cfg.max_position_embeddings)


def _generation_config(ckpt_dir: Path, cfg: ModelConfig) -> dict:
    """Stop at the end of a document and, for a Levante tokenizer, at the end of a chat turn."""
    eos = [cfg.eos_token_id]
    if (ckpt_dir / "tokenizer.json").is_file() and not (ckpt_dir / "tokenizer_config.json").is_file():
        from levante.tokenizer import LevanteTokenizer

        eos.append(LevanteTokenizer(ckpt_dir / "tokenizer.json").end_id)
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": eos}


# kv_lora_rank + qk_rope_head_dim that vLLM's MLA kernels accept (GPU: all three; its CPU build: 576)
VLLM_MLA_WIDTHS = (320, 512, 576)


def vllm_width_problem(cfg: ModelConfig) -> str | None:
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if width in VLLM_MLA_WIDTHS:
        return None
    return (f"kv_lora_rank + qk_rope_head_dim = {width}: vLLM's MLA kernels serve only "
            f"{', '.join(map(str, VLLM_MLA_WIDTHS))} (576 on CPU); transformers loads this export, vLLM will not")


def export_hf(src: str | Path, dst_dir: str | Path, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, include_mtp: bool = True,
              overwrite: bool = False) -> Path:
    """Write a Levante checkpoint (or a run dir's newest verified checkpoint) as a DeepseekV3 HF dir."""
    torch_dtype, dtype_name = _export_dtype(dtype)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise LevanteError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    dst = Path(dst_dir)
    ckpt = resolve_checkpoint(src)
    _check_destination(dst, ckpt.path, overwrite)
    cfg, state, _ = read_checkpoint(ckpt)
    problem = vllm_width_problem(cfg)
    if problem is not None:
        logging.getLogger(__name__).warning(problem)
    if not include_mtp:
        state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)  # vLLM reads this to find MTP weights
    hf = levante_to_hf(state, cfg)
    with staged_dir(dst) as out:
        _write_hf_weights(hf, out, torch_dtype, max_shard_bytes)
        del hf, state
        _write_json(out / "config.json", config_to_hf(cfg, dtype_name))
        generation = _generation_config(ckpt.path, cfg)
        _write_json(out / "generation_config.json", generation)
        _export_tokenizer(ckpt.path, out, cfg)
    return dst


# ------------------------------------------------------------------------------------------ import


def import_hf(src_dir: str | Path, dst_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a DeepseekV3 HF dir (single or sharded safetensors) into a Levante checkpoint dir."""
    ckpt = resolve_checkpoint(src_dir)
    if ckpt.kind != "hf":
        raise LevanteError(f"{src_dir} is a Levante checkpoint; import expects a DeepseekV3 dir "
                           "with config.json")
    dst = Path(dst_dir)
    _check_destination(dst, ckpt.path, overwrite)
    cfg, state, _ = read_checkpoint(Checkpoint("hf", ckpt.path))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once; loaders re-tie it to embed_tokens
    with staged_dir(dst) as out:
        _save_safetensors(state, out / WEIGHTS)
        del state
        write_durable(out / "config.toml", TrainConfig(model=cfg).dumps().encode())
        for name in HF_TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                write_durable(out / name, (ckpt.path / name).read_bytes())
        write_checksums(out)
    return dst
