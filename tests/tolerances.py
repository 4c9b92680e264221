"""Per-dtype tolerances, stated once. Never widen these to get a test green.

Comparisons are always against the reference run in float64; `rtol`/`atol` apply to the optimized result
computed in the named dtype. Chains of many ops (whole models, long scans) use `MODEL_TOLERANCES`, which
allow for error accumulating over depth and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-10),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-2),
}

MODEL_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-4),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-2),
    torch.bfloat16: Tolerance(rtol=5e-2, atol=5e-2),
}


def tolerance(dtype: torch.dtype, *, model: bool = False) -> Tolerance:
    table = MODEL_TOLERANCES if model else TOLERANCES
    return table[dtype]
