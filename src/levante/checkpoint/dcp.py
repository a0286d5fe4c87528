"""Sharded checkpoints with torch.distributed.checkpoint (DCP): saved at N ranks, loaded at M.

Layout: the same `<run>/checkpoints/step_<NNNNNNNN>/` as single-process checkpoints (layout.py), holding
  .metadata, __<rank>_0.distcp   DCP: {"model": model state, "optim": optimizer state}, by FQN, sharded
  trainer.json                   step, trainer state, RNG states (rank 0's; see below)
  tokenizer.json, config.toml    as in state.py
  checksums.json                 every file above; written last by rank 0
Atomicity as in state.py: every rank writes into `step_X.tmp-dcp`; after a barrier rank 0 adds its
files and the checksums, fsyncs and renames the directory into place, so a crash mid-save leaves the
previous checkpoint the newest valid one. DCP reshards on load, so a checkpoint saved at N ranks
resumes at any M (a single process included, with no process group) given the same global batch.

RNG: training draws no random numbers after initialisation (no dropout), and every rank seeds the
same; trainer.json keeps rank 0's states and every rank restores them.

`consolidate` turns a DCP checkpoint into an ordinary single-process one (state.py's format) that
`export hf` and `from_pretrained` accept; `load_latest_any` resumes from either format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
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
    refuse_non_empty,
    remove_dir,
    step_dir_name,
)
from levante.checkpoint.verify import FORMAT_VERSION, checksum_problem, newest_valid, write_checksums
from levante.errors import LevanteError
from levante.util import fsync_dir, fsync_file, write_durable

DCP_METADATA = ".metadata"


def is_dcp(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


# Expert parallelism: a rank's expert stacks hold only its experts, under the full stack's name. DCP
# sees whole stacks instead: gathered on save (every rank the same tensor, written once), sliced back on
# load. The files are then those of a run without EP, so they resume at any ep and world size.


def _expert_entries(state: dict, model: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """(dict, key, live tensor) for every expert-stack tensor in `state` (weights and optimizer state)."""
    from levante.parallel.expert_parallel import expert_modules

    # A list in model order: every rank must run the gathers in the same order (a set's order is per process).
    names = [n for n, p in model.named_parameters()
             if any(p is q for e in expert_modules(model) for q in e.parameters())]
    out = [(state["model"], n, state["model"][n]) for n in names if n in state["model"]]
    optim_state = state.get("optim", {}).get("state", {})
    for n in names:
        if n not in optim_state:
            continue
        # A copy: these dicts can be the optimizer's own, whose tensors must stay the live shards.
        optim_state[n] = dict(optim_state[n])
        for key, value in optim_state[n].items():
            if isinstance(value, torch.Tensor) and value.ndim == 3:
                out.append((optim_state[n], key, value))
    return out


def _whole_experts(t: torch.Tensor, dist) -> torch.Tensor:
    import torch.distributed as tdist

    local = t.full_tensor() if hasattr(t, "full_tensor") else t.detach()
    parts = [torch.empty_like(local) for _ in range(dist.ep)]
    tdist.all_gather(parts, local.contiguous(), group=dist.mesh["ep"].get_group())
    return torch.cat(parts)


def _gather_experts(state: dict, model: nn.Module, dist) -> None:
    for d, key, t in _expert_entries(state, model):
        d[key] = _whole_experts(t, dist)


def _scatter_experts(live: list, loaded: dict, dist) -> None:
    """Copy this rank's share of the loaded whole stacks into the live (sharded) tensors."""
    from torch.distributed.tensor import distribute_tensor

    j = dist.mesh["ep"].get_local_rank()
    for (_, _, t), whole in zip(live, loaded, strict=True):
        mine = whole.chunk(dist.ep)[j]
        if hasattr(t, "to_local"):
            mine = distribute_tensor(mine, t.device_mesh, t.placements, src_data_rank=None).to_local()
            t.to_local().copy_(mine)
        else:
            t.copy_(mine)


# ------------------------------------------------------------------------------------------ save


