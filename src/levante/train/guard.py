"""Loss-spike and NaN guard: skip a step whose loss or gradient norm is not finite or is an outlier.

As OLMo-core's skip-step optimizer: over a rolling window of the last `window` accepted steps, a
step is skipped when its loss or its (pre-clip) gradient norm exceeds mean + `sigma`·std of the
window — only upward: a sudden improvement is no reason to skip — or when either is not finite.
The outlier test is off until the window is full. A skipped step takes no optimizer step and no
router-bias update, and its batch is not replayed (no data rewind). After `max_consecutive` skips
in a row the run stops with a one-line error, its last checkpoint untouched. The window is part of
the checkpoint, so resume stays exact.
"""

from __future__ import annotations

import math
from collections import deque

from levante.errors import LevanteError


class SpikeGuard:
    def __init__(self, window: int = 128, sigma: float = 6.0, max_consecutive: int = 8, enabled: bool = True):
        self.window, self.sigma, self.max_consecutive, self.enabled = window, sigma, max_consecutive, enabled
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.skipped = 0

    def _outlier(self, value: float, history: deque) -> bool:
        if len(history) < self.window:
            return False
        mean = math.fsum(history) / len(history)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in history) / len(history))
        return value > mean + self.sigma * std

    def reason_to_skip(self, loss: float, grad_norm: float) -> str | None:
        """Why this step should be skipped, or None to take it."""
        if not self.enabled:
            return None
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self._outlier(loss, self.losses):
            return f"loss spike ({loss:.4g} > {self.sigma:g} sigma over the last {self.window} steps)"
        if self._outlier(grad_norm, self.grad_norms):
            return f"gradient-norm spike ({grad_norm:.4g} > {self.sigma:g} sigma over the last {self.window} steps)"
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.consecutive = 0

    def skip(self) -> None:
        self.consecutive += 1
        self.skipped += 1

    def check_not_stuck(self, step: int, reason: str) -> None:
        """LevanteError once `max_consecutive` steps in a row were skipped."""
        if self.consecutive >= self.max_consecutive:
            raise LevanteError(f"training stopped at step {step}: {self.consecutive} consecutive steps skipped "
                               f"(last: {reason}); the last checkpoint is intact — lower the learning rate "
                               "or inspect the data, then --resume")

    # JSON-able: Python floats round-trip exactly through json, so resume is bit-exact.
    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.window)
        self.grad_norms = deque((float(v) for v in state["grad_norms"]), maxlen=self.window)
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])
