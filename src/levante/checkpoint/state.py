"""Atomic, verifiable, exactly-resumable checkpoints of one process (safetensors + JSON, no pickle).

`<run>/checkpoints/step_<NNNNNNNN>/` (see layout.py) holds
  model.safetensors      model.state_dict() (persistent buffers included), contiguous CPU tensors
  optimizer.safetensors  per-parameter state, keys `state.<param name>.<state key>`
  optimizer.json         optimizer class, param groups (hyper-parameters + parameter names), state index
  trainer.json           step, the caller's trainer_state, RNG states (python, numpy, torch, CUDA)
  tokenizer.json         optional copy of the run's tokenizer
  checksums.json         sha256 + size of every file above; written last

A checkpoint is written into `step_X.tmp-<pid>`, every file and the directory are fsynced, then it is
renamed into place, so a crash never leaves a half-written `step_X`. Optimizer state is keyed by
parameter name, so it survives a change in parameter registration order. On load, hyper-parameters
(lr, betas, ...) come from the optimizer passed in, i.e. from the current config; only the
per-parameter state is restored.

Single writer: one process (rank 0) saves into a run directory at a time.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from levante.checkpoint.layout import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIM_JSON,
    OPTIM_TENSORS,
    TMP_MARK,
    TOKENIZER_FILE,
    TRAINER_JSON,
    checkpoints_root,
    clean_tmp,
    list_step_dirs,
    remove_dir,
    step_dir_name,
    step_of,
)
from levante.checkpoint.verify import FORMAT_VERSION, newest_valid, write_checksums
from levante.errors import LevanteError
from levante.util import fsync_dir, fsync_file, write_durable

log = logging.getLogger("levante")


# --------------------------------------------------------------------------------------- tensors


def _cpu_tensors(items) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; a tensor sharing storage with an earlier one (tied weights)
    is cloned, because safetensors refuses shared storage and we want every name back on load."""
    out, seen = {}, set()
    for name, t in items:
        if hasattr(t, "full_tensor"):
            raise LevanteError(f"checkpoint: '{name}' is sharded (DTensor); save it with the distributed "
                               "checkpoint path")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------------------------------- RNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rng_state() -> dict:
    version, words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to save
        cuda = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": version, "words": _b64(np.asarray(words, dtype="<u4").tobytes()),
                   "gauss_next": gauss},
        "numpy": {"name": np_name, "keys": _b64(np.asarray(np_keys, dtype="<u4").tobytes()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": cuda,
    }


def _byte_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _restore_rng(state: dict) -> None:
    py = state["python"]
    words = np.frombuffer(base64.b64decode(py["words"]), dtype="<u4")
    random.setstate((py["version"], tuple(int(w) for w in words), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.frombuffer(base64.b64decode(npst["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices but %d are visible: CUDA RNG not "
                        "restored", len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ------------------------------------------------------------------------------------------ save


def _optimizer_payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    names = _param_names(model)
    items, groups, state_tensors, state_values = [], [], {}, {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise LevanteError("checkpoint: the optimizer holds a parameter the model does not name")
            group_names.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    items.append((f"state.{name}.{key}", value))
                    state_tensors.setdefault(name, []).append(key)
                else:
                    state_values.setdefault(name, {})[key] = value
        hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        groups.append({"hyper": hyper, "params": group_names})
    meta = {"format": FORMAT_VERSION, "optimizer": type(optimizer).__name__, "param_groups": groups,
            "param_names": [n for g in groups for n in g["params"]],
            "state_tensors": state_tensors, "state_values": state_values}
    return _cpu_tensors(items), meta


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint: {what} is not JSON-serialisable ({e})") from None


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict, keep_last: int,
                    tokenizer_path: str | Path | None = None, config_text: str | None = None) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep_last`; returns its path.

    `trainer_state` is any JSON-serialisable dict (tokens seen, data loader state, metrics, config
    text, ...); `step`, `format` and `rng` are reserved keys filled in here. `tokenizer_path`, if
    given, is copied in as tokenizer.json and `config_text` written as config.toml (both checksummed),
    so the directory is self-contained for eval, generate and export.
    Checkpoints with a higher step than this one are from an abandoned timeline (the run resumed
    from an older one) and are deleted.
    """
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise LevanteError(f"tokenizer file not found: {tokenizer_path}")
    if step < 0:
        raise LevanteError(f"checkpoint: step must be >= 0, got {step}")
    if keep_last < 1:
        raise LevanteError(f"checkpoint: keep_last must be >= 1, got {keep_last}")
    # Serialise everything before touching the disk, so a bad trainer_state leaves nothing behind.
    model_tensors = _cpu_tensors(model.state_dict().items())
    optim = _optimizer_payload(model, optimizer) if optimizer is not None else None
    trainer_text = _dumps({**trainer_state, "step": step, "format": FORMAT_VERSION, "rng": _rng_state()},
                          "trainer_state")
    optim_text = _dumps(optim[1], "optimizer state") if optim else None

    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_tmp(root)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}{TMP_MARK}{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        written = [MODEL_FILE]
        if optim:
            save_file(optim[0], str(tmp / OPTIM_TENSORS))
            write_durable(tmp / OPTIM_JSON, optim_text)
            written += [OPTIM_TENSORS, OPTIM_JSON]
        write_durable(tmp / TRAINER_JSON, trainer_text)
        written.append(TRAINER_JSON)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            written.append(TOKENIZER_FILE)
        if config_text is not None:
            write_durable(tmp / CONFIG_FILE, config_text)
            written.append(CONFIG_FILE)
        for name in (MODEL_FILE, OPTIM_TENSORS, TOKENIZER_FILE):  # the rest went through write_durable
            if name in written:
                fsync_file(tmp / name)
        write_checksums(tmp, written)
        fsync_dir(tmp, strict=True)
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old copy
            remove_dir(final)
        os.rename(tmp, final)
        fsync_dir(root, strict=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, final, keep_last)
    return final


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    newest = step_of(keep)
    older = []
    for path in list_step_dirs(root):
        if path == keep:
            continue
        if step_of(path) > newest:
            log.warning("deleting stale checkpoint %s: newer than the one just written (%s)", path, keep.name)
            remove_dir(path)
        else:
            older.append(path)
    for path in older[keep_last - 1:]:
        remove_dir(path)
    fsync_dir(root, strict=True)


# ------------------------------------------------------------------------------------------ load


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise LevanteError(f"{file}: not a readable safetensors file ({e})") from None


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _load_model_file(file: Path, model: nn.Module, strict: bool) -> None:
    tensors = _read_tensors(file)
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if strict and (missing or unexpected):
        parts = ([f"missing {_few(missing)}"] if missing else []) + (
            [f"unexpected {_few(unexpected)}"] if unexpected else [])
        raise LevanteError(f"{file}: weights do not match the model: {'; '.join(parts)}")
    for name, t in tensors.items():
        if name in expected and t.shape != expected[name].shape:
            raise LevanteError(f"{file}: '{name}' has shape {tuple(t.shape)}, the model expects "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=strict)


def _load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not (path / OPTIM_JSON).is_file():
        raise LevanteError(f"{path}: checkpoint has no optimizer state, cannot resume training exactly")
    meta = json.loads((path / OPTIM_JSON).read_text(encoding="utf-8"))
    if meta["optimizer"] != type(optimizer).__name__:
        raise LevanteError(f"{path}: checkpoint optimizer is {meta['optimizer']}, this run uses "
                           f"{type(optimizer).__name__} (optim.name changed?)")
    names = _param_names(model)
    index, kind_now = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise LevanteError("checkpoint: the optimizer holds a parameter the model does not name")
            index[names[id(p)]] = len(index)
            kind_now[names[id(p)]] = group.get("kind")
    kind_saved = {n: g["hyper"].get("kind") for g in meta["param_groups"] for n in g["params"]}
    missing, unexpected = set(index) - set(kind_saved), set(kind_saved) - set(index)
    if missing or unexpected:
        raise LevanteError(f"{path}: optimizer parameters differ: missing {_few(missing) or 'none'}; "
                           f"unexpected {_few(unexpected) or 'none'}")
    for name, kind in kind_now.items():
        if kind_saved[name] != kind:
            raise LevanteError(f"{path}: '{name}' was optimised as {kind_saved[name]}, now as {kind}")
    tensors = _read_tensors(path / OPTIM_TENSORS)
    state: dict[int, dict] = {}
    for name, keys in meta["state_tensors"].items():
        for key in keys:
            state.setdefault(index[name], {})[key] = tensors[f"state.{name}.{key}"]
    for name, values in meta["state_values"].items():
        state.setdefault(index[name], {}).update(values)
    groups, start = [], 0
    for group in optimizer.param_groups:  # current hyper-parameters win (see module docstring)
        n = len(group["params"])
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(start, start + n))})
        start += n
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    _load_model_file(path / MODEL_FILE, model, strict=True)
    if optimizer is not None:
        _load_optimizer(path, model, optimizer)
    state = json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))
    _restore_rng(state.pop("rng"))
    state.pop("format", None)
    return state


def load_latest(run_dir: str | Path, model: nn.Module,
                optimizer: torch.optim.Optimizer | None) -> tuple[Path, dict] | None:
    """Restore the newest valid checkpoint into model (+ optimizer, RNGs); (path, trainer_state).

    Discovery and trust follow verify.py's rule; None if the run has no checkpoint at all. The
    returned trainer_state is the dict given to save_checkpoint plus "step".
    """
    root = checkpoints_root(run_dir)
    clean_tmp(root)
    path = newest_valid(root, required=(MODEL_FILE, TRAINER_JSON))
    if path is None:
        return None
    if (path / OPTIM_JSON).is_file() != (path / OPTIM_TENSORS).is_file():
        raise LevanteError(f"{path}: {OPTIM_JSON} and {OPTIM_TENSORS} must both be present or both absent")
    return path, _restore(path, model, optimizer)
