"""Fixed-point solvers, fast path: batched, no per-sample Python loops, host syncs only every `check_every` steps.

Implements `reference.deq_solvers.{fixed_point_iteration, anderson, broyden, solve}` (same signatures, same
`SolverInfo`). Method: convergence, best-iterate and non-finite bookkeeping stay on the device as masks, so the
per-sample results (z*, iterations, residuals) equal the reference's whatever `check_every` is; the Python loop
only asks the device "is every sample done, or did one go non-finite?" once every `check_every` iterations
(0: never, run max_iter iterations: no host sync until the single one at the end, which checks for NaN/inf and
applies the policy). Anderson's bordered least-squares systems are solved for the whole batch in one
`torch.linalg.solve_ex` call (no error-check sync); Broyden keeps H = −I + Σ u_i v_iᵀ in low-rank form.
Norms and Anderson's normal equations are computed in at least float32 under half-precision inputs.
On CUDA without autograd recording (`use_kernels`), each iteration's bookkeeping (`_DeviceTracker.observe`) and
each Broyden update run as single Triton launches (`optimized.kernels.deq`): same state, same equations.
Tolerance vs the float64 reference: float64 1e-10, float32 1e-5 (z*), iteration counts equal (±1 where a
residual lands within rounding of tol).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor

from optimized.kernels import kernel_available
from reference.deq_solvers import (
    POLICIES,
    RESIDUAL_EPS,
    SOLVERS,
    ConvergenceWarning,
    Map,
    SolverInfo,
    StopFn,
    autocast_off,
    call_map,
    call_stop,
    energy_stop,
    nonconvergence_message,
    nonfinite_message,
    validate_anderson_args,
    validate_solve_args,
)
from reference.validation import ConfigError, ConvergenceError, NonFiniteError

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

BROYDEN_KERNEL_MAX_N = 4096  # the Broyden kernel holds a dozen length-N rows in registers; wider: torch update
BROYDEN_START_ROWS = 32  # the kernel path's first U/V capacity (doubled when full)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """`reference.deq_solvers.relative_residual`, accumulated in at least float32. (B, *S) → (B,)."""
    wt = _work_dtype(z.dtype)
    fz_w = fz.flatten(1).to(wt)  # (B, N)
    num = torch.linalg.vector_norm(fz_w - z.flatten(1).to(wt), dim=1)
    return num / (torch.linalg.vector_norm(fz_w, dim=1) + RESIDUAL_EPS)


class _DeviceTracker:
    """The reference tracker's bookkeeping as device-side masks; syncs only in `should_stop` and `finish`.
    With `kernels` (CUDA, no autograd) `observe` is one `optimized.kernels.deq` launch updating the same state in
    place (the trace preallocated), instead of a few dozen element-wise kernels."""

    def __init__(self, z0: Tensor, tol: float, stop_fn: StopFn | None, fn: str, check_every: int,
                 max_iter: int = 0, kernels: bool = False) -> None:
        batch, wt = z0.shape[0], _work_dtype(z0.dtype)
        self.best_z = z0.clone(memory_format=torch.contiguous_format) if kernels else z0
        self.best_r = torch.full((batch,), math.inf, dtype=wt, device=z0.device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.first_bad = torch.full((batch,), -1, dtype=torch.long, device=z0.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.trace: list[Tensor] = []
        self.tol, self.stop_fn, self.fn, self.check_every = tol, stop_fn, fn, check_every
        self.shape = (-1,) + (1,) * (z0.ndim - 1)
        self.kernels = kernels
        if kernels:
            from optimized.kernels.deq import observe  # imported once per solve, not per iteration

            self.kernel_observe = observe
            self.trace_buf = torch.empty(max_iter + 1, batch, dtype=wt, device=z0.device)
            self.counts = torch.zeros(max_iter + 1, 2, dtype=torch.int32, device=z0.device)  # see should_stop
            # [tol, residual eps, machine eps] in the work dtype (read by the kernels, no host scalars)
            self.consts = torch.tensor([tol, RESIDUAL_EPS, torch.finfo(wt).eps], dtype=wt, device=z0.device)

    def observe(self, step: int, z: Tensor, fz: Tensor, z_next: Tensor | None = None) -> Tensor:
        """Record z_step and f(z_step); return the (B,) mask of samples that keep iterating (no sync). With
        `z_next` (kernel path only) also write plain iteration's update f(z) where active, else z, into it."""
        if self.kernels:
            extra = call_stop(self.stop_fn, z, fz, self.fn)
            self.kernel_observe(z, fz, self.best_z, self.best_r, self.converged, self.iterations, self.first_bad,
                                self.active, self.trace_buf, self.counts, self.consts, step, extra=extra,
                                z_next=z_next)
            return self.active
        active = ~self.converged & (self.first_bad < 0)
        finite = torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(fz.flatten(1)).all(1)
        self.first_bad = torch.where(active & ~finite, torch.full_like(self.first_bad, step), self.first_bad)
        active = active & finite
        r = relative_residual(z, fz)  # (B,)
        self.trace.append(r.detach())
        now = active & (r <= self.tol)
        extra = call_stop(self.stop_fn, z, fz, self.fn)
        if extra is not None:
            now = now & extra
        take = active & ((r < self.best_r) | now)
        self.best_z = torch.where(take.view(self.shape), z, self.best_z)
        self.best_r = torch.where(take, r, self.best_r)
        self.iterations = torch.where(active, torch.full_like(self.iterations, step), self.iterations)
        self.converged = self.converged | now
        self.active = active & ~now
        return self.active

    def should_stop(self, step: int) -> bool:
        """Every `check_every` steps: one host sync asking whether all samples stopped or one went non-finite."""
        if self.check_every <= 0 or (step + 1) % self.check_every != 0:
            return False
        if self.kernels:  # the kernel counted [still iterating, ever non-finite] at this step
            n_active, n_bad = self.counts[step].tolist()
            return n_active == 0 or n_bad > 0
        flags = torch.stack([self.active.any(), (self.first_bad >= 0).any()]).tolist()
        return (not flags[0]) or bool(flags[1])

    def finish(self, policy: str, max_iter: int) -> tuple[Tensor, SolverInfo]:
        """One host sync: raise on non-finite iterates, trim the trace, apply the policy."""
        bad = self.first_bad >= 0
        big = torch.iinfo(torch.long).max
        first_step = torch.where(bad, self.first_bad, torch.full_like(self.first_bad, big))
        stats = torch.stack([bad.sum(), first_step.min(), torch.argmin(first_step), self.iterations.max(),
                             (~self.converged).sum()]).tolist()
        if stats[0] > 0:
            step = int(stats[1])
            n_bad = int((self.first_bad == step).sum())
            raise NonFiniteError(nonfinite_message(self.fn, step, n_bad, int(stats[2])))
        n_trace = int(stats[3]) + 1
        trace = self.trace_buf[:n_trace].clone() if self.kernels else torch.stack(self.trace[:n_trace])  # (T, B)
        info = SolverInfo(self.converged, self.iterations, self.best_r.to(self.best_z.dtype).detach(), trace,
                          self.fn)
        n_left = int(stats[4])
        if policy != "flag" and n_left > 0:
            msg = nonconvergence_message(self.fn, n_left, self.converged.numel(), self.tol, max_iter,
                                         float(info.residual.max()))
            if policy == "raise":
                raise ConvergenceError(msg)
            logger.warning(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return self.best_z, info


def use_kernels(z0: Tensor) -> bool:
    """Whether a solve from `z0` runs its bookkeeping in `optimized.kernels.deq`: CUDA with Triton (unless
    `MEMARCH_DISABLE_KERNELS` names "deq") and no autograd recording (the kernels write state in place; the
    unrolled backward mode runs the solver under autograd and takes the torch path)."""
    return kernel_available(z0, "deq") and not torch.is_grad_enabled()


def _keep(active: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(active.view((-1,) + (1,) * (new.ndim - 1)), new, old)


def fixed_point_iteration(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, policy: str = "flag",
                          stop_fn: StopFn | None = None, check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """`reference.deq_solvers.fixed_point_iteration`: z_{k+1} = f(z_k), masks on device, sync every k steps."""
    fn = "fixed_point_iteration"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    kernels = use_kernels(z0)
    tracker = _DeviceTracker(z0, tol, stop_fn, fn, check_every, max_iter, kernels)
    z = z0  # (B, *S)
    buffers = [torch.empty(z0.shape, dtype=z0.dtype, device=z0.device) for _ in range(2)] if kernels else []
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        if kernels:  # one launch: bookkeeping and the update, into the buffer z is not in
            z_next = buffers[k % 2]
            tracker.observe(k, z, fz, z_next=z_next)
            if k == max_iter or tracker.should_stop(k):
                break
            z = z_next
            continue
        active = tracker.observe(k, z, fz)
        if k == max_iter or tracker.should_stop(k):
            break
        z = _keep(active, fz, z)
    return tracker.finish(policy, max_iter)


def anderson(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, m: int = 5, beta: float = 1.0,
             lam: float = 1e-4, policy: str = "flag", stop_fn: StopFn | None = None,
             check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """`reference.deq_solvers.anderson`: the whole batch's (n+1)×(n+1) bordered systems in one solve_ex call."""
    fn = "anderson"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    validate_anderson_args(m, beta, lam, fn)
    tracker = _DeviceTracker(z0, tol, stop_fn, fn, check_every, max_iter, use_kernels(z0))
    B, wt = z0.shape[0], _work_dtype(z0.dtype)
    X: list[Tensor] = []  # last m iterates, each (B, N) in the work dtype
    F: list[Tensor] = []
    z = z0
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        active = tracker.observe(k, z, fz)
        if k == max_iter or tracker.should_stop(k):
            break
        with autocast_off(z.device):  # [DEQ-6a] the mixing in the work dtype
            X, F = [*X, z.flatten(1).to(wt)][-m:], [*F, fz.flatten(1).to(wt)][-m:]
            n = len(X)
            Xs, Fs = torch.stack(X, 1), torch.stack(F, 1)  # (B, n, N)
            G = Fs - Xs
            A = G @ G.transpose(1, 2)  # (B, n, n)
            s = torch.clamp(A.diagonal(dim1=1, dim2=2).sum(1) / n, min=torch.finfo(wt).tiny)  # (B,)
            A = A / s[:, None, None] + lam * torch.eye(n, dtype=wt, device=z.device)
            ones = torch.ones(B, n, 1, dtype=wt, device=z.device)
            K = torch.cat([torch.cat([torch.zeros(B, 1, 1, dtype=wt, device=z.device), ones.transpose(1, 2)], 2),
                           torch.cat([ones, A], 2)], 1)  # (B, n+1, n+1)
            rhs = torch.zeros(B, n + 1, dtype=wt, device=z.device)
            rhs[:, 0] = 1.0
            alpha = torch.linalg.solve_ex(K, rhs)[0][:, 1:]  # (B, n)
            new = (beta * torch.einsum("bn,bnd->bd", alpha, Fs)
                   + (1.0 - beta) * torch.einsum("bn,bnd->bd", alpha, Xs))
            z = _keep(active, new.to(z.dtype).view(z.shape), z)
    return tracker.finish(policy, max_iter)


def broyden(f: Map, z0: Tensor, *, tol: float = 1e-4, max_iter: int = 50, policy: str = "flag",
            stop_fn: StopFn | None = None, check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """`reference.deq_solvers.broyden` with H = −I + Σ u_i v_iᵀ kept as (B, j, N) factors (no N×N matrix)."""
    fn = "broyden"
    validate_solve_args(z0, tol, max_iter, policy, fn)
    kernels = use_kernels(z0)
    tracker = _DeviceTracker(z0, tol, stop_fn, fn, check_every, max_iter, kernels)
    if kernels and z0[0].numel() <= BROYDEN_KERNEL_MAX_N:
        return _broyden_kernel(f, z0, tracker, max_iter, policy)
    wt = _work_dtype(z0.dtype)
    Us: list[Tensor] = []  # each (B, N)
    Vs: list[Tensor] = []
    z = z0
    z_prev: Tensor | None = None
    g_prev: Tensor | None = None

    def apply_h(x: Tensor, U: Tensor | None, V: Tensor | None) -> Tensor:  # H x = −x + Σ u_i (v_i·x)
        if U is None or V is None:
            return -x
        return -x + torch.einsum("bjn,bj->bn", U, torch.einsum("bjn,bn->bj", V, x))

    for k in range(max_iter + 1):
        fz = call_map(f, z, k, fn)
        active = tracker.observe(k, z, fz)
        if k == max_iter or tracker.should_stop(k):
            break
        with autocast_off(z.device):  # [DEQ-6a] the update in the work dtype
            g = (fz - z).flatten(1).to(wt)  # (B, N)
            U, V = (torch.stack(Us, 1), torch.stack(Vs, 1)) if Us else (None, None)  # (B, j, N)
            if z_prev is not None and g_prev is not None:
                s = (z.flatten(1).to(wt) - z_prev)  # (B, N)
                y = g - g_prev
                Hy = apply_h(y, U, V)
                sH = apply_h(s, V, U)  # Hᵀ s
                den = (s * Hy).sum(1)  # (B,)
                ok = active & (den.abs() > torch.finfo(wt).eps * s.norm(dim=1) * Hy.norm(dim=1))
                scale = torch.where(ok, 1.0 / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
                Us.append(scale[:, None] * (s - Hy))
                Vs.append(sH)
                U, V = torch.stack(Us, 1), torch.stack(Vs, 1)
            step = apply_h(g, U, V)  # (B, N)
            z_prev, g_prev = z.flatten(1).to(wt), g
            z = _keep(active, (z.flatten(1).to(wt) - step).to(z.dtype).view(z.shape), z)
    return tracker.finish(policy, max_iter)


def _broyden_kernel(f: Map, z0: Tensor, tracker: _DeviceTracker, max_iter: int,
                    policy: str) -> tuple[Tensor, SolverInfo]:
    """`broyden` with each iteration's update in one `optimized.kernels.deq.broyden_step` launch; U, V are
    (B, capacity, N) buffers in the work dtype, grown by doubling (up to max_iter rows)."""
    from optimized.kernels.deq import broyden_step

    batch, n, wt = z0.shape[0], z0[0].numel(), _work_dtype(z0.dtype)
    cap = max(1, min(max_iter, BROYDEN_START_ROWS))
    U = torch.zeros(batch, cap, n, dtype=wt, device=z0.device)
    V = torch.zeros_like(U)
    z_prev = torch.empty(batch, n, dtype=wt, device=z0.device)
    g_prev = torch.empty_like(z_prev)
    z, j = z0, 0
    for k in range(max_iter + 1):
        fz = call_map(f, z, k, "broyden")
        active = tracker.observe(k, z, fz)
        if k == max_iter or tracker.should_stop(k):
            break
        if k > 0 and j == U.shape[1]:  # full: double the capacity (rare, no sync)
            more = min(U.shape[1], max_iter - U.shape[1]) or 1
            U = torch.cat([U, U.new_zeros(batch, more, n)], 1)
            V = torch.cat([V, V.new_zeros(batch, more, n)], 1)
        z = broyden_step(z, fz, z_prev, g_prev, U, V, active, tracker.consts, j, has_prev=k > 0)
        j += 1 if k > 0 else 0
    return tracker.finish(policy, max_iter)


def solve(f: Map, z0: Tensor, *, method: str = "anderson", tol: float = 1e-4, max_iter: int = 50,
          policy: str = "flag", stop_fn: StopFn | None = None, m: int = 5, beta: float = 1.0, lam: float = 1e-4,
          check_every: int = 4) -> tuple[Tensor, SolverInfo]:
    """`reference.deq_solvers.solve`: dispatch by name."""
    if method == "fixed_point":
        return fixed_point_iteration(f, z0, tol=tol, max_iter=max_iter, policy=policy, stop_fn=stop_fn,
                                     check_every=check_every)
    if method == "anderson":
        return anderson(f, z0, tol=tol, max_iter=max_iter, m=m, beta=beta, lam=lam, policy=policy,
                        stop_fn=stop_fn, check_every=check_every)
    if method == "broyden":
        return broyden(f, z0, tol=tol, max_iter=max_iter, policy=policy, stop_fn=stop_fn, check_every=check_every)
    raise ConfigError(f"solve: method must be one of {SOLVERS}, got {method!r}")
