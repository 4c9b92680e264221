"""The selective scan, fast: the API of `reference/ssm.py` (mamba-ssm's signature) without a loop over tokens.

Dispatch (`scan_dispatch` names the branch; `scripts/bench.py` reports it):

- ``triton``: CUDA tensors in float32/float16/bfloat16, with Triton importable (`optimized/kernels/selective_scan.py`;
  on an H200 its forward takes 0.26–0.34× the time of mamba-ssm's CUDA kernel in float32, 0.54–0.70× in bf16,
  and forward + backward about the same, README Performance);
- ``mamba_ssm.cuda``: those CUDA tensors with no `initial_state` where our kernel is switched off
  (`MEMARCH_DISABLE_KERNELS=scan`) or Triton is missing, when mamba-ssm's compiled `selective_scan_cuda` and its
  `ops/selective_scan_interface.py` load (by file path: importing the package `mamba_ssm` itself needs more, see
  ENVIRONMENT.md);
- ``cpu-compiled``: CPU tensors when a C compiler is available: the recurrence compiled from
  `optimized/kernels/cpu_scan.c`, one pass over time with the discretisation, D skip and z gate fused in, and
  its adjoint for the backward (`optimized/kernels/cpu_scan.py` builds it on first use;
  `MEMARCH_DISABLE_KERNELS=cpu_scan` switches it off);
- ``torch-chunked``: everything else (CUDA float64, CUDA without Triton, a CPU without a C compiler), the
  two-level chunked scan below (`chunked_scan`), which autograd differentiates.

Tolerances against the float64 reference (tests/tolerances.py): float64 1e-10 for one scan; float32, the
Triton kernel and the compiled CPU scan the long-scan (MODEL) tolerance 1e-4; bfloat16 5e-2.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.kernels import kernel_available
from optimized.kernels.cpu_scan import cpu_scan_available, selective_scan_cpu
from reference.ssm import (
    channel_view,
    compute_dtype,
    discretised_delta,
    validate_selective_scan,
    validate_selective_scan_step,
)

__all__ = ["mamba_ssm_unavailable_reason", "scan_dispatch", "selective_scan", "selective_scan_step"]

# Elements (B·D·N·nC) of the tensors one in-chunk step of `chunked_scan` touches: big enough to amortise
# Python's per-op overhead, small enough to stay in cache (see `chunk_length`).
STEP_ELEMENTS = 1 << 18

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- dispatch

@functools.cache
def _load_mamba_ssm() -> tuple[Callable[..., Any] | None, str]:
    """mamba-ssm's `selective_scan_fn`, loaded from `mamba_ssm/ops/selective_scan_interface.py` by file path,
    or None and the reason it is unavailable."""
    if importlib.util.find_spec("selective_scan_cuda") is None:
        return None, "mamba-ssm's CUDA extension selective_scan_cuda is not importable"
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None, "mamba_ssm is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "selective_scan_interface.py"
    file_spec = importlib.util.spec_from_file_location("_memarch_mamba_selective_scan", path)
    if file_spec is None or file_spec.loader is None:
        return None, f"cannot load {path}"
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        sys.modules.pop("_memarch_mamba_selective_scan", None)
        return None, f"loading {path} failed: {error}"
    return module.selective_scan_fn, ""


def mamba_ssm_unavailable_reason() -> str:
    """Why the mamba-ssm branch cannot run here ("" when it can)."""
    return _load_mamba_ssm()[1]


def scan_dispatch(u: Tensor, *operands: Tensor | None, initial_state: Tensor | None = None) -> str:
    """The branch `selective_scan` takes for inputs like `u`: "mamba_ssm.cuda", "triton", "cpu-compiled" or
    "torch-chunked". `operands`, the call's other tensors: the compiled CPU scan reads raw pointers, so it takes
    the call only when every tensor is on the CPU (a stray CUDA tensor goes to torch, which names the mismatch)."""
    if u.is_cuda and u.dtype in _KERNEL_DTYPES:
        if kernel_available(u, "scan"):
            return "triton"
        if initial_state is None and _load_mamba_ssm()[0] is not None:
            return "mamba_ssm.cuda"
    if not u.is_cuda and cpu_scan_available(u, *operands, initial_state):
        return "cpu-compiled"
    return "torch-chunked"


# ---------------------------------------------------------------------------------------------- torch path

def chunk_length(length: int, per_step: int, *, gpu: bool = False) -> int:
    """T for `chunked_scan`: about √L, which balances the 2T in-chunk steps against the L/T chunk steps (on a
    GPU √(L/2), the minimum of 2T + L/T: every step is a few kernel launches, so the step count is the cost);
    on a CPU longer when one in-chunk step (per_step·L/T elements, per_step = B·D·N) would exceed
    STEP_ELEMENTS; then evened out so that the last chunk is nearly full."""
    if gpu:
        target = max(1, min(length, math.isqrt(max(length // 2, 1))))
    else:
        target = min(length, max(math.isqrt(length), -(-per_step * length // STEP_ELEMENTS)))
    n_chunks = -(-length // target)
    return -(-length // n_chunks)


def _groups(x: Tensor, dim: int) -> int:
    """How many channel groups B or C distinguishes: D for (D, N), 1 for (B, N, L), G for (B, G, N, L)."""
    return dim if x.ndim == 2 else 1 if x.ndim == 3 else x.shape[1]


def _by_step(x: Tensor, groups: int, n_chunks: int, chunk: int) -> Tensor:
    """B or C laid out to broadcast against the state h (B, nC, G, D/G, N) of `chunked_scan`: (D, N) -> (G, 1, N)
    with G = D, the same at every step; (B, N, L) -> (T, B, nC, 1, 1, N); (B, G', N, L) -> (T, B, nC, G, 1, N)."""
    if x.ndim == 2:
        return x[:, None, :]
    x = x[:, None] if x.ndim == 3 else x.repeat_interleave(groups // x.shape[1], dim=1)  # (B, G'|G, N, L)
    x = F.pad(x, (0, n_chunks * chunk - x.shape[-1])).unflatten(-1, (n_chunks, chunk))  # (B, G, N, nC, T)
    return x.permute(4, 0, 3, 1, 2)[..., None, :].contiguous()


def _steps(x: Tensor, chunk: int) -> list[Tensor]:
    """The T steps of a `_by_step` layout as views (the shared layout has no time axis: the same tensor T times).

    One `unbind` instead of T `select`s: the backward of `x[t]` zero-fills a tensor of x's full size at every
    step (T² work per chunk), the backward of `unbind` stacks the T gradients once."""
    return [x] * chunk if x.ndim == 3 else list(x.unbind(0))


def chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, delta_softplus: bool, initial_state: Tensor | None, *,
                 chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Implements `reference.ssm.selective_scan` (returns out and the last state) as a two-level scan.

    Method: split time into nC chunks of T steps (`chunk_length`: T ≈ √L, or `chunk` when given) and run the
    recurrence h_t = Ā_t h_{t−1} + B̄_t u_t in three vectorised phases, each a short Python loop:
    (1) over the T positions inside a chunk, every chunk at once, from a zero state: the chunk-local states
        h°_t = Ā_t h°_{t−1} + Δ_t u_t B_t and their readouts C_t·h°_t;
    (2) over the nC chunks, all channels at once: the states entering each chunk, H_{c+1} = P_c H_c + h°_end(c),
        with the chunk's decay P_c = exp(A·Σ_{t∈c} Δ_t) = Π_{t∈c} Ā_t;
    (3) over the T positions again: the carried part g_t = Ā_t g_{t−1}, g_{−1} = H_c, read out as C_t·g_t
        (h_t = h°_t + g_t).
    Every factor is a decay exp(Δ A) of one step or one chunk, as in the reference: no exp of a difference of
    cumulative sums, no floor on Δ·A. Where Δ·A ≤ 0 (A < 0, Δ ≥ 0: the decaying recurrence) each factor lies in
    [0, 1], so forward and backward stay finite and match the reference for any |Δ·A| and any L; out_t reads
    nothing after t. One step's tensors hold B·D·N·nC elements, which `chunk_length` keeps cache-sized.
    Tolerances: see the module docstring.
    """
    work = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape  # (B, D, L)
    n_state = A.shape[1]
    if chunk is None:
        chunk = chunk_length(length, batch * dim * n_state, gpu=u.is_cuda)
    elif not 1 <= chunk <= length:
        raise ValueError(f"chunked_scan: chunk must be in [1, L = {length}], got {chunk}")
    n_chunks = -(-length // chunk)
    groups = math.lcm(_groups(B, dim), _groups(C, dim))
    dt = discretised_delta(delta, delta_bias, delta_softplus, work)  # (B, D, L)
    u_w = u.to(work)

    def by_step(x: Tensor) -> Tensor:  # (B, D, L) -> (T, B, nC, G, D/G, 1); Δ = 0 and Δ·u = 0 on the padding
        x = F.pad(x, (0, n_chunks * chunk - length)).unflatten(-1, (n_chunks, chunk))  # (B, D, nC, T)
        return x.permute(3, 0, 2, 1).unflatten(-1, (groups, dim // groups))[..., None].contiguous()

    dt_all = by_step(dt)
    dt_s, x_s = dt_all.unbind(0), by_step(dt * u_w).unbind(0)
    A_g = A.to(work).reshape(groups, dim // groups, n_state)  # (G, D/G, N)
    B_s = _steps(_by_step(B.to(work), groups, n_chunks, chunk), chunk)
    C_s = _steps(_by_step(C.to(work), groups, n_chunks, chunk), chunk)
    # (1) chunk-local states from zero, all chunks at once
    decays: list[Tensor] = []
    ys: list[Tensor] = []
    h = x_s[0] * B_s[0]  # (B, nC, G, D/G, N)
    for t in range(chunk):
        decays.append((dt_s[t] * A_g).exp_())  # Ā_t; in place on a fresh product, which autograd does not save
        if t:
            h = (decays[t] * h).addcmul_(x_s[t], B_s[t])  # Ā_t h + Δ_t u_t B_t, no (D, N) outer product
        ys.append(h @ C_s[t].mT)  # (B, nC, G, D/G, 1)
    # (2) the states entering each chunk
    chunk_decay = torch.exp(dt_all.sum(dim=0) * A_g)  # P_c (B, nC, G, D/G, N)
    state = (torch.zeros(batch, groups, dim // groups, n_state, dtype=work, device=u.device)
             if initial_state is None else initial_state.to(work).reshape(batch, groups, -1, n_state))
    entering: list[Tensor] = []
    for h_c, decay_c in zip(h.unbind(1), chunk_decay.unbind(1), strict=True):
        entering.append(state)
        state = torch.addcmul(h_c, decay_c, state)
    # (3) the carried part
    g = torch.stack(entering, dim=1)  # (B, nC, G, D/G, N)
    for t in range(chunk):
        g = decays[t] * g
        ys[t] = ys[t] + g @ C_s[t].mT
    y = torch.stack(ys).flatten(3).permute(1, 3, 2, 0).flatten(2)[..., :length]  # (B, D, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u_w
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(u.dtype), state.reshape(batch, dim, n_state)


# ---------------------------------------------------------------------------------------------- public API

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *,
                   initial_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Implements `reference.ssm.selective_scan` (same signature, shapes and semantics), dispatching as the module
    docstring says (on a CPU the compiled scan, or `chunked_scan` where no C compiler is found). Tolerances: see
    the module docstring.

    On the mamba-ssm branch the last state carries no gradient (mamba-ssm's own limitation).
    """
    validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    branch = scan_dispatch(u, delta, A, B, C, D, z, delta_bias, initial_state=initial_state)
    if branch == "mamba_ssm.cuda":
        fn = _load_mamba_ssm()[0]
        assert fn is not None
        shared = u.dtype
        result = fn(u, delta.to(shared), A.float(), B.float() if B.ndim == 2 else B.to(shared),
                    C.float() if C.ndim == 2 else C.to(shared), None if D is None else D.float(),
                    None if z is None else z.to(shared), None if delta_bias is None else delta_bias.float(),
                    delta_softplus, return_last_state)
        if return_last_state:
            out, last = result
            return out, last
        return result
    if branch == "triton":
        from optimized.kernels.selective_scan import selective_scan_triton_autograd
        out, last = selective_scan_triton_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                   initial_state)
    elif branch == "cpu-compiled":
        work = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        out, last = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, work)
        out = out.to(u.dtype)
    else:
        out, last = chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last) if return_last_state else out


def selective_scan_step(state: Tensor, u_t: Tensor, delta_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor,
                        D: Tensor | None = None, z_t: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """Implements `reference.ssm.selective_scan_step` (one token; the same few fused elementwise ops and one
    reduction over N, no loop). Tolerances: float64 1e-10, float32 1e-5, bfloat16 1e-2."""
    validate_selective_scan_step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    work = compute_dtype(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, state)
    dim, n_state = A.shape
    dt = discretised_delta(delta_t, delta_bias, delta_softplus, work)  # (B, D)
    u_w = u_t.to(work)
    b_t = channel_view(B_t.to(work), dim, tuple(B_t.shape) == (dim, n_state))  # (B|1, D|1, N)
    c_t = channel_view(C_t.to(work), dim, tuple(C_t.shape) == (dim, n_state))
    h = torch.addcmul(torch.exp(dt[..., None] * A.to(work)) * state.to(work), b_t, (dt * u_w)[..., None])
    y = torch.einsum("bdn,bdn->bd", c_t.expand_as(h), h)  # (B, D)
    if D is not None:
        y = y + D.to(work) * u_w
    if z_t is not None:
        y = y * F.silu(z_t.to(work))
    return y.to(u_t.dtype), h