def save_distributed(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     trainer_state: dict, dist, keep_last: int, tokenizer_path: str | Path | None = None,
                     config_text: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint's path."""
    import torch.distributed.checkpoint as dcp

    from levante.checkpoint.state import _dumps, _prune, _rng_state

    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}{TMP_MARK}dcp"  # one name for all ranks
    trainer_text = _dumps({**trainer_state, "step": step, "format": FORMAT_VERSION, "rng": _rng_state()},
                          "trainer_state")

    def stage():
        root.mkdir(parents=True, exist_ok=True)
        clean_tmp(root)
        tmp.mkdir()

    dist.run_on_main(stage)
    state = _state_dicts(model, optimizer)
    if dist.ep > 1:
        _gather_experts(state, model, dist)
    dcp.save(state, checkpoint_id=str(tmp))  # collective; files fsynced

    def finish():
        try:
            write_durable(tmp / TRAINER_JSON, trainer_text)
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
                fsync_file(tmp / TOKENIZER_FILE)
            if config_text is not None:
                write_durable(tmp / CONFIG_FILE, config_text)
            write_checksums(tmp)
            fsync_dir(tmp, strict=True)
            if final.exists():
                remove_dir(final)
            os.rename(tmp, final)
            fsync_dir(root, strict=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(root, final, keep_last)

    dist.run_on_main(finish)
    return final


# ------------------------------------------------------------------------------------------ load


def _keep_current_hyper(optimizer: torch.optim.Optimizer):
    """Current hyper-parameters win over the checkpoint's (as in state.py): snapshot, restore after load."""
    saved = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def restore():
        for group, hyper in zip(optimizer.param_groups, saved, strict=True):
            group.update(hyper)

    return restore


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, dist=None) -> None:
    """Load a DCP checkpoint into `model` (+ optimizer), sharded or not, whatever world size saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    restore = _keep_current_hyper(optimizer) if optimizer is not None else None
    state = _state_dicts(model, optimizer)
    live = []
    if dist is not None and dist.ep > 1:  # load whole expert stacks into full-size buffers
        live = _expert_entries(state, model)
        for d, key, t in live:
            shape = (t.shape[0] * dist.ep, *t.shape[1:])
            d[key] = torch.empty(shape, dtype=t.dtype, device=t.to_local().device if hasattr(t, "to_local")
                                 else t.device)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # a mismatch between the checkpoint and this model/optimizer
        raise LevanteError(f"{path}: cannot load this distributed checkpoint into the model "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if live:
        # DCP loaded the other tensors in place (the state dict holds the live ones); experts by hand.
        _scatter_experts(live, [d[key] for d, key, _ in live], dist)
        if restore is not None:
            restore()
        return
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restore()


def _load_full_into_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An ordinary (single-process) checkpoint into a sharded model: full state dicts by FQN, which
    set_*_state_dict(full_state_dict=True) cut into each rank's shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from levante.checkpoint.state import _few

    options = StateDictOptions(full_state_dict=True)
    tensors = load_file(str(path / MODEL_FILE))
    expected = set(model.state_dict())
    if set(tensors) != expected:
        missing, unexpected = _few(expected - set(tensors)) or "none", _few(set(tensors) - expected) or "none"
        raise LevanteError(f"{path / MODEL_FILE}: weights do not match the model: missing {missing}; "
                           f"unexpected {unexpected}")
    set_model_state_dict(model, tensors, options=options)
    if not (path / OPTIM_JSON).is_file():
        raise LevanteError(f"{path}: checkpoint has no optimizer state, cannot resume training exactly")
    meta = json.loads((path / OPTIM_JSON).read_text(encoding="utf-8"))
    saved = load_file(str(path / OPTIM_TENSORS))
    state: dict[str, dict] = {}
    for name, keys in meta["state_tensors"].items():
        state[name] = {key: saved[f"state.{name}.{key}"] for key in keys}
    for name, values in meta["state_values"].items():
        state.setdefault(name, {}).update(values)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    restore = _keep_current_hyper(optimizer)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=options)
    restore()


def load_latest_any(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist) -> tuple[Path, dict] | None:
    """Resume from the newest valid checkpoint of either format at this world size; (path, trainer_state).

    Collective under a process group: rank 0 finds the checkpoint (verify.py's rule), every rank loads it.
    """
    from levante.checkpoint.state import _restore, _restore_rng

    root = checkpoints_root(run_dir)
    found: list = [None]

    def find():
        clean_tmp(root)
        path = newest_valid(root, required=(TRAINER_JSON,))
        found[0] = None if path is None else str(path)

    dist.run_on_main(find)
    path = dist.broadcast_object(found[0])
    if path is None:
        return None
    path = Path(path)
    if is_dcp(path):
        load_dcp(path, model, optimizer, dist)
    elif dist.ep > 1:
        raise LevanteError(f"{path} is a single-process checkpoint; resume it with parallel.ep = 1, save, "
                           "then continue with expert parallelism")
    elif not dist.enabled:
        return path, _restore(path, model, optimizer)
    else:
        _load_full_into_sharded(path, model, optimizer)
    state = json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))
    _restore_rng(state.pop("rng"))
    state.pop("format", None)
    return path, state


# ----------------------------------------------------------------------------------- consolidate


def consolidate(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A DCP checkpoint (a step dir, or a run dir: its newest valid one) -> one ordinary checkpoint
    directory `out` (model.safetensors, optimizer, trainer.json, config, tokenizer, checksums)."""
    from levante.checkpoint.state import _restore_rng, save_checkpoint
    from levante.config import TrainConfig
    from levante.model.transformer import Transformer
    from levante.train.optim import build_optimizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise LevanteError(f"checkpoint path not found: {src}")
    if is_dcp(src):
        problem = checksum_problem(src, required=(TRAINER_JSON, DCP_METADATA))
        if problem:
            raise LevanteError(f"checkpoint failed verification: {src}: {problem}")
        path = src
    else:
        path = newest_valid(checkpoints_root(src), is_candidate=is_dcp, required=(TRAINER_JSON, DCP_METADATA))
        if path is None:
            raise LevanteError(f"{src} holds no distributed checkpoint (expected {DCP_METADATA} in a step "
                               "dir, or a run dir with checkpoints/step_*/)")
    refuse_non_empty(out, overwrite)
    if not (path / CONFIG_FILE).is_file():
        raise LevanteError(f"{path}: no {CONFIG_FILE}: cannot rebuild the model")
    cfg = TrainConfig.load(path / CONFIG_FILE)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    load_dcp(path, model, optimizer)
    trainer = json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))
    _restore_rng(trainer.pop("rng"))  # save_checkpoint records this process's RNG: make it the run's
    step = int(trainer.pop("step"))
    trainer.pop("format", None)
    tokenizer = path / TOKENIZER_FILE
    stage = out.with_name(f".{out.name}{TMP_MARK}consolidate")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        written = save_checkpoint(stage, step, model, optimizer, trainer, keep_last=1,
                                  tokenizer_path=tokenizer if tokenizer.is_file() else None,
                                  config_text=(path / CONFIG_FILE).read_text(encoding="utf-8"))
        if out.exists():
            shutil.rmtree(out)
        os.rename(written, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
