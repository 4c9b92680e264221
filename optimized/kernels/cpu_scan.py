"""The selective scan's forward compiled for the CPU (`cpu_scan.c`), for inference: no autograd graph.

Why: on a CPU the eager-torch chunked scan (`optimized.ssm.chunked_scan`) makes a handful of full passes over
B·D·N·L elements plus Python overhead per step; the recurrence itself is a few flops and one exp per element.
`cpu_scan.c` runs the recurrence of the reference ([SSM-1]..[SSM-5]) once per time step with the state in
cache and the channel loop vectorised, and the discretisation, the D skip and the z gate fused in.

Build: on first use, `cc` (or `$CC`) compiles `cpu_scan.c` twice (float and double) into shared libraries in
`$MEMARCH_CACHE_DIR` (default `$XDG_CACHE_HOME/memarch`, else `~/.cache/memarch`), named by a hash of the
source, the flags and the compiler, so a changed source or machine rebuilds; flags are `-O3` plus `-mavx2
-mfma` where torch reports AVX2 (no -ffast-math: IEEE semantics everywhere, exp is the file's own). Loaded
with ctypes, which releases the GIL, so `torch.get_num_threads()` Python threads split the jobs.

If no compiler is found or the build fails, `unavailable_reason()` says why and `optimized.ssm` keeps its torch
path; `MEMARCH_DISABLE_KERNELS=cpu_scan` switches this path off. Tolerances against the float64 reference:
float64 1e-10 as the other scan paths; float32 within the MODEL tolerance (the exp is within 2 ulp).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from optimized.kernels import kernels_disabled

__all__ = ["cpu_scan_available", "selective_scan_cpu", "unavailable_reason"]

SOURCE = Path(__file__).with_name("cpu_scan.c")
BLOCK_MAX = 32  # channels per job, as in cpu_scan.c
_DTYPES = {torch.float32: 0, torch.float64: 1}
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def cache_dir() -> Path:
    """Where the compiled libraries live: `$MEMARCH_CACHE_DIR`, `$XDG_CACHE_HOME/memarch` or `~/.cache/memarch`."""
    if os.environ.get("MEMARCH_CACHE_DIR"):
        return Path(os.environ["MEMARCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memarch"


def _flags() -> list[str]:
    flags = ["-O3", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def _build() -> tuple[tuple[ctypes.CDLL, ctypes.CDLL] | None, str]:
    """The (float, double) libraries, or None and the reason they cannot be had."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        source = SOURCE.read_bytes()
    except OSError as error:
        return None, f"cannot read the C source {SOURCE}: {error}"
    libraries = []
    for double in (0, 1):
        flags = [*_flags(), f"-DSCAN_DOUBLE={double}"]
        key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        target = cache_dir() / f"cpu_scan-{key}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                    built = Path(scratch) / target.name
                    result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)],
                                            capture_output=True, text=True, timeout=120)
                    if result.returncode != 0:
                        return None, f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}"
                    os.replace(built, target)  # atomic: concurrent builders (pytest-xdist) never see half a file
            except (OSError, subprocess.SubprocessError) as error:
                return None, f"building {SOURCE.name} in {target.parent} failed: {error}"
        try:
            library = ctypes.CDLL(str(target))
        except OSError as error:
            return None, f"loading {target} failed: {error}"
        function = library.scan_forward
        function.restype = ctypes.c_int
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        # batch, length, dim, nstate, groups, block, job_start, job_stop; u, delta, delta_bias; softplus; A (N, D);
        # B, b_shared; C, c_shared; D, z, h0, y, h_last
        function.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, flag, ptr, ptr, flag, ptr, flag,
                             ptr, ptr, ptr, ptr, ptr]
        libraries.append(library)
    return (libraries[0], libraries[1]), ""


def unavailable_reason() -> str:
    """Why the compiled CPU scan cannot run here ("" when it can)."""
    if "cpu_scan" in kernels_disabled() or "all" in kernels_disabled():
        return "switched off by MEMARCH_DISABLE_KERNELS"
    return _build()[1]


