"""The selective scan compiled for the CPU (`cpu_scan.c`): forward, and backward through `torch.autograd`.

Why: on a CPU the eager-torch chunked scan (`optimized.ssm.chunked_scan`) makes a handful of full passes over
B·D·N·L elements plus Python overhead per step; the recurrence itself is a few flops and one exp per element.
`cpu_scan.c` runs the recurrence of the reference ([SSM-1]..[SSM-5]) once per time step with the state in
cache and the channel loop vectorised, and the discretisation, the D skip and the z gate fused in. Its
backward (`scan_backward`: the adjoint recurrence, each 64-step tile's states recomputed from the state the
forward stored when entering it) is wrapped as a `torch.autograd.Function`; specs/ssm.md states both.

Build: on first use, `cc` (or `$CC`) compiles `cpu_scan.c` twice (float and double) into shared libraries in
`$MEMARCH_CACHE_DIR` (default `$XDG_CACHE_HOME/memarch`, else `~/.cache/memarch`), named by a hash of the
source, the flags and the compiler, so a changed source or machine rebuilds. Flags: `-O3 -fno-trapping-math`
(which lets the compiler turn selects into blends and so vectorise the exp), plus `-mavx2 -mfma` where torch
reports AVX2; no -ffast-math: IEEE semantics everywhere, and exp is the file's own. Loaded with ctypes, which
releases the GIL, so `torch.get_num_threads()` Python threads split the jobs.

If no compiler is found or the build fails, `unavailable_reason()` says why (a RuntimeWarning says it once per
process) and `optimized.ssm` keeps its torch path; `MEMARCH_DISABLE_KERNELS=cpu_scan` switches this path off.
Tolerances against the float64 reference: float64 1e-10 as the other scan paths; float32 within the MODEL
tolerance (the exp is within 2 ulp).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from optimized.kernels import compile_library, eager, kernels_disabled

__all__ = ["cpu_scan_available", "selective_scan_cpu", "unavailable_reason"]

SOURCE = Path(__file__).with_name("cpu_scan.c")
BLOCK_MAX = 32  # channels per job, as in cpu_scan.c
TILE = 64  # time steps per tile, as in cpu_scan.c
_DTYPES = {torch.float32: 0, torch.float64: 1}
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _flags() -> list[str]:
    flags = ["-O3", "-fno-trapping-math", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def _build() -> tuple[tuple[ctypes.CDLL, ctypes.CDLL] | None, str]:
    """The (float, double) libraries, or None and the reason they cannot be had (said once per process, as a
    warning: the scan then runs its slower torch path)."""
    libraries, reason = _try_build()
    if libraries is None:
        warnings.warn(f"memarch: the compiled CPU selective scan is unavailable ({reason}); the CPU scan uses its "
                      "slower torch path (optimized.ssm.chunked_scan)", RuntimeWarning, stacklevel=2)
    return libraries, reason


def _try_build() -> tuple[tuple[ctypes.CDLL, ctypes.CDLL] | None, str]:
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    libraries = []
    for double in (0, 1):
        library, reason = compile_library(compiler, [*_flags(), f"-DSCAN_DOUBLE={double}"], SOURCE, "cpu_scan")
        if library is None:
            return None, reason
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        # batch, length, dim, nstate, groups, block, job_start, job_stop; u, delta, delta_bias; softplus; A (N, D);
        # B, b_shared; C, c_shared; D, z
        common: list[type[ctypes.c_int64] | type[ctypes.c_void_p] | type[ctypes.c_int]] = [
            i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, flag, ptr, ptr, flag, ptr, flag, ptr, ptr]
        library.scan_forward.argtypes = [*common, ptr, ptr, ptr, ptr]  # h0; y, h_last, h_ckpt
        # h_ckpt, grad_y, grad_last; g_u, g_delta, g_z, g_a, g_b, g_c, g_dskip, g_h0
        library.scan_backward.argtypes = [*common, *[ptr] * 11]
        for name in ("scan_forward", "scan_backward"):
            getattr(library, name).restype = ctypes.c_int
        libraries.append(library)
    return (libraries[0], libraries[1]), ""


@eager
def unavailable_reason() -> str:
    """Why the compiled CPU scan cannot run here ("" when it can)."""
    if "cpu_scan" in kernels_disabled() or "all" in kernels_disabled():
        return "switched off by MEMARCH_DISABLE_KERNELS"
    return _build()[1]


@eager
def cpu_scan_available(*tensors: Tensor | None) -> bool:
    """Whether `selective_scan_cpu` takes these inputs: all on the CPU, and the library builds here."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    return unavailable_reason() == ""


