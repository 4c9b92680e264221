"""Triton kernels for the fixed-point solvers' per-iteration bookkeeping (`optimized.deq_solvers` dispatches here on
CUDA when no gradient is recorded).

Why: at the sizes DEQ blocks use (B=256, d=512) one solver iteration is a few dozen tiny element-wise kernels —
the finite checks, the two norms of the relative residual, the best-iterate and convergence masks, Broyden's
low-rank products — each costing more host time to launch than device time to run. Both implementations spent
≈ 0.45 ms per iteration launching them. These kernels do one iteration's bookkeeping in one launch, one program
per sample (row), so an iteration costs f's own kernels plus one or two launches.

`_observe` is `optimized.deq_solvers._DeviceTracker.observe` for one row of z and f(z) (both (B, N)):

    active  = ¬converged ∧ first_bad < 0;   finite = every z_i and f(z)_i finite
    first_bad ← step where active ∧ ¬finite;   active ← active ∧ finite
    r = ‖f(z) − z‖ / (‖f(z)‖ + ε)  (written to the trace row)
    now = active ∧ r ≤ tol [∧ extra];   take = active ∧ (r < best_r ∨ now)
    best_z ← z, best_r ← r where take;   iterations ← step where active;   converged ← converged ∨ now
    active ← active ∧ ¬now;   optionally z_next = f(z) where active else z (plain iteration's update)

and counts, with atomic adds into row `step` of an int32 (max_iter + 1, 2) table, the samples still iterating
and the samples ever non-finite, so the host's every-`check_every` question "stop?" is one read of two integers.

`_broyden_step` is one step of `optimized.deq_solvers.broyden` for one row with the inverse-Jacobian estimate
H = −I + Σ_{i<j} u_i v_iᵀ stored as the first j rows of U, V (B, M, N), s = z − z_prev, y = g − g_prev,
g = f(z) − z:

    Hy = H y,  sH = Hᵀ s,  den = s·Hy,  ok = active ∧ |den| > eps ‖s‖ ‖Hy‖
    u_j = (s − Hy)/den where ok else 0,  v_j = sH        (rows j of U, V)
    z_next = z − H' g where active else z,   H' = H + u_j v_jᵀ;   z_prev ← z, g_prev ← g

in one pass over U and V (H y, Hᵀ s and the first j terms of H' g share the loads).

Precision: every quantity is computed in the solver's work dtype (float32 for half and float32 iterates, float64
for float64 iterates), as in the torch path; the norms are sums of squares in that dtype, so residuals can differ
from `torch.linalg.vector_norm`'s in the last bits (iteration counts equal, ±1 where a residual lands within
rounding of tol). Tolerance against the torch path: float64 1e-12, float32 1e-5 relative. Under
`TRITON_INTERPRET=1` the kernels run on CPU tensors (the tests force the kernel path there); `compile_for_gpu`
compiles both for sm_90 without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["broyden_step", "compile_for_gpu", "observe"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations

_OBSERVE_BLOCK = 1024


@_jit
def _observe(z_ptr, fz_ptr, best_z_ptr, best_r_ptr, conv_ptr, iters_ptr, bad_ptr, active_ptr, trace_ptr,  # type: ignore[no-untyped-def]
             counts_ptr, extra_ptr, next_ptr, consts_ptr, n, batch, step,
             HAS_EXTRA: tl.constexpr, WRITE_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    offs = tl.arange(0, BLOCK)
    tol = tl.load(consts_ptr)  # the work dtype: float32 or float64
    eps = tl.load(consts_ptr + 1)
    ss_d = tl.zeros([BLOCK], dtype=tol.dtype)
    ss_f = tl.zeros([BLOCK], dtype=tol.dtype)
    n_bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        z = tl.load(z_ptr + base + idx, mask=m, other=0.0).to(tol.dtype)
        fz = tl.load(fz_ptr + base + idx, mask=m, other=0.0).to(tol.dtype)
        finite = (z == z) & (tl.abs(z) < float("inf")) & (fz == fz) & (tl.abs(fz) < float("inf"))
        n_bad += tl.where(finite, 0, 1)
        d = fz - z
        ss_d += d * d
        ss_f += fz * fz
    nonfinite = tl.sum(n_bad, axis=0) > 0
    r = tl.sqrt(tl.sum(ss_d, axis=0)) / (tl.sqrt(tl.sum(ss_f, axis=0)) + eps)
    conv = tl.load(conv_ptr + row) != 0
    first_bad = tl.load(bad_ptr + row)
    active = (~conv) & (first_bad < 0)
    first_bad = tl.where(active & nonfinite, step, first_bad).to(first_bad.dtype)
    tl.store(bad_ptr + row, first_bad)
    active = active & (~nonfinite)
    tl.store(trace_ptr + step * batch + row, r)
    now = active & (r <= tol)
    if HAS_EXTRA:
        now = now & (tl.load(extra_ptr + row) != 0)
    best_r = tl.load(best_r_ptr + row)
    take = active & ((r < best_r) | now)
    tl.store(best_r_ptr + row, tl.where(take, r, best_r))
    iters = tl.load(iters_ptr + row)
    tl.store(iters_ptr + row, tl.where(active, step, iters).to(iters.dtype))
    tl.store(conv_ptr + row, conv | now)
    still = active & (~now)
    tl.store(active_ptr + row, still)
    # the host's early-exit question, answered on the device: samples still iterating, samples ever non-finite
    tl.atomic_add(counts_ptr + 2 * step, still.to(tl.int32))
    tl.atomic_add(counts_ptr + 2 * step + 1, (first_bad >= 0).to(tl.int32))
    if take:
        for start in range(0, n, BLOCK):
            idx = start + offs
            m = idx < n
            tl.store(best_z_ptr + base + idx, tl.load(z_ptr + base + idx, mask=m), mask=m)
    if WRITE_NEXT:
        for start in range(0, n, BLOCK):
            idx = start + offs
            m = idx < n
            z_raw = tl.load(z_ptr + base + idx, mask=m)
            fz_raw = tl.load(fz_ptr + base + idx, mask=m)
            tl.store(next_ptr + base + idx, tl.where(still, fz_raw, z_raw), mask=m)


@_jit
def _broyden_step(z_ptr, fz_ptr, zprev_ptr, gprev_ptr, U_ptr, V_ptr, active_ptr, next_ptr, consts_ptr,  # type: ignore[no-untyped-def]
                  n, j, cap,
                  HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    offs = tl.arange(0, BLOCK)
    m = offs < n
    eps = tl.load(consts_ptr + 2)
    z = tl.load(z_ptr + base + offs, mask=m, other=0.0).to(eps.dtype)
    g = tl.load(fz_ptr + base + offs, mask=m, other=0.0).to(eps.dtype) - z
    act = tl.load(active_ptr + row) != 0
    step = -g
    if HAS_PREV:
        s = z - tl.load(zprev_ptr + base + offs, mask=m, other=0.0)
        y = g - tl.load(gprev_ptr + base + offs, mask=m, other=0.0)
        hy = -y
        sh = -s
        for i in range(0, j):
            row_i = (row * cap + i) * n
            u = tl.load(U_ptr + row_i + offs, mask=m, other=0.0)
            v = tl.load(V_ptr + row_i + offs, mask=m, other=0.0)
            hy += u * tl.sum(v * y, axis=0)
            sh += v * tl.sum(u * s, axis=0)
            step += u * tl.sum(v * g, axis=0)
        den = tl.sum(s * hy, axis=0)
        bound = eps * tl.sqrt(tl.sum(s * s, axis=0)) * tl.sqrt(tl.sum(hy * hy, axis=0))
        ok = act & (tl.abs(den) > bound)
        scale = tl.where(ok, 1.0 / tl.where(ok, den, 1.0), 0.0)
        u_new = scale * (s - hy)
        row_j = (row * cap + j) * n
        tl.store(U_ptr + row_j + offs, u_new, mask=m)
        tl.store(V_ptr + row_j + offs, sh, mask=m)
        step += u_new * tl.sum(sh * g, axis=0)
    tl.store(zprev_ptr + base + offs, z, mask=m)
    tl.store(gprev_ptr + base + offs, g, mask=m)
    z_raw = tl.load(z_ptr + base + offs, mask=m)
    tl.store(next_ptr + base + offs, tl.where(act, (z - step).to(z_raw.dtype), z_raw), mask=m)


def _rows(x: Tensor) -> Tensor:
    return x if x.ndim == 2 and x.is_contiguous() else x.reshape(x.shape[0], -1).contiguous()


def observe(z: Tensor, fz: Tensor, best_z: Tensor, best_r: Tensor, converged: Tensor, iterations: Tensor,
            first_bad: Tensor, active: Tensor, trace: Tensor, counts: Tensor, consts: Tensor, step: int,
            extra: Tensor | None = None, z_next: Tensor | None = None) -> None:
    """One `_observe` launch over the batch. State tensors ((B,) and (B, N) `best_z`) are updated in place; the
    relative residuals go to row `step` of `trace` (max_iter + 1, B); row `step` of `counts` (max_iter + 1, 2),
    int32 zeros beforehand, receives [samples still iterating, samples ever non-finite]; `consts` = [tol, eps] in
    the work dtype; `z_next` (same shape as z), when given, receives plain iteration's update."""
    zr, fr = _rows(z), _rows(fz)
    batch, n = zr.shape
    block = min(_OBSERVE_BLOCK, triton.next_power_of_2(max(n, 16)))
    _observe[(batch,)](zr, fr, best_z, best_r, converged, iterations, first_bad, active, trace, counts,
                       extra if extra is not None else active, z_next if z_next is not None else zr, consts, n,
                       batch, step, HAS_EXTRA=extra is not None, WRITE_NEXT=z_next is not None, BLOCK=block,
                       num_warps=4)


