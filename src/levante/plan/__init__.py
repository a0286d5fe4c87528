"""The planner: parameters, FLOPs, memory, GPU-hours (formulas.py), cards (hardware.py), tables (render.py)."""

from levante.plan.formulas import (
    USABLE_MEMORY,
    flops_per_token,
    kv_cache,
    memory_per_gpu,
    min_gpus,
    param_breakdown,
    plan,
)
from levante.plan.hardware import GPUS

__all__ = ["GPUS", "USABLE_MEMORY", "flops_per_token", "kv_cache", "memory_per_gpu", "min_gpus",
           "param_breakdown", "plan"]