def cpu_scan_available(*tensors: Tensor | None) -> bool:
    """Whether `selective_scan_cpu` takes these inputs: CPU tensors, none needing a gradient (no autograd
    graph is built), float32 or float64 compute, and the library builds here."""
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return unavailable_reason() == ""


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="memarch-scan")
        return _pool


def _block(channels_per_group: int) -> int:
    """The largest power of two ≤ BLOCK_MAX dividing the channels of one group (a job never straddles groups)."""
    block = BLOCK_MAX
    while channels_per_group % block:
        block //= 2
    return block


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                       initial_state: Tensor | None, work: torch.dtype, *,
                       workers: int | None = None) -> tuple[Tensor, Tensor]:
    """`reference.ssm.selective_scan`'s (out, last_state) in the compute dtype `work` (float32 or float64);
    inputs already validated. B, C: (D, N) shared, (B, N, L), or (B, G, N, L). `workers`: threads to split
    the jobs over (default: `torch.get_num_threads()`, fewer for small problems)."""
    libraries, reason = _build()
    if libraries is None:
        raise RuntimeError(f"selective_scan_cpu: the compiled scan is unavailable: {reason}")
    batch, dim, length = u.shape
    n_state = A.shape[1]

    def prep(t: Tensor) -> Tensor:
        return t.detach().to(work).contiguous()

    def layout(x: Tensor) -> tuple[Tensor, int, bool]:  # -> (tensor, groups, shared)
        if x.ndim == 2:
            return prep(x).t().contiguous(), dim, True  # (N, D)
        return prep(x if x.ndim == 4 else x[:, None]), (1 if x.ndim == 3 else x.shape[1]), False

    b_mat, b_groups, b_shared = layout(B)
    c_mat, c_groups, c_shared = layout(C)
    groups = max(1 if b_shared else b_groups, 1 if c_shared else c_groups)
    if not b_shared and not c_shared and b_groups != c_groups:  # one group count for both: repeat the coarser
        groups = max(b_groups, c_groups)
        b_mat = b_mat.repeat_interleave(groups // b_groups, dim=1).contiguous()
        c_mat = c_mat.repeat_interleave(groups // c_groups, dim=1).contiguous()
    block = _block(dim // groups)
    u_w, delta_w = prep(u), prep(delta)
    a_nd = prep(A).t().contiguous()
    bias = None if delta_bias is None else prep(delta_bias)
    d_skip = None if D is None else prep(D)
    z_w = None if z is None else prep(z)
    h0 = None if initial_state is None else prep(initial_state)
    y = torch.empty(batch, dim, length, dtype=work)
    h_last = torch.empty(batch, dim, n_state, dtype=work)
    function = libraries[_DTYPES[work]].scan_forward
    keep = (u_w, delta_w, a_nd, b_mat, c_mat, bias, d_skip, z_w, h0)  # alive until the calls return

    def run(start: int, stop: int) -> int:
        return int(function(batch, length, dim, n_state, groups, block, start, stop, _pointer(u_w),
                            _pointer(delta_w), _pointer(bias), int(delta_softplus), _pointer(a_nd),
                            _pointer(b_mat), int(b_shared), _pointer(c_mat), int(c_shared), _pointer(d_skip),
                            _pointer(z_w), _pointer(h0), _pointer(y), _pointer(h_last)))

    jobs = batch * (dim // block)
    if workers is None:  # a thread per ~64K state updates at least: below that the split costs more than it saves
        workers = min(torch.get_num_threads(), (jobs * length * n_state) // (1 << 16))
    workers = max(1, min(workers, jobs))
    if workers == 1:
        codes = [run(0, jobs)]
    else:
        bounds = [jobs * i // workers for i in range(workers + 1)]
        codes = list(_thread_pool().map(lambda i: run(bounds[i], bounds[i + 1]), range(workers)))
    del keep
    if any(codes):
        raise MemoryError(f"selective_scan_cpu: the C scan failed (codes {codes}: 1 = out of memory)")
    return y, h_last