def broyden_step(z: Tensor, fz: Tensor, z_prev: Tensor, g_prev: Tensor, U: Tensor, V: Tensor, active: Tensor,
                 consts: Tensor, j: int, has_prev: bool) -> Tensor:
    """One `_broyden_step` launch: returns z_next (z's shape and dtype); writes rows j of U, V (B, M, N) when
    `has_prev`, and z_prev, g_prev ((B, N), work dtype) in place. `consts`[2] = the work dtype's eps."""
    zr, fr = _rows(z), _rows(fz)
    batch, n = zr.shape
    out = torch.empty_like(zr)
    block = triton.next_power_of_2(max(n, 16))
    _broyden_step[(batch,)](zr, fr, z_prev, g_prev, U, V, active, out, consts, n, j, U.shape[1],
                            HAS_PREV=has_prev, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.view(z.shape)


def compile_for_gpu(capability: int = 90, dtype: str = "fp32", *, n: int = 512) -> list[Any]:
    """Compile `_observe` and `_broyden_step` for CUDA compute capability `capability` with iterates in `dtype`
    ("fp32", "bf16", "fp16"; the work dtype is fp32) and rows of `n` features, without a GPU. Must run in a
    process without `TRITON_INTERPRET`. Returns the compiled kernels."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    io = {"z_ptr", "fz_ptr", "best_z_ptr", "next_ptr"}
    flags = {"conv_ptr", "active_ptr", "extra_ptr"}
    ints = {"iters_ptr", "bad_ptr"}
    int32s = {"counts_ptr"}

    def pointer(name: str) -> str:
        if name in io:
            return f"*{dtype}"
        if name in flags:
            return "*i1"
        if name in ints:
            return "*i64"
        if name in int32s:
            return "*i32"
        return "*fp32"

    out = []
    for kernel, constexprs in (
            (_observe, {"HAS_EXTRA": True, "WRITE_NEXT": True, "BLOCK": min(_OBSERVE_BLOCK, n)}),
            (_broyden_step, {"HAS_PREV": True, "BLOCK": n})):
        names: list[str] = kernel.arg_names
        signature = {name: "constexpr" if name in constexprs else pointer(name) if name.endswith("_ptr") else "i32"
                     for name in names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(name),): value for name, value in constexprs.items()})
        out.append(triton.compile(source, target=target, options={"num_warps": 4}))
    return out