def _thread_pool() -> ThreadPoolExecutor:
    """The worker threads, made on first use and again in a forked child (whose copy of the pool has no threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="memarch-scan")
            _pool_pid = os.getpid()
        return _pool


def _block(channels_per_group: int) -> int:
    """The largest power of two ≤ BLOCK_MAX dividing the channels of one group (a job never straddles groups)."""
    block = BLOCK_MAX
    while channels_per_group % block:
        block //= 2
    return block


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class _Plan:
    """Sizes and switches of one call, shared by its forward and backward."""

    batch: int
    length: int
    dim: int
    n_state: int
    groups: int
    block: int
    softplus: bool
    b_shared: bool
    c_shared: bool
    workers: int
    work: torch.dtype

    @property
    def jobs(self) -> int:
        return self.batch * (self.dim // self.block)

    @property
    def n_tiles(self) -> int:
        return -(-self.length // TILE)

    def run(self, name: str, *args: int | None) -> None:
        """Call `name` (scan_forward or scan_backward) over all jobs, split over `workers` threads."""
        libraries, reason = _build()
        if libraries is None:
            raise RuntimeError(f"selective_scan_cpu: the compiled scan is unavailable: {reason}")
        function = getattr(libraries[_DTYPES[self.work]], name)
        head = (self.batch, self.length, self.dim, self.n_state, self.groups, self.block)

        def call(start: int, stop: int) -> int:
            return int(function(*head, start, stop, *args))

        jobs = self.jobs
        workers = max(1, min(self.workers, jobs))
        if workers == 1:
            codes = [call(0, jobs)]
        else:
            bounds = [jobs * i // workers for i in range(workers + 1)]
            codes = list(_thread_pool().map(lambda i: call(bounds[i], bounds[i + 1]), range(workers)))
        if any(codes):
            raise MemoryError(f"selective_scan_cpu: {name} failed (codes {codes}: 1 = out of memory)")


class _CompiledScan(torch.autograd.Function):
    """(y, h_last) from kernel-layout inputs; backward by `scan_backward`. Inputs: u, delta (B, D, L); bias (D);
    a_nd (N, D); b_mat, c_mat ((B, G, N, L), or (N, D) when shared); d_skip (D); z (B, D, L); h0 (B, D, N);
    all contiguous in the plan's dtype; bias, d_skip, z, h0 may be None."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, u: Tensor, delta: Tensor, bias: Tensor | None, a_nd: Tensor,
                b_mat: Tensor, c_mat: Tensor, d_skip: Tensor | None, z: Tensor | None,
                h0: Tensor | None) -> tuple[Tensor, Tensor]:
        y = torch.empty(plan.batch, plan.dim, plan.length, dtype=plan.work)
        h_last = torch.empty(plan.batch, plan.dim, plan.n_state, dtype=plan.work)
        wants_grad = any(ctx.needs_input_grad)
        ckpt = (torch.empty(plan.batch, plan.dim, plan.n_tiles, plan.n_state, dtype=plan.work)
                if wants_grad else None)
        plan.run("scan_forward", _pointer(u), _pointer(delta), _pointer(bias), int(plan.softplus),
                 _pointer(a_nd), _pointer(b_mat), int(plan.b_shared), _pointer(c_mat), int(plan.c_shared),
                 _pointer(d_skip), _pointer(z), _pointer(h0), _pointer(y), _pointer(h_last), _pointer(ckpt))
        if wants_grad:
            ctx.plan, ctx.has_h0 = plan, h0 is not None
            ctx.save_for_backward(u, delta, bias, a_nd, b_mat, c_mat, d_skip, z, ckpt)
        return y, h_last

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None,
                 grad_last: Tensor | None) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        u, delta, bias, a_nd, b_mat, c_mat, d_skip, z, ckpt = ctx.saved_tensors
        work = plan.work
        gy = (torch.zeros(plan.batch, plan.dim, plan.length, dtype=work) if grad_y is None
              else grad_y.to(work).contiguous())
        g_last = None if grad_last is None else grad_last.to(work).contiguous()
        g_u, g_delta = torch.empty_like(u), torch.empty_like(delta)
        g_z = None if z is None else torch.empty_like(z)
        g_a = torch.empty(plan.batch, plan.n_state, plan.dim, dtype=work)

        def matrix_grad(shared: bool) -> Tensor:
            if shared:
                return torch.empty(plan.batch, plan.n_state, plan.dim, dtype=work)
            return torch.empty(plan.batch, plan.dim // plan.block, plan.n_state, plan.length, dtype=work)

        g_b, g_c = matrix_grad(plan.b_shared), matrix_grad(plan.c_shared)
        g_d = None if d_skip is None else torch.empty(plan.batch, plan.dim, dtype=work)
        g_h0 = torch.empty(plan.batch, plan.dim, plan.n_state, dtype=work)
        plan.run("scan_backward", _pointer(u), _pointer(delta), _pointer(bias), int(plan.softplus), _pointer(a_nd),
                 _pointer(b_mat), int(plan.b_shared), _pointer(c_mat), int(plan.c_shared), _pointer(d_skip),
                 _pointer(z), _pointer(ckpt), _pointer(gy), _pointer(g_last), _pointer(g_u), _pointer(g_delta),
                 _pointer(g_z), _pointer(g_a), _pointer(g_b), _pointer(g_c), _pointer(g_d), _pointer(g_h0))

        def matrix_total(grad: Tensor, shared: bool) -> Tensor:
            if shared:
                return grad.sum(0)  # (N, D)
            blocks_per_group = plan.dim // plan.groups // plan.block  # the per-job sums of one group, added
            return grad.view(plan.batch, plan.groups, blocks_per_group, plan.n_state, plan.length).sum(2)

        return (None, g_u, g_delta, None if bias is None else g_delta.sum(dim=(0, 2)), g_a.sum(0),
                matrix_total(g_b, plan.b_shared), matrix_total(g_c, plan.c_shared),
                None if g_d is None else g_d.sum(0), g_z, g_h0 if ctx.has_h0 else None)


@eager
def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                       initial_state: Tensor | None, work: torch.dtype, *,
                       workers: int | None = None) -> tuple[Tensor, Tensor]:
    """`reference.ssm.selective_scan`'s (out, last_state) in the compute dtype `work` (float32 or float64), with
    autograd through `scan_backward`; inputs already validated. B, C: (D, N) shared, (B, N, L), or (B, G, N, L).
    `workers`: threads to split the jobs over (default: `torch.get_num_threads()`, fewer for small problems).
    The layout changes below (casts, transposes, a repeat of the coarser B/C grouping) are torch ops, so autograd
    carries the kernel's gradients back through them to the caller's tensors."""
    batch, dim, length = u.shape
    n_state = A.shape[1]

    def prep(t: Tensor) -> Tensor:
        return t.to(work).contiguous()

    def layout(x: Tensor) -> tuple[Tensor, int, bool]:  # -> (tensor, groups, shared)
        if x.ndim == 2:
            return prep(x.t()), dim, True  # (N, D)
        return prep(x if x.ndim == 4 else x[:, None]), (1 if x.ndim == 3 else x.shape[1]), False

    b_mat, b_groups, b_shared = layout(B)
    c_mat, c_groups, c_shared = layout(C)
    groups = max(1 if b_shared else b_groups, 1 if c_shared else c_groups)
    if not b_shared and b_groups != groups:  # one group count for both: repeat the coarser
        b_mat = b_mat.repeat_interleave(groups // b_groups, dim=1).contiguous()
    if not c_shared and c_groups != groups:
        c_mat = c_mat.repeat_interleave(groups // c_groups, dim=1).contiguous()
    block = _block(dim // groups)
    jobs = batch * (dim // block)
    if workers is None:  # a thread per ~64K state updates at least: below that the split costs more than it saves
        workers = min(torch.get_num_threads(), (jobs * length * n_state) // (1 << 16))
    plan = _Plan(batch=batch, length=length, dim=dim, n_state=n_state, groups=groups, block=block,
                 softplus=delta_softplus, b_shared=b_shared, c_shared=c_shared, workers=max(1, workers), work=work)

    def optional(t: Tensor | None) -> Tensor | None:
        return None if t is None else prep(t)

    apply = cast(Callable[..., tuple[Tensor, Tensor]], _CompiledScan.apply)
    return apply(plan, prep(u), prep(delta), optional(delta_bias), prep(A.t()), b_mat, c_mat, optional(D), optional(z),
                 optional(initial_state))
