"""Learning-rate schedules as pure functions of the step (so resuming needs only the step count)."""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """[SCHED-1] Multiplier of the base LR at `step` (0-based): linear warmup, then constant/cosine/linear decay.

    Monotone non-decreasing during warmup, non-increasing after it, and always in [min_ratio, 1]
    (warmup starts at 1/warmup, never at 0).
    """
    if warmup > 0 and step < warmup:
        return max(min_ratio, (step + 1) / warmup) if kind != "constant" else (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - (1 - min_ratio) * progress
    raise ValueError(f"schedule must be constant, cosine or linear, got {kind!r}")
