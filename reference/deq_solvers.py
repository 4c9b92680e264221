"""Fixed-point solvers, literally: plain iteration, Anderson acceleration, Broyden's method.

The math lives in `specs/deq.md`; each function names its equation IDs. Every solver has the signature
`solver(f, z0, *, tol, max_iter, policy, stop_fn, …) -> (z_star, SolverInfo)`: `f` maps a batch `(B, *S)` to
the same shape and acts on each sample independently; residuals and convergence are per sample. The reference
checks convergence and finiteness after every iteration (one host sync each), solves Anderson's small
least-squares problem per sample, and keeps Broyden's inverse Jacobian as a dense matrix. The argument checks
and `SolverInfo` are shared with `optimized/deq_solvers.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reference.validation import ConfigError, ConvergenceError, NonFiniteError, ShapeError, check_floating

__all__ = [
    "POLICIES",
    "RESIDUAL_EPS",
    "SOLVERS",
    "ConvergenceWarning",
    "Map",
    "SolverInfo",
    "StopFn",
    "anderson",
    "broyden",
    "energy_stop",
    "fixed_point_iteration",
    "relative_residual",
    "solve",
]

logger = logging.getLogger(__name__)

Map = Callable[[Tensor], Tensor]
StopFn = Callable[[Tensor, Tensor], Tensor]
POLICIES = ("flag", "warn", "raise")
SOLVERS = ("fixed_point", "anderson", "broyden")
RESIDUAL_EPS = 1e-8  # ε of [DEQ-2]: the floor under ‖f(z)‖ in the relative residual


class ConvergenceWarning(UserWarning):
    """A solve stopped at max_iter with some samples above tolerance (policy "warn")."""


@dataclass
class SolverInfo:
    """Per-sample diagnostics of one solve. No field needs a host sync to build.

    converged: (B,) bool; iterations: (B,) int64, updates applied before the sample stopped (max_iter when it
    never converged); residual: (B,) relative residual [DEQ-2] of the returned iterate; trace: (T, B) the
    residual of every evaluated iterate (T = max(iterations) + 1); method: the solver's name.
    """

    converged: Tensor
    iterations: Tensor
    residual: Tensor
    trace: Tensor
    method: str

    def batch_means(self) -> dict[str, Tensor]:
        """Diagnostics averaged over the batch, as 0-dim tensors (no host sync)."""
        return {"converged": self.converged.to(self.residual.dtype).mean(),
                "iterations": self.iterations.to(self.residual.dtype).mean(),
                "residual": self.residual.mean(), "max_residual": self.residual.max()}

    def summary(self) -> dict[str, float]:
        """`batch_means` as Python floats (one host sync), for logging."""
        return {k: float(v) for k, v in self.batch_means().items()}


# ---------------------------------------------------------------------------------------------- checks

def validate_solve_args(z0: Tensor, tol: float, max_iter: int, policy: str, fn: str) -> None:
    check_floating(z0, "z0", fn=fn)
    if z0.ndim < 1 or z0.shape[0] == 0:
        raise ShapeError(f"{fn}: z0 must be a batch (B, *S) with B >= 1, got shape {tuple(z0.shape)}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ConfigError(f"{fn}: tol must be a number > 0 (math.inf to rely on stop_fn alone), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ConfigError(f"{fn}: max_iter must be an int >= 0, got {max_iter!r}")
    if policy not in POLICIES:
        raise ConfigError(f"{fn}: policy must be one of {POLICIES}, got {policy!r}")


def validate_anderson_args(m: int, beta: float, lam: float, fn: str) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"{fn}: m (Anderson memory) must be an int >= 1, got {m!r}")
    if not 0.0 < beta <= 1.0:
        raise ConfigError(f"{fn}: beta (Anderson damping) must lie in (0, 1], got {beta!r}")
    if not lam >= 0.0:
        raise ConfigError(f"{fn}: lam (Anderson regularisation) must be >= 0, got {lam!r}")


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """[DEQ-6a] A block with autocast disabled on `device` (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def call_map(f: Map, z: Tensor, step: int, fn: str) -> Tensor:
    """f(z) with its output shape checked (shapes are static: no sync)."""
    fz = f(z)
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
        raise ShapeError(f"{fn}: f must map z of shape {tuple(z.shape)} to the same shape, got {got} "
                         f"at iteration {step}")
    return fz


def call_stop(stop_fn: StopFn | None, z: Tensor, fz: Tensor, fn: str) -> Tensor | None:
    if stop_fn is None:
        return None
    ok = stop_fn(z, fz)
    if not isinstance(ok, Tensor) or ok.shape != (z.shape[0],):
        got = tuple(ok.shape) if isinstance(ok, Tensor) else type(ok).__name__
        raise ShapeError(f"{fn}: stop_fn must return a (B,) = ({z.shape[0]},) bool tensor, got {got}")
    return ok.to(torch.bool)


def nonfinite_message(fn: str, step: int, n_bad: int, first: int) -> str:
    return (f"{fn}: iteration {step}: the iterate z_{step} or f(z_{step}) holds NaN/inf in {n_bad} sample(s) "
            f"(first: sample {first}); the solve stopped. Check that f is contractive (Lipschitz < 1), lower the "
            f"damping (beta) or use plain iteration, and check the inputs for non-finite values")


def nonconvergence_message(fn: str, n_bad: int, batch: int, tol: float, max_iter: int, worst: float) -> str:
    return (f"{fn}: {n_bad}/{batch} sample(s) did not converge to tol={tol:g} within max_iter={max_iter} "
            f"iterations (worst relative residual {worst:.3e}); raise max_iter, loosen tol, or make f "
            f"contractive (Lipschitz < 1)")


def apply_policy(info: SolverInfo, policy: str, tol: float, max_iter: int, fn: str) -> None:
    """[DEQ-16] Non-convergence policy: "flag" reports through `info` only, "warn" warns, "raise" raises."""
    if policy == "flag":
        return
    n_bad = int((~info.converged).sum())
    if n_bad == 0:
        return
    msg = nonconvergence_message(fn, n_bad, info.converged.numel(), tol, max_iter, float(info.residual.max()))
    if policy == "raise":
        raise ConvergenceError(msg)
    logger.warning(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- residual

def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """[DEQ-2] r(z) = ‖f(z) − z‖ / (‖f(z)‖ + ε) per sample, norms over all non-batch dims. (B, *S) → (B,)."""
    diff = (fz - z).flatten(1)  # (B, N)
    return torch.linalg.vector_norm(diff, dim=1) / (torch.linalg.vector_norm(fz.flatten(1), dim=1) + RESIDUAL_EPS)


def energy_stop(energy: Callable[[Tensor], Tensor], tol_energy: float) -> StopFn:
    """[DEQ-17] An extra stopping rule for `stop_fn`: |E(f(z)) − E(z)| ≤ tol_energy, per sample.

    `energy` maps (B, *S) to (B,). A sample then stops only when both the residual and the energy test pass.
    """
    if isinstance(tol_energy, bool) or not isinstance(tol_energy, (int, float)) or not tol_energy > 0:
        raise ConfigError(f"energy_stop: tol_energy must be a number > 0, got {tol_energy!r}")
    def stop(z: Tensor, fz: Tensor) -> Tensor:
        return (energy(fz) - energy(z)).abs() <= tol_energy
    return stop


class _Tracker:
    """Best iterate, convergence flags and trace of a solve; checks finiteness every step (host syncs)."""

    def __init__(self, z0: Tensor, tol: float, stop_fn: StopFn | None, fn: str) -> None:
        batch = z0.shape[0]
        self.best_z = z0
        self.best_r = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.trace: list[Tensor] = []
        self.tol, self.stop_fn, self.fn = tol, stop_fn, fn

    def observe(self, step: int, z: Tensor, fz: Tensor) -> Tensor:
        """Record iterate z_step with f(z_step); return the (B,) mask of samples that keep iterating."""
        active = ~self.converged
        bad = active & ~(torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(fz.flatten(1)).all(1))
        if bool(bad.any()):
            raise NonFiniteError(nonfinite_message(self.fn, step, int(bad.sum()), int(bad.nonzero()[0, 0])))
        r = relative_residual(z, fz)  # (B,)
        self.trace.append(r.detach())
        now = active & (r <= self.tol)
        extra = call_stop(self.stop_fn, z, fz, self.fn)
        if extra is not None:
            now = now & extra
        take = active & ((r < self.best_r) | now)
        shape = (-1,) + (1,) * (z.ndim - 1)
        self.best_z = torch.where(take.view(shape), z, self.best_z)
        self.best_r = torch.where(take, r, self.best_r)
        self.iterations = torch.where(active, torch.full_like(self.iterations, step), self.iterations)
        self.converged = self.converged | now
        return active & ~now

    def finish(self, policy: str, max_iter: int) -> tuple[Tensor, SolverInfo]:
        info = SolverInfo(self.converged, self.iterations, self.best_r.detach(), torch.stack(self.trace), self.fn)
        apply_policy(info, policy, self.tol, max_iter, self.fn)
        return self.best_z, info


def _keep(active: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Advance only the samples still iterating; stopped samples stay frozen."""
    return torch.where(active.view((-1,) + (1,) * (new.ndim - 1)), new, old)


# ---------------------------------------------------------------------------------------------- solvers

def fixed_point_iteration(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, policy: str = "flag",
                          stop_fn: StopFn | None = None, check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """[DEQ-1] [DEQ-3] Plain (Picard/Banach) iteration z_{k+1} = f(z_k), stopping per sample at r ≤ tol.

    `check_every` is accepted for parity with the optimized solver; the reference checks every iteration.
    """
    fn = "fixed_point_iteration"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    tracker = _Tracker(z0, tol, stop_fn, fn)
    z = z0  # (B, *S)
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        active = tracker.observe(k, z, fz)
        if k == max_iter or not bool(active.any()):
            break
        z = _keep(active, fz, z)
    return tracker.finish(policy, max_iter)


def anderson_weights(G: Tensor, lam: float) -> Tensor:
    """[DEQ-4] α = argmin_{1ᵀα = 1} αᵀ (G Gᵀ / s + λ I) α, s = tr(G Gᵀ)/n, via the bordered KKT system.

    G: (n, N) the last n residuals g_i = f(x_i) − x_i of one sample. Returns α: (n,).
    """
    n = G.shape[0]
    A = G @ G.T  # (n, n)
    s = torch.clamp(torch.trace(A) / n, min=torch.finfo(G.dtype).tiny)
    A = A / s + lam * torch.eye(n, dtype=G.dtype, device=G.device)
    K = torch.zeros(n + 1, n + 1, dtype=G.dtype, device=G.device)
    K[0, 1:] = 1.0
    K[1:, 0] = 1.0
    K[1:, 1:] = A
    rhs = torch.zeros(n + 1, dtype=G.dtype, device=G.device)
    rhs[0] = 1.0
    return torch.linalg.solve(K, rhs)[1:]


def anderson(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, m: int = 5, beta: float = 1.0,
             lam: float = 1e-4, policy: str = "flag", stop_fn: StopFn | None = None,
             check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """[DEQ-1] [DEQ-4] [DEQ-5] Anderson acceleration (type II, memory m, damping β, regularisation λ).

    z_{k+1} = β Σ α_i f(x_i) + (1 − β) Σ α_i x_i over the last min(k+1, m) iterates x_i, with α from
    `anderson_weights` solved per sample. `check_every` is accepted for parity; the reference checks every step.
    """
    fn = "anderson"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    validate_anderson_args(m, beta, lam, fn)
    tracker = _Tracker(z0, tol, stop_fn, fn)
    # [DEQ-6a] the mixing runs in at least float32 (`wt`) with autocast off, whatever f returns (bf16 under
    # autocast); each new iterate keeps z's dtype, as in the optimized solver
    wt = torch.promote_types(z0.dtype, torch.float32)
    X: list[Tensor] = []  # past iterates, oldest first, each (B, *S) in wt
    F: list[Tensor] = []  # f of each, in wt
    z = z0
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        active = tracker.observe(k, z, fz)
        if k == max_iter or not bool(active.any()):
            break
        X, F = [*X, z.to(wt)][-m:], [*F, fz.to(wt)][-m:]
        new = []
        for b in range(z.shape[0]):
            if not bool(active[b]):
                new.append(z[b])
                continue
            Xb = torch.stack([x[b].flatten() for x in X])  # (n, N)
            Fb = torch.stack([y[b].flatten() for y in F])  # (n, N)
            with autocast_off(z.device):
                alpha = anderson_weights(Fb - Xb, lam)  # (n,)
                zb = beta * (alpha @ Fb) + (1.0 - beta) * (alpha @ Xb)  # (N,)
            new.append(zb.to(z.dtype).view(z.shape[1:]))
        z = _keep(active, torch.stack(new), z)
    return tracker.finish(policy, max_iter)


def broyden(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, policy: str = "flag",
            stop_fn: StopFn | None = None, check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """[DEQ-1] [DEQ-6] Broyden's "good" method on g(z) = f(z) − z with a dense inverse-Jacobian estimate H.

    H_0 = −I (so the first step is plain iteration), z_{k+1} = z_k − H_k g_k, and after each step
    H ← H + (s − H y) sᵀH / (sᵀ H y) with s = z_{k+1} − z_k, y = g_{k+1} − g_k (skipped when sᵀHy ≈ 0).
    """
    fn = "broyden"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    tracker = _Tracker(z0, tol, stop_fn, fn)
    B, N = z0.shape[0], z0[0].numel()
    # [DEQ-6a] the quasi-Newton algebra runs in at least float32 (`wt`) with autocast off, whatever f returns
    # (bf16 under autocast); each new iterate keeps z's dtype, as in the optimized solver
    wt = torch.promote_types(z0.dtype, torch.float32)
    H = -torch.eye(N, dtype=wt, device=z0.device).expand(B, N, N)  # (B, N, N)
    z = z0
    z_prev: Tensor | None = None
    g_prev: Tensor | None = None
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        active = tracker.observe(k, z, fz)
        if k == max_iter or not bool(active.any()):
            break
        with autocast_off(z.device):
            g = (fz.to(wt) - z.to(wt)).flatten(1)  # (B, N)
            if z_prev is not None and g_prev is not None:
                s = (z.to(wt) - z_prev.to(wt)).flatten(1)  # (B, N)
                y = g - g_prev  # (B, N)
                Hy = torch.einsum("bij,bj->bi", H, y)
                sH = torch.einsum("bi,bij->bj", s, H)
                den = (s * Hy).sum(1)  # (B,)
                ok = active & (den.abs() > torch.finfo(wt).eps * s.norm(dim=1) * Hy.norm(dim=1))
                scale = torch.where(ok, 1.0 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
                H = H + scale[:, None, None] * (s - Hy)[:, :, None] * sH[:, None, :]
            step = torch.einsum("bij,bj->bi", H, g)  # (B, N)
            z_prev, g_prev = z, g
            z = _keep(active, (z.to(wt) - step.view(z.shape)).to(z.dtype), z)
    return tracker.finish(policy, max_iter)


def solve(f: Map, z0: Tensor, *, method: str = "anderson", tol: float = 1e-4, max_iter: int = 50,
          policy: str = "flag", stop_fn: StopFn | None = None, m: int = 5, beta: float = 1.0, lam: float = 1e-4,
          check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """[DEQ-1] Dispatch to a solver by name (`SOLVERS`); Anderson's m, β, λ are ignored by the others."""
    if method == "fixed_point":
        return fixed_point_iteration(f, z0, tol=tol, max_iter=max_iter, policy=policy, stop_fn=stop_fn,
                                     check_every=check_every)
    if method == "anderson":
        return anderson(f, z0, tol=tol, max_iter=max_iter, m=m, beta=beta, lam=lam, policy=policy,
                        stop_fn=stop_fn, check_every=check_every)
    if method == "broyden":
        return broyden(f, z0, tol=tol, max_iter=max_iter, policy=policy, stop_fn=stop_fn, check_every=check_every)
    raise ConfigError(f"solve: method must be one of {SOLVERS}, got {method!r}")
