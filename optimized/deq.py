"""Deep-equilibrium core, fast path: the same equilibrium layer and FixedPointBlock on the batched solvers.

Implements `reference.deq.{equilibrium, FixedPointBlock}` (FixedPointBlock subclasses the reference class and
overrides only `solve`, so parameters and state_dict keys are identical). Method: the backward modes are the
reference's `equilibrium_with` (one copy of that math) driven by `optimized.deq_solvers`, whose convergence
bookkeeping stays on the device and syncs once every `config.check_every` iterations (0: never, a fixed
`max_iter` loop that torch.compile captures without breaks; one sync at the end checks NaN/inf and applies the
policy). Contractive parameterisation and Jacobian diagnostics have no hot path and are re-exported.
Tolerance vs the float64 reference: float64 1e-10, float32 1e-5 relative on z* and gradients for solves
converged well below tol (z* itself is only defined to ≈ tol/(1 − L)).
"""

from __future__ import annotations

from torch import Tensor

from optimized.deq_solvers import (
    POLICIES,
    RESIDUAL_EPS,
    SOLVERS,
    ConvergenceWarning,
    Map,
    SolverInfo,
    StopFn,
    anderson,
    broyden,
    energy_stop,
    fixed_point_iteration,
    relative_residual,
    solve,
)
from reference.deq import (
    BACKWARD_MODES,
    DEQConfig,
    SolveFn,
    SpectralNormLinear,
    equilibrium_with,
    jacobian_frobenius_sq,
    jacobian_spectral_norm,
    stability_loss,
)
from reference.deq import FixedPointBlock as ReferenceFixedPointBlock

__all__ = [
    "BACKWARD_MODES",
    "POLICIES",
    "RESIDUAL_EPS",
    "SOLVERS",
    "ConvergenceWarning",
    "DEQConfig",
    "FixedPointBlock",
    "Map",
    "SolveFn",
    "SolverInfo",
    "SpectralNormLinear",
    "StopFn",
    "anderson",
    "broyden",
    "energy_stop",
    "equilibrium",
    "equilibrium_with",
    "fixed_point_iteration",
    "jacobian_frobenius_sq",
    "jacobian_spectral_norm",
    "relative_residual",
    "solve",
    "stability_loss",
]


def equilibrium(f: Map, z0: Tensor, config: DEQConfig | None = None,
                stop_fn: StopFn | None = None) -> tuple[Tensor, SolverInfo]:
    """`reference.deq.equilibrium` with the batched solvers (forward and adjoint)."""
    return equilibrium_with(solve, f, z0, config or DEQConfig(), stop_fn)


class FixedPointBlock(ReferenceFixedPointBlock):
    """`reference.deq.FixedPointBlock` solved by the batched solvers."""

    def solve(self, f: Map, z0: Tensor) -> tuple[Tensor, SolverInfo]:
        return equilibrium(f, z0, self.config)
