"""EMMA, fast path.

Implements `reference.emma.EMMA` (subclass: the same parameters, buffers and state_dict keys) with the fast
submodules swapped in: `optimized.liquid.LiquidCell` (input projection hoisted out of the time loop, fused unfold),
`optimized.vsa.SlotMemory` (one rfft of all keys/values/queries, a chunked parallel scan of the bound spectra, one
irfft: no per-token loop), `optimized.vsa.cleanup` (one matmul against the value rows, then topk) and
`optimized.deq.FixedPointBlock` (batched solvers, on-device convergence bookkeeping). The schedule, the oracle and
the diagnostics are the reference's (no hot path). Tolerance vs the float64 reference: float64 1e-9, float32 1e-4
(model tolerances; DEQ solves converged well below `deq_tol`), bf16 5e-2.
"""

from __future__ import annotations

from collections.abc import Callable

from optimized import vsa as fast_vsa
from optimized.deq import FixedPointBlock
from optimized.liquid import LiquidCell
from reference import vsa
from reference.emma import EMMA as ReferenceEMMA
from reference.emma import EMMAConfig, OracleWrites, mem_scale_at, oracle_share_at, query_answers

__all__ = ["EMMA", "EMMAConfig", "OracleWrites", "mem_scale_at", "oracle_share_at", "query_answers"]


class EMMA(ReferenceEMMA):
    """`reference.emma.EMMA` with the optimized liquid cell, slot memory, cleanup and DEQ block."""

    liquid_cls = LiquidCell
    memory_cls = fast_vsa.SlotMemory
    deq_cls = FixedPointBlock
    cleanup_fn: Callable[..., vsa.Cleanup] = staticmethod(fast_vsa.cleanup)
