"""Cluster sizing on top of a plan: the smallest cluster that finishes in D days, the MFU that a
GPU-hour budget implies, energy and cost.

    gpu_hours    = train_flops / (peak * mfu) / 3600        (plan(); per card)
    implied_mfu  = train_flops / (gpu_hours_given * 3600 * peak)
    gpus(D)      = max(memory minimum, ceil(gpu_hours / (24 D))), rounded up to whole 8-GPU nodes
    energy_kwh   = gpu_hours * TDP (kW) * PUE                 (every card at its TDP for the whole run)
    cost         = gpu_hours * price per GPU-hour
"""

from __future__ import annotations

import math

from levante.config import ModelConfig
from levante.errors import LevanteError
from levante.plan.formulas import USABLE_MEMORY, memory_per_gpu, min_gpus
from levante.plan.hardware import GPUS

SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_amount(text: str | float | None, what: str) -> float | None:
    """'14.8T', '2.664M', '4e12', 30 -> a positive float; None stays None."""
    if text is None or isinstance(text, (int, float)):
        value = text
    else:
        raw = str(text).strip().lower().replace("_", "").replace(",", "")
        scale = SUFFIXES.get(raw[-1:], 1.0)
        try:
            value = float(raw[:-1] if raw[-1:] in SUFFIXES else raw) * scale
        except ValueError:
            raise LevanteError(f"plan: {what} must be a number like 4T or 2.5e12, got {text!r}") from None
    if value is not None and not value > 0:
        raise LevanteError(f"plan: {what} must be positive, got {text!r}")
    return value


def size_cluster(cfg: ModelConfig, result: dict, *, gpu: str, days: float | None = None,
                 gpu_hours: float | None = None, pue: float = 1.2, price: float | None = None,
                 seq_len: int, micro_batch: int = 1, zero_stage: str = "fsdp") -> dict:
    """Keys added to a plan() result: train_flops_per_token, implied_mfu (with gpu_hours),
    gpus / days / memory for the `days` target, energy_kwh, cost."""
    if pue < 1:
        raise LevanteError(f"plan: pue must be >= 1, got {pue}")
    card = GPUS[gpu]
    hours = result["gpu_hours"][gpu]
    extra: dict = {"train_flops_per_token": result["flops_per_token"], "pue": pue}
    if gpu_hours is not None:
        extra["implied_mfu"] = result["train_flops"] / (gpu_hours * 3600 * card["peak_flops"])
        extra["gpu_hours_given"] = gpu_hours
        hours = gpu_hours  # energy and cost of the budget as given
    if days is not None:
        need = math.ceil(hours / (24 * days))
        floor = min_gpus(cfg, card["memory_bytes"], seq_len=seq_len, micro_batch=micro_batch, zero_stage=zero_stage)
        if floor is None:
            raise LevanteError(f"plan: the model does not fit on any number of {card['name']} cards")
        gpus = max(need, floor)
        gpus = gpus if gpus in (1, 2, 4) else 8 * math.ceil(gpus / 8)
        memory = memory_per_gpu(cfg, gpus, seq_len=seq_len, micro_batch=micro_batch, zero_stage=zero_stage,
                                expert_parallel=None)
        memory["fits"] = memory["total_bytes"]["adamw"] <= USABLE_MEMORY * card["memory_bytes"]
        memory["activation_checkpointing"] = "full"
        extra.update(gpus=gpus, days=hours / gpus / 24, wall_clock_days=hours / gpus / 24, memory=memory,
                     gpus_note=f"smallest for {days:g} days")
    else:
        extra["days"] = result["wall_clock_days"] if gpu_hours is None or not result["gpus"] else \
            hours / result["gpus"] / 24
    extra["energy_kwh"] = hours * card["tdp_watts"] / 1000 * pue
    if price is not None:
        extra["cost"] = hours * price
    return extra
