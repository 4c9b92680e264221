"""`ConvergenceValidator(model).run_all_tests()`: contraction estimate, convergence rate and uniqueness of z*."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from reference.deq import jacobian_spectral_norm

__all__ = ["ConvergenceReport", "ConvergenceValidator"]


@dataclass
class ConvergenceReport:
    """Results of the three checks; `passed` when every check met its threshold; `report()` is readable text."""

    lipschitz_max: float
    lipschitz_mean: float
    converged_fraction: float
    mean_iterations: float
    rate: float  # geometric mean contraction of the residual per iteration
    uniqueness_gap: float  # max distance between equilibria reached from different initial states
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (self.lipschitz_max < 1.0 and self.converged_fraction >= self.thresholds.get("converged", 0.95)
                and self.uniqueness_gap <= self.thresholds.get("uniqueness", 1e-2))

    def report(self) -> str:
        lines = ["Convergence validation",
                 f"  contraction: ‖J‖₂ max {self.lipschitz_max:.4f}, mean {self.lipschitz_mean:.4f} "
                 f"({'< 1: contractive' if self.lipschitz_max < 1 else '>= 1: not certified contractive'})",
                 f"  convergence: {100 * self.converged_fraction:.1f}% of tokens converged, "
                 f"{self.mean_iterations:.2f} iterations on average, residual rate {self.rate:.4f} per iteration",
                 f"  uniqueness: max ‖z*_a − z*_b‖ over random initial states = {self.uniqueness_gap:.2e}",
                 f"  overall: {'PASS' if self.passed else 'FAIL'}"]
        return "\n".join(lines)


class ConvergenceValidator:
    """[UNI-4] checks on the model's solver map at the equilibria of random (or given) token batches."""

    def __init__(self, model: nn.Module, *, batch_size: int = 2, seq_len: int = 16, n_inits: int = 4,
                 seed: int = 0) -> None:
        self.model, self.batch_size, self.seq_len, self.n_inits, self.seed = model, batch_size, seq_len, n_inits, seed

    def _tokens(self) -> Tensor:
        cfg: Any = cast(Any, self.model).config
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, cfg.vocab_size, (self.batch_size, self.seq_len), generator=g).to(device)

    def run_all_tests(self, input_ids: Tensor | None = None) -> ConvergenceReport:
        model = self.model
        was_training = model.training
        model.eval()
        ids = self._tokens() if input_ids is None else input_ids
        with torch.no_grad():
            _, diag = model(ids, return_diagnostics=True)
        c, z = diag["context"], diag["z_equilibrium"]
        D = z.shape[-1]
        cf, zf = c.reshape(-1, D), z.reshape(-1, D)
        maps = model.step_maps(cf)  # type: ignore[operator]
        kind = model.solver.solver_type  # type: ignore[union-attr]
        T = maps.fixed_point_map(kind)
        model.memory.twice_differentiable = True  # type: ignore[union-attr]
        try:
            lip = jacobian_spectral_norm(T, zf.detach(), n_iter=20).detach()
        finally:
            model.memory.twice_differentiable = False  # type: ignore[union-attr]
        info = diag["solver_info"]
        # convergence rate: residual decay of plain iteration of T from z0 = c
        with torch.no_grad():
            zk, res = cf, []
            for _ in range(10):
                nxt = T(zk)
                res.append(torch.linalg.vector_norm(nxt - zk, dim=-1).mean())
                zk = nxt
            r = torch.stack(res)
            rate = float((r[-1] / r[0].clamp_min(1e-30)) ** (1.0 / (len(res) - 1)))
            g = torch.Generator().manual_seed(self.seed + 1)
            finals = []
            for _ in range(self.n_inits):
                z0 = torch.randn(z.shape, generator=g).to(z) * 2.0
                _, d = model(ids, z_init=z0, return_diagnostics=True)
                finals.append(d["z_equilibrium"])
            gap = max(float((a - finals[0]).norm(dim=-1).max()) for a in finals)
        model.train(was_training)
        return ConvergenceReport(float(lip.max()), float(lip.mean()), float(info["converged"].float().mean()),
                                 float(info["iterations"].float().mean()), rate, gap,
                                 {"converged": 0.95, "uniqueness": 10 * model.solver.tol_fixedpoint})  # type: ignore
