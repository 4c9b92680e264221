"""The Unified Mamba–Hopfield–DEQ model, fast: the reference model with the optimized hot paths swapped in.

Implements `reference.unified.UnifiedMambaHopfieldDEQ` (subclasses; parameters and state_dict keys identical).
Methods: the Mamba stack on `optimized.mamba` (chunked log-space / CUDA selective scan, fused conv and RMSNorm);
Hopfield retrieval through fused attention kernels or the chunked online log-sum-exp over memory slots
(`optimized.hopfield`); the equilibrium on `optimized.deq.equilibrium` (device-side convergence masks, a host sync
every 4 iterations) and the cascade's refinement checking its stopping rule every 4 steps (a stopped token is
frozen, so the result is the reference's). Tolerances vs the float64 reference (model tolerances): float64 1e-9,
float32 1e-4, bfloat16 5e-2 on logits and gradients, for solves that converge well below tol.
"""

from __future__ import annotations

from optimized import deq
from optimized.hopfield import HopfieldMemory as OptimizedHopfieldMemory
from optimized.mamba import MambaBlock, MambaStack
from reference import unified as ref
from reference.unified import (
    SOLVER_TYPES,
    SolveResult,
    StepMaps,
    UnifiedCache,
    UnifiedConfig,
    curriculum_max_iter,
)

__all__ = ["SOLVER_TYPES", "EquilibriumSolver", "HopfieldMemory", "SolveResult", "StepMaps", "UnifiedCache",
           "UnifiedConfig", "UnifiedDynamics", "UnifiedMambaHopfieldDEQ", "UnifiedMambaStack", "curriculum_max_iter"]


class UnifiedMambaStack(ref.UnifiedMambaStack):
    """`reference.unified.UnifiedMambaStack` with the optimized Mamba block and RMSNorm."""

    block_class = MambaBlock
    norm_class = MambaStack.norm_class


class HopfieldMemory(OptimizedHopfieldMemory):
    """`optimized.hopfield.HopfieldMemory` (fused / chunked retrieval)."""


class UnifiedDynamics(ref.UnifiedDynamics):
    """`reference.unified.UnifiedDynamics` on the optimized Mamba stack."""

    stack_class = UnifiedMambaStack


class EquilibriumSolver(ref.EquilibriumSolver):
    """`reference.unified.EquilibriumSolver` on the batched DEQ solvers; refinement syncs every 4 steps."""

    equilibrium_fn = staticmethod(deq.equilibrium)
    check_every = 4


class UnifiedMambaHopfieldDEQ(ref.UnifiedMambaHopfieldDEQ):
    """`reference.unified.UnifiedMambaHopfieldDEQ` built from the optimized parts."""

    dynamics_class = UnifiedDynamics
    memory_class = HopfieldMemory
    solver_class = EquilibriumSolver

    def __init__(self, config: UnifiedConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        if isinstance(self.memory, OptimizedHopfieldMemory):
            self.memory.chunk_size = self.config.memory_chunk
