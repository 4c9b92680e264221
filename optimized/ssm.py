"""The selective scan, fast: the API of `reference/ssm.py` (mamba-ssm's signature) without a loop over tokens.

Dispatch (`scan_dispatch` names the branch; `scripts/bench.py` reports it):

- ``mamba_ssm.cuda``: CUDA tensors in float32/float16/bfloat16 with no `initial_state`, when mamba-ssm's compiled
  `selective_scan_cuda` and its `ops/selective_scan_interface.py` load (by file path: importing the package
  `mamba_ssm` itself needs more, see ENVIRONMENT.md);
- ``triton``: other CUDA tensors in those dtypes, with Triton importable (`optimized/kernels/selective_scan.py`);
- ``torch-chunked``: everything else (CPU, float64), the chunked closed form below.

Tolerances against the float64 reference (tests/tolerances.py): float64 1e-10 for one scan; float32 and the
Triton kernel the long-scan (MODEL) tolerance 1e-4; bfloat16 5e-2.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.kernels import triton_available
from reference.ssm import (
    channel_view,
    compute_dtype,
    discretised_delta,
    validate_selective_scan,
    validate_selective_scan_step,
)

__all__ = ["mamba_ssm_unavailable_reason", "scan_dispatch", "selective_scan", "selective_scan_step"]

# Chunk length T and the floor −K on each step's log-decay Δ·A, per compute dtype. The floor changes
# exp(Δ·A) by at most e^{−K} (below the dtype's rounding: e^{−36} ≈ 2e−16, e^{−16} ≈ 1e−7), and it bounds the
# log-decays within a chunk, measured from its middle, by T·K/2 (288 and 64), inside exp's range.
CHUNK: dict[torch.dtype, tuple[int, float]] = {torch.float64: (16, 36.0), torch.float32: (8, 16.0)}

BLOCK_ELEMENTS = 1 << 19  # elements of a (B, D_block, L, N) intermediate in `chunked_scan`

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


def scan_dispatch(u: Tensor, *, initial_state: Tensor | None = None) -> str:
    """The branch `selective_scan` takes for inputs like `u`: "mamba_ssm.cuda", "triton" or "torch-chunked"."""
    if u.is_cuda and u.dtype in _KERNEL_DTYPES:
        if initial_state is None and _load_mamba_ssm()[0] is not None:
            return "mamba_ssm.cuda"
        if triton_available():
            return "triton"
    return "torch-chunked"


# ---------------------------------------------------------------------------------------------- torch path

def _chunked_view(x: Tensor, dim: int, n_chunks: int, chunk: int) -> Tensor:
    """B or C (D, N) | (B, N, L) | (B, G, N, L), L padded to n_chunks·chunk, as (B|1, D|1, nC|1, T|1, N)."""
    if x.ndim == 2:
        return x[None, :, None, None, :]  # (1, D, 1, 1, N)
    if x.ndim == 4:
        x = x.repeat_interleave(dim // x.shape[1], dim=1)  # (B, D, N, L)
    x = F.pad(x, (0, n_chunks * chunk - x.shape[-1]))
    x = x.unflatten(-1, (n_chunks, chunk)).movedim(-3, -1)  # (B, [D,] nC, T, N)
    return (x[:, None] if x.ndim == 4 else x).contiguous()


def _channel_block(x: Tensor, sl: slice, dim: int) -> Tensor:
    """B or C restricted to the channels in `sl`: (D, N) rows; (B, N, L) whole; (B, G, N, L) -> (B, D_block, N, L)."""
    if x.ndim == 2:
        return x[sl]
    if x.ndim == 3:
        return x
    groups = torch.arange(sl.start, sl.stop, device=x.device) // (dim // x.shape[1])
    return x.index_select(1, groups)


def _intra_chunk(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
                 floor: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block of channels, every chunk at once. x = Δ·u and dt = Δ (B, D, nC, T) (zero-padded); A (D, N);
    B, C as `_chunked_view` takes them (padded to nC·T). Returns the chunk-local outputs y (B, D, nC, T), the
    chunk-local end states (B, D, nC, N), the chunks' total log-decays α_T (B, D, nC, N), and for the carry
    term ĉ_t = C_t e^{α_t−α_m} (B, D, nC, T, N) and e^{α_m} (B, D, nC, N)."""
    batch, dim, n_chunks, _ = x.shape
    log_decay = (dt[..., None] * A[:, None, None, :]).clamp_min_(-floor)  # (B, D, nC, T, N), in place
    alpha = log_decay.cumsum(dim=3)  # inclusive
    mid = (chunk - 1) // 2
    alpha_mid = alpha[:, :, :, mid:mid + 1, :]  # (B, D, nC, 1, N)
    decay_out = torch.exp(alpha - alpha_mid)  # e^{α_t−α_m}
    c_hat = _chunked_view(C, dim, n_chunks, chunk) * decay_out  # (B, D, nC, T, N)
    b_hat = _chunked_view(B, dim, n_chunks, chunk) / decay_out  # e^{α_m−α_s} B_s
    # y_t = Σ_{s≤t} (ĉ_t · b̂_s) Δ_s u_s. Above the diagonal ĉ_t·b̂_s may overflow; tril drops it.
    c_flat, b_flat = c_hat.flatten(0, 2), b_hat.flatten(0, 2)  # (B·D·nC, T, N), views
    x_flat = x.flatten(0, 2)[..., None]  # (B·D·nC, T, 1)
    scores = torch.tril(torch.bmm(c_flat, b_flat.transpose(1, 2)))  # (B·D·nC, T, T)
    y = torch.bmm(scores, x_flat).view(batch, dim, n_chunks, chunk)
    local_sum = torch.bmm(b_flat.transpose(1, 2), x_flat).view(batch, dim, n_chunks, -1)  # (B, D, nC, N)
    local_end = decay_out[:, :, :, -1] * local_sum
    return y, local_end, alpha[:, :, :, -1], c_hat, torch.exp(alpha_mid[:, :, :, 0])


def chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, delta_softplus: bool,
                 initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Implements `reference.ssm.selective_scan` (returns out and the last state) as a chunked parallel scan.

    Method: split time into chunks of T steps. With g_t = max(Δ_t A, −K) and α_t = Σ_{s≤t} g_s inside a chunk
    (log-space cumulative decays, measured from the chunk's middle step m), the state is the closed form
    h_t = e^{α_t−α_m}·(Σ_{s≤t} e^{α_m−α_s} B_s Δ_s u_s + e^{α_m} H_c), every factor within exp's range.
    Three phases: (1) the intra-chunk closed form (`_intra_chunk`, batched matmuls), over blocks of channels
    whose (B, D_block, L, N) intermediates stay near BLOCK_ELEMENTS (channels are independent; small
    intermediates stay in cache and reuse allocator memory instead of faulting in fresh pages); (2) the states
    H_c entering each chunk, a recurrence over chunks (a Python loop over L/T chunks, all channels at once);
    (3) each step's carry term ĉ_t·H_c. Tolerances: see the module docstring.
    """
    work = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    chunk, floor = CHUNK[torch.float64 if work == torch.float64 else torch.float32]
    batch, dim, length = u.shape  # (B, D, L)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    dt = discretised_delta(delta, delta_bias, delta_softplus, work)  # (B, D, L)
    u_w = u.to(work)
    x = dt * u_w  # Δ·u (B, D, L)
    if pad:  # Δ = 0 and Δ·u = 0 on the padding: the state passes through unchanged
        dt, x = F.pad(dt, (0, pad)), F.pad(x, (0, pad))
    dt, x = dt.unflatten(-1, (n_chunks, chunk)), x.unflatten(-1, (n_chunks, chunk))  # (B, D, nC, T)
    A_w, B_w, C_w = A.to(work), B.to(work), C.to(work)
    step = max(1, BLOCK_ELEMENTS // (batch * n_chunks * chunk * A.shape[1]))
    blocks = [slice(lo, min(lo + step, dim)) for lo in range(0, dim, step)]
    parts = [_intra_chunk(x[:, sl], dt[:, sl], A_w[sl], _channel_block(B_w, sl, dim), _channel_block(C_w, sl, dim),
                          chunk, floor) for sl in blocks]
    local_end = torch.cat([p[1] for p in parts], dim=1)  # (B, D, nC, N)
    chunk_decay = torch.exp(torch.cat([p[2] for p in parts], dim=1))  # (B, D, nC, N)
    h = (torch.zeros(batch, dim, A.shape[1], dtype=work, device=u.device) if initial_state is None
         else initial_state.to(work))  # (B, D, N)
    entering: list[Tensor] = []
    for c in range(n_chunks):
        entering.append(h)
        h = torch.addcmul(local_end[:, :, c], chunk_decay[:, :, c], h)
    carry = torch.stack(entering, dim=2)  # H_c (B, D, nC, N)
    ys: list[Tensor] = []
    for sl, (y_blk, _, _, c_hat, mid_decay) in zip(blocks, parts, strict=True):
        carry_blk = (carry[:, sl] * mid_decay).flatten(0, 2)[..., None]  # e^{α_m} H_c (B·D·nC, N, 1)
        ys.append(y_blk + torch.bmm(c_hat.flatten(0, 2), carry_blk).view_as(y_blk))
    y = torch.cat(ys, dim=1).flatten(2)[..., :length]  # (B, D, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u_w
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(u.dtype), h


# ---------------------------------------------------------------------------------------------- public API

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *,
                   initial_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Implements `reference.ssm.selective_scan` (same signature, shapes and semantics), dispatching as the module
    docstring says; `chunked_scan` is the CPU method. Tolerances: see the module docstring.

    On the mamba-ssm branch the last state carries no gradient (mamba-ssm's own limitation).
    """
    validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    branch = scan_dispatch(u, initial_state=initial_state)
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
