"""Training metrics: a JSON-lines log that resumes without duplicates, and MFU accounting.

FLOPs per token come from the planner (`levante.plan.flops_per_token`, formula in its docstring),
so `levante plan` and the trainer's MFU count the same thing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from levante.config import ModelConfig
from levante.errors import LevanteError
from levante.plan import flops_per_token
from levante.util import atomic_write_text

# ------------------------------------------------------------------------------------------ FLOPs


def model_flops_per_token(model_config: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward): 6 x active matmul params + attention."""
    if seq_len <= 0:
        raise LevanteError(f"seq_len must be positive, got {seq_len}")
    return flops_per_token(model_config, seq_len, include_mtp)["total"]


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (0..1)."""
    if peak_flops <= 0:
        raise LevanteError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


def measure_cpu_matmul_peak(seconds: float = 1.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """A practical CPU peak: the best FLOP/s of n×n matmuls over ~`seconds` (at least 3 tries).

    CPUs have no datasheet number we can read portably, so MFU on CPU is relative to what this
    machine's BLAS reaches on a large square matmul with the current thread count.
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.mm(a, b)  # warm-up: thread pool, caches, allocator
    best, tries = 0.0, 0
    deadline = time.perf_counter() + seconds
    while tries < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            best = max(best, 2 * n**3 / elapsed)
        tries += 1
    return best


# ---------------------------------------------------------------------------------------- writer


def _plain(value: Any) -> Any:
    """JSON-ready: tensors and numpy scalars to Python numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _keep(line: str, resume_step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a crash
        return False
    step = record.get("step") if isinstance(record, dict) else None
    return not isinstance(step, (int, float)) or step <= resume_step


class MetricsWriter:
    """Appends one JSON object per line to `path`, flushed after each line.

    resume_step=None starts a fresh log (an existing file is replaced). On resume pass the restored
    checkpoint's step: earlier lines are kept, lines with a larger "step" (logged after that
    checkpoint, so about to be logged again) are dropped, as are lines cut short by a crash.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and _keep(line, resume_step)]
        if self.path.exists() or kept:
            self._rewrite(kept)
        self._file = open(self.path, "a", encoding="utf-8")

    def _rewrite(self, lines: list[str]) -> None:
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(_plain(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
