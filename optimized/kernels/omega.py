"""Triton kernels for the Omega-rule read of Atlas-MAG (`optimized.omega` dispatches here on CUDA).

Implements `reference.omega.omega_memory`, i.e. for every position t

    q'_t = (M_p q_t + Σ_{t−c<i≤t} w[t, i] (k_i·q_t) k_i) / (n_p + Σ_{t−c<i≤t} w[t, i] ‖k_i‖² + eps),
    w[t, i] = decay^(t−i) · gate_i,

as flash-attention does sliding-window attention: linear attention whose values are the keys. One program per
(block of BLOCK_M query positions, batch·head) holds its queries and a float32 (BLOCK_M, BLOCK_D) accumulator;
it walks only the key blocks of BLOCK_N positions that meet the window [t − c + 1, t] of one of its queries, and
per key block computes S = Q Kᵀ (`tl.dot`, float32 accumulation), P = S ∘ w, acc += P K and den += w ‖k‖².

Two kinds of key block (BLOCK_M must be a multiple of BLOCK_N, so blocks never straddle the query start t0):
  * interior blocks — every key older than t0 and inside every query's window — need no mask, and there
    w[t, i] = decay^(t − t0) · (decay^(t0 − i) gate_i) factors into a row and a column vector, both exponents
    ≥ 0 (no factor exceeds 1, so nothing overflows, and a factor underflows only where w itself does). The
    loop scales S by the column vector only (one multiply per score, no exponential), sums the column weights
    ‖k‖² into a vector, and the row factor is applied once after the loop;
  * boundary blocks — the diagonal (keys ≥ t0) and the window's tail — take the general masked form
    w = exp2(max(t − i, 0) · log2 decay) · gate_i, zero outside 0 ≤ t − i < c; at most
    ⌈BLOCK_M/BLOCK_N⌉ + 1 of each per program.
The persistent term (M_p q_t, n_p) is added in the kernel (one (BLOCK_M, Dh) × (Dh, Dh) dot), M_p read through
its strides, so (H, Dh, Dh) and (B, H, Dh, Dh) need no copy. Head dims are padded to a power of two ≥ 16 with
masks (Dh ≤ 256; `kernel_supports` states the constraint and callers fall back to torch otherwise). q and k
are read through their (B, H, L) strides (the last dim must be contiguous).

Precision: float32 inputs take IEEE float32 dots (no TF32) and every product in float32; half inputs take
tensor-core dots with float32 accumulation, P rounded to the input dtype before the P K dot (as flash-attention
rounds its probabilities) and M_p rounded to it for the persistent dot. Output in the input dtype. The backward
follows the same policy: under half inputs dnum, P∘D and S∘D are rounded to the input dtype for their dots (dden,
the row sums and dM_p stay float32); gradients come back in the inputs' dtypes. Measured against the float64
reference (tests/test_omega.py), outputs and gradients: float32 1e-5, bfloat16 1e-2.

Gradients (`omega_triton_autograd`, `omega_triton_backward`). The forward saves q' and den; with g = dL/dq',
dnum_t = g_t/den_t and dden_t = −(g_t·q'_t)/den_t (torch, elementwise, float32). Then
    dq_t    = M_pᵀ dnum_t + Σ_i w[t, i] (k_i·dnum_t) k_i
    dk_i    = gate_i Σ_t D[t, i] ((k_i·dnum_t) q_t + (k_i·q_t) dnum_t + 2 dden_t k_i),   D[t, i] = decay^(t−i)
    dgate_i = Σ_t D[t, i] ((k_i·q_t)(k_i·dnum_t) + dden_t ‖k_i‖²)
    dM_p    = Σ_t dnum_t q_tᵀ,   dn_p = Σ_t dden_t   (torch; summed over B for the (H, Dh, Dh) form)
dq is the forward with q := dnum, M_p read transposed (strides swapped) and no division (`_omega_fwd`,
NORMALIZE off). dk and dgate come from `_omega_bwd_dk`, one program per (block of BLOCK_M keys, batch·head)
walking the query blocks of BLOCK_N positions in [i0, i0 + BLOCK_M + c − 1): per block S = K Qᵀ and
P = K dnumᵀ, then acc += (P∘D) Q + (S∘D) dnum, and two row sums. Its blocks mirror the forward's: the diagonal
(queries < i0 + BLOCK_M) and the window's end are masked boundary blocks; the blocks between, later than every key
and inside every key's window, factor D[t, i] = decay^(t − i_last) · decay^(i_last − i) (i_last the block's last
key, both exponents ≥ 0) and apply the key factor once after the loop. Six block dots per key-query block pair in
all (forward: two). `USE_KERNEL_BACKWARD = False` instead recomputes the forward with the torch blocked Gram form
(`optimized.omega.omega_blocked`) and differentiates it (A/B timing). Under `TRITON_INTERPRET=1` the kernels run
on CPU tensors (tests call `omega_triton` and `omega_triton_autograd` directly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

from optimized.kernels import triton_interpreting

__all__ = ["MAX_HEAD_DIM", "compile_for_gpu", "kernel_supports", "omega_triton", "omega_triton_autograd",
           "omega_triton_backward"]

MAX_HEAD_DIM = 256  # one (BLOCK_M, BLOCK_D) float32 accumulator per program must fit in registers
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations


@_jit
def _masked_block(acc, den, q, k_ptrs, g_ptrs, start_n, offs_m, offs_n0, mask_d, length, window,  # type: ignore[no-untyped-def]
                  log2_decay, sk_l, sg_l, DOT_PRECISION: tl.constexpr):
    """One boundary key block: the general weight exp2(dist·log2 decay)·gate, masked to 0 ≤ dist < window."""
    offs_n = start_n + offs_n0  # (BLOCK_N,) key positions
    mask_n = offs_n < length
    k = tl.load(k_ptrs + start_n * sk_l, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    g = tl.load(g_ptrs + start_n * sg_l, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    kf = k.to(tl.float32)
    kk = tl.sum(kf * kf, axis=1)  # ‖k_i‖², (BLOCK_N,)
    dist = offs_m[:, None] - offs_n[None, :]  # t − i, (BLOCK_M, BLOCK_N)
    valid = (dist >= 0) & (dist < window) & mask_n[None, :]
    decay = tl.exp2(tl.maximum(dist, 0).to(tl.float32) * log2_decay)  # ≤ 1: the exponent is never positive
    w = tl.where(valid, decay * g[None, :], 0.0)  # (BLOCK_M, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # k_i·q_t, float32
    acc = tl.dot((s * w).to(k.dtype), k, acc, input_precision=DOT_PRECISION)
    den += tl.sum(w * kk[None, :], axis=1)
    return acc, den


@_jit
def _omega_fwd(q_ptr, k_ptr, gate_ptr, M_ptr, np_ptr, out_ptr, den_ptr,  # type: ignore[no-untyped-def]
               H, length, window, log2_decay, eps,
               sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sg_b, sg_h, sg_l, sM_b, sM_h, sM_d, sM_e, sn_b, sn_h,
               HEAD_DIM: tl.constexpr, HAS_PERSISTENT: tl.constexpr, STORE_DEN: tl.constexpr,
               NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # float32 arithmetic whatever the launcher passes (under torch.compile, inductor hands Python floats over as
    # float64 scalars, which would turn the loop-carried float32 sums float64 and fail to compile)
    log2_decay = tl.cast(log2_decay, tl.float32)
    eps = tl.cast(eps, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M  # t0, the first query of this program
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < length
    mask_d = offs_d < HEAD_DIM
    q_base = q_ptr + b * sq_b + h * sq_h
    q = tl.load(q_base + offs_m[:, None] * sq_l + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)  # (BLOCK_M, BLOCK_D), input dtype
    k_ptrs = k_ptr + b * sk_b + h * sk_h + offs_n0[:, None] * sk_l + offs_d[None, :]  # key block at 0
    g_ptrs = gate_ptr + b * sg_b + h * sg_h + offs_n0 * sg_l

    # key blocks [lo_block, mid) and [start_m, hi) are boundary blocks, [mid, start_m) interior ones
    lo_block = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N  # oldest key block any query sees
    tail_end = tl.maximum(start_m + BLOCK_M - window, 0)  # keys ≥ this are inside every query's window
    mid = tl.minimum(tl.maximum(lo_block, ((tail_end + BLOCK_N - 1) // BLOCK_N) * BLOCK_N), start_m)
    hi = tl.minimum(start_m + BLOCK_M, length)

    # interior: w[t, i] = decay^(t − t0) · col_i with col_i = decay^(t0 − i)·gate_i; row factor applied after
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    col_norms = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ over interior blocks of col_i ‖k_i‖², per lane
    for start_n in range(mid, start_m, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_ptrs + start_n * sk_l, mask=mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        g = tl.load(g_ptrs + start_n * sg_l).to(tl.float32)
        kf = k.to(tl.float32)
        col = tl.exp2((start_m - offs_n).to(tl.float32) * log2_decay) * g  # (BLOCK_N,), t0 − i ≥ 1
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) float32
        acc = tl.dot((s * col[None, :]).to(k.dtype), k, acc, input_precision=DOT_PRECISION)
        col_norms += col * tl.sum(kf * kf, axis=1)
    row = tl.exp2((offs_m - start_m).to(tl.float32) * log2_decay)  # decay^(t − t0) ∈ (0, 1]
    acc = acc * row[:, None]
    den = row * tl.sum(col_norms, axis=0)  # (BLOCK_M,)

    for start_n in range(lo_block, mid, BLOCK_N):  # the window's tail
        acc, den = _masked_block(acc, den, q, k_ptrs, g_ptrs, start_n, offs_m, offs_n0, mask_d, length, window,
                                 log2_decay, sk_l, sg_l, DOT_PRECISION)
    for start_n in range(start_m, hi, BLOCK_N):  # the diagonal
        acc, den = _masked_block(acc, den, q, k_ptrs, g_ptrs, start_n, offs_m, offs_n0, mask_d, length, window,
                                 log2_decay, sk_l, sg_l, DOT_PRECISION)

    if HAS_PERSISTENT:  # M_p q_t: q (BLOCK_M, Dh) @ M_pᵀ, M_pᵀ[e, d] = M_p[d, e]
        Mt = tl.load(M_ptr + b * sM_b + h * sM_h + offs_d[:, None] * sM_e + offs_d[None, :] * sM_d,
                     mask=mask_d[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
        acc = tl.dot(q, Mt, acc, input_precision=DOT_PRECISION)
        den += tl.load(np_ptr + b * sn_b + h * sn_h).to(tl.float32)
    den += eps
    out_rows = bh.to(tl.int64) * length + offs_m  # out (B, H, L, Dh) and den (B, H, L) are contiguous
    if NORMALIZE:
        acc = acc / den[:, None]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_m[:, None] & mask_d[None, :])
    if STORE_DEN:
        tl.store(den_ptr + out_rows, den, mask=mask_m)


@_jit
def _dk_block(acc, sp, dds, k, q_ptrs, dn_ptrs, dd_ptrs, start_n, offs_m, offs_n0, mask_d, length,  # type: ignore[no-untyped-def]
              window, log2_decay, sq_l, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One boundary query block of the key-side backward: decay^(t−i) from the distance, masked to 0 ≤ t−i < c."""
    offs_n = start_n + offs_n0  # (BLOCK_N,) query positions t
    mask_n = offs_n < length
    mask_nd = mask_n[:, None] & mask_d[None, :]
    q = tl.load(q_ptrs + start_n * sq_l, mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
    dn = tl.load(dn_ptrs + start_n * HEAD_DIM, mask=mask_nd, other=0.0)  # dnum, (BLOCK_N, BLOCK_D)
    dd = tl.load(dd_ptrs + start_n, mask=mask_n, other=0.0)  # dden, (BLOCK_N,) float32
    dist = offs_n[None, :] - offs_m[:, None]  # t − i, (BLOCK_M, BLOCK_N)
    valid = (dist >= 0) & (dist < window) & mask_n[None, :]
    decay = tl.where(valid, tl.exp2(tl.maximum(dist, 0).to(tl.float32) * log2_decay), 0.0)
    s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # k_i·q_t, (BLOCK_M, BLOCK_N) float32
    p = tl.dot(k, tl.trans(dn), input_precision=DOT_PRECISION)  # k_i·dnum_t
    acc = tl.dot((p * decay).to(k.dtype), q, acc, input_precision=DOT_PRECISION)
    acc = tl.dot((s * decay).to(k.dtype), dn, acc, input_precision=DOT_PRECISION)
    sp += tl.sum(decay * s * p, axis=1)
    dds += tl.sum(decay * dd[None, :], axis=1)
    return acc, sp, dds


@_jit
def _omega_bwd_dk(q_ptr, k_ptr, gate_ptr, dn_ptr, dd_ptr, dk_ptr, dg_ptr,  # type: ignore[no-untyped-def]
                  H, length, window, log2_decay, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sg_b, sg_h, sg_l,
                  HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk and dgate for one block of BLOCK_M keys: walks the query blocks t ∈ [i, i + c − 1] of its keys."""
    log2_decay = tl.cast(log2_decay, tl.float32)  # see _omega_fwd
    start_m = tl.program_id(0) * BLOCK_M  # i0, the first key of this program
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) key positions
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < length
    mask_d = offs_d < HEAD_DIM
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_m[:, None] * sk_l + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D), input dtype
    rows = bh.to(tl.int64) * length  # dnum (B, H, L, Dh), dden (B, H, L), dk (B, H, L, Dh) are contiguous
    q_ptrs = q_ptr + b * sq_b + h * sq_h + offs_n0[:, None] * sq_l + offs_d[None, :]  # query block at 0
    dn_ptrs = dn_ptr + (rows + offs_n0[:, None]) * HEAD_DIM + offs_d[None, :]
    dd_ptrs = dd_ptr + rows + offs_n0

    # query blocks [start_m, start_m + BLOCK_M) (diagonal) and [mid, hi) (window's end) are boundary blocks;
    # [start_m + BLOCK_M, mid) interior: later than every key, inside every key's window, below length
    first_after = start_m + BLOCK_M
    mid = tl.maximum(first_after, (tl.minimum(start_m + window, length) // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(start_m + BLOCK_M + window - 1, length)

    # interior: decay^(t − i) = decay^(t − i_last) · decay^(i_last − i), i_last = i0 + BLOCK_M − 1 (both ≥ 0)
    i_last = start_m + BLOCK_M - 1
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # Σ_t D[i, t] ((k_i·dnum_t) q_t + (k_i·q_t) dnum_t)
    sp = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_t D[i, t] (k_i·q_t)(k_i·dnum_t)
    col_dd = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ over interior blocks of decay^(t − i_last) dden_t
    for start_n in range(first_after, mid, BLOCK_N):
        offs_n = start_n + offs_n0
        q = tl.load(q_ptrs + start_n * sq_l, mask=mask_d[None, :], other=0.0)
        dn = tl.load(dn_ptrs + start_n * HEAD_DIM, mask=mask_d[None, :], other=0.0)
        dd = tl.load(dd_ptrs + start_n)
        col = tl.exp2((offs_n - i_last).to(tl.float32) * log2_decay)  # (BLOCK_N,), t − i_last ≥ 1
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p = tl.dot(k, tl.trans(dn), input_precision=DOT_PRECISION)
        acc = tl.dot((p * col[None, :]).to(k.dtype), q, acc, input_precision=DOT_PRECISION)
        acc = tl.dot((s * col[None, :]).to(k.dtype), dn, acc, input_precision=DOT_PRECISION)
        sp += tl.sum(s * p * col[None, :], axis=1)
        col_dd += col * dd
    row = tl.exp2((i_last - offs_m).to(tl.float32) * log2_decay)  # decay^(i_last − i) ∈ (0, 1]
    acc = acc * row[:, None]
    sp = sp * row
    dds = row * tl.sum(col_dd, axis=0)  # Σ_t D[i, t] dden_t, (BLOCK_M,)

    for start_n in range(start_m, tl.minimum(first_after, length), BLOCK_N):  # the diagonal
        acc, sp, dds = _dk_block(acc, sp, dds, k, q_ptrs, dn_ptrs, dd_ptrs, start_n, offs_m, offs_n0, mask_d, length,
                                 window, log2_decay, sq_l, HEAD_DIM, DOT_PRECISION)
    for start_n in range(mid, hi, BLOCK_N):  # the window's end
        acc, sp, dds = _dk_block(acc, sp, dds, k, q_ptrs, dn_ptrs, dd_ptrs, start_n, offs_m, offs_n0, mask_d, length,
                                 window, log2_decay, sq_l, HEAD_DIM, DOT_PRECISION)

    g = tl.load(gate_ptr + b * sg_b + h * sg_h + offs_m * sg_l, mask=mask_m, other=0.0).to(tl.float32)
    kf = k.to(tl.float32)
    dk = g[:, None] * (acc + 2.0 * dds[:, None] * kf)  # gate_i Σ_t D[i, t] (… + 2 dden_t k_i)
    dgate = sp + dds * tl.sum(kf * kf, axis=1)
    tl.store(dk_ptr + (rows + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(dg_ptr + rows + offs_m, dgate.to(dg_ptr.dtype.element_ty), mask=mask_m)


def kernel_supports(q: Tensor, k: Tensor) -> bool:
    """Whether `omega_triton` takes these inputs: float32/bfloat16/float16 with Dh ≤ MAX_HEAD_DIM (float64 and
    larger heads go to the torch path)."""
    return q.dtype in KERNEL_DTYPES and k.dtype == q.dtype and 1 <= q.shape[-1] <= MAX_HEAD_DIM


def _default_blocks(head_dim: int, length: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU; small blocks for short sequences."""
    if dtype == torch.float32:  # IEEE float32 dots run on FMA units and hold more registers: smaller tiles
        return 64, 32, 8, 2
    if length <= 64:
        return 64, 64, 4, 2
    # half inputs, Dh ≤ 128: (64, 64, 4 warps, 3 stages) from the H200 sweep (`bench.py --op omega_sweep`, B=1 H=16
    # L=32K Dh=64 c=1024 bf16): 0.74 ms against 0.98 ms for the previous (128, 64, 8, 2) and 0.52 ms for
    # flex-attention's sliding window in the same call; its output within 8.1e-4 · max|y| of the previous default's.
    # In that sweep 5 of the 8 bf16 launches with BLOCK_N = 32 differed from the rest by 4e-3 to 0.12 · max|y| and
    # changed with num_stages alone (unexplained; the Triton interpreter cannot run bf16 to check the logic, and
    # float32 with BLOCK_N = 32 meets 1e-5 on the GPU); the tenth session's quick sweep (L=4K) saw it again (0.054),
    # so half-precision launches with BLOCK_N < 64 are refused (`_check_blocks`)
    return (64, 64, 4, 3) if head_dim <= 128 else (64, 64, 8, 2)


def _check_blocks(bm: int, bn: int, dtype: torch.dtype | None = None) -> None:
    """Valid tiles; `dtype` (the forward kernel's inputs) also refuses half-precision BLOCK_N < 64 compiled for a GPU
    (the interpreter runs them correctly, and the half-precision interpreter tests use them)."""
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1) or bm % bn:
        raise ValueError(f"omega_triton: block_m and block_n must be powers of two >= 16 with block_m a multiple "
                         f"of block_n, got {bm}, {bn}")
    if dtype is not None and dtype != torch.float32 and bn < 64 and not triton_interpreting():
        raise ValueError(f"omega_triton: block_n={bn} with {dtype} inputs is refused: on an H200 (Triton 3.6) such "
                         f"launches returned outputs off by up to 0.12 · max|y|, changing with num_stages (see "
                         f"specs/atlas_mag.md, the Triton kernel); use block_n >= 64, or float32 inputs")


def _launch_rows(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float, M_persistent: Tensor | None,
                 norm_persistent: Tensor | None, eps: float, out: Tensor, den: Tensor | None, *, normalize: bool,
                 transpose_M: bool, blocks: tuple[int, int, int, int]) -> None:
    """Launch `_omega_fwd` into `out` (contiguous (B, H, L, Dh)): the forward (`normalize`), or the backward's
    dq = M_pᵀ dnum + Σ w (k·dnum) k with q := dnum, `transpose_M` and no division."""
    B, H, length, Dh = q.shape
    bm, bn, warps, stages = blocks
    _check_blocks(bm, bn, q.dtype)
    q_c = q if q.stride(-1) == 1 else q.contiguous()
    k_c = k if k.stride(-1) == 1 else k.contiguous()
    has_p = M_persistent is not None and norm_persistent is not None
    if has_p:
        assert M_persistent is not None and norm_persistent is not None
        M = M_persistent[None] if M_persistent.ndim == 3 else M_persistent  # (B or 1, H, Dh, Dh)
        n_p = norm_persistent[None] if norm_persistent.ndim == 1 else norm_persistent  # (B or 1, H)
        sM = (M.stride(0) if M.shape[0] > 1 else 0, M.stride(1), M.stride(2), M.stride(3))
        if transpose_M:  # the kernel reads M[d, e] through (sM_d, sM_e): swapping them reads M_pᵀ
            sM = (sM[0], sM[1], sM[3], sM[2])
        sn = (n_p.stride(0) if n_p.shape[0] > 1 else 0, n_p.stride(1))
    else:
        M, n_p, sM, sn = q_c, q_c, (0, 0, 0, 0), (0, 0)  # never read
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is the default; it only names fp32 dots
    grid = (triton.cdiv(length, bm), B * H)
    _omega_fwd[grid](
        q_c, k_c, gate, M, n_p, out, den if den is not None else out,
        H, length, min(window, length), math.log2(decay_base), float(eps),
        q_c.stride(0), q_c.stride(1), q_c.stride(2), k_c.stride(0), k_c.stride(1), k_c.stride(2),
        gate.stride(0), gate.stride(1), gate.stride(2), *sM, *sn,
        HEAD_DIM=Dh, HAS_PERSISTENT=has_p, STORE_DEN=den is not None, NORMALIZE=normalize,
        DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
        num_warps=warps, num_stages=stages)


def omega_triton(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float,
                 M_persistent: Tensor | None = None, norm_persistent: Tensor | None = None, eps: float = 1e-6, *,
                 block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, return_den: bool = False) -> tuple[Tensor, Tensor | None]:
    """Forward only: (q' (B, H, L, Dh) in q's dtype, den (B, H, L) float32 or None). Inputs as in
    `reference.omega.omega_memory` (already validated by the caller; `kernel_supports(q, k)` true).

    `block_m`/`block_n` are the query/key block lengths (powers of two ≥ 16, block_m a multiple of block_n);
    `return_den` also returns the denominator n_p + Σ w ‖k‖² + eps."""
    B, H, length, Dh = q.shape
    out = torch.empty(B, H, length, Dh, device=q.device, dtype=q.dtype)
    den = torch.empty(B, H, length, device=q.device, dtype=torch.float32) if return_den else None
    if length == 0 or B * H == 0:
        return out, den
    bm, bn, warps, stages = _default_blocks(Dh, length, q.dtype)
    _launch_rows(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps, out, den, normalize=True,
                 transpose_M=False, blocks=(block_m or bm, block_n or bn, num_warps or warps, num_stages or stages))
    return out, den


def _default_bwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M keys, BLOCK_N queries, num_warps, num_stages) of `_omega_bwd_dk` (flash-attention's dk/dv shape:
    a tall key block, short query steps); not tuned on a GPU."""
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 8, 2
    return 128, 32, 8, 2


def omega_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, gate: Tensor, out: Tensor, den: Tensor,
                          window: int, decay_base: float, M_persistent: Tensor | None = None,
                          norm_persistent: Tensor | None = None, *, dq_blocks: tuple[int, int] | None = None,
                          dk_blocks: tuple[int, ...] | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dq, dk, dgate, dM_persistent | None, dnorm_persistent | None) of `omega_triton` for the cotangent
    `grad_out`, from the forward's output `out` and denominator `den` (module docstring). `dq_blocks` and
    `dk_blocks` override the (rows, steps) tiles of the two kernels (tests use small ones); `dk_blocks` may also
    give the dk kernel's (warps, stages) after its tiles (`--op omega_sweep` times such launches)."""
    B, H, length, Dh = q.shape
    g = grad_out.float()
    dnum = g / den[..., None]  # (B, H, L, Dh) float32
    dden = (-(g * out.float()).sum(-1) / den).contiguous()  # −(g·out)/den, (B, H, L)
    dnum_in = dnum.to(q.dtype).contiguous()  # the dots' operand dtype
    dq = torch.empty(B, H, length, Dh, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, length, Dh, device=q.device, dtype=k.dtype)
    dgate = torch.empty(B, H, length, device=q.device, dtype=gate.dtype)
    dM = dn_p = None
    if M_persistent is not None and norm_persistent is not None:
        dM = torch.einsum("bhld,bhle->bhde", dnum, q.float())  # Σ_t dnum_t q_tᵀ, (B, H, Dh, Dh)
        dM = (dM.sum(0) if M_persistent.ndim == 3 else dM).to(M_persistent.dtype)
        dn_p = dden.sum(-1)  # (B, H)
        dn_p = (dn_p.sum(0) if norm_persistent.ndim == 1 else dn_p).to(norm_persistent.dtype)
    if length == 0 or B * H == 0:
        return dq, dk, dgate, dM, dn_p
    bm, bn, warps, stages = _default_blocks(Dh, length, q.dtype)
    bm, bn = dq_blocks or (bm, bn)
    _launch_rows(dnum_in, k, gate, window, decay_base, M_persistent, norm_persistent, 0.0, dq, None,
                 normalize=False, transpose_M=True, blocks=(bm, bn, warps, stages))
    bm, bn, warps, stages = _default_bwd_blocks(Dh, q.dtype)
    if dk_blocks is not None:
        if len(dk_blocks) not in (2, 4):
            raise ValueError(f"omega_triton_backward: dk_blocks is (block_m, block_n) or (block_m, block_n, warps, "
                             f"stages), got {dk_blocks!r}")
        bm, bn = dk_blocks[:2]
        warps, stages = dk_blocks[2:] or (warps, stages)
    _check_blocks(bm, bn)  # the dk kernel's half-precision BLOCK_N = 32 launches agree with the rest
    q_c = q if q.stride(-1) == 1 else q.contiguous()
    k_c = k if k.stride(-1) == 1 else k.contiguous()
    _omega_bwd_dk[(triton.cdiv(length, bm), B * H)](
        q_c, k_c, gate, dnum_in, dden, dk, dgate, H, length, min(window, length), math.log2(decay_base),
        q_c.stride(0), q_c.stride(1), q_c.stride(2), k_c.stride(0), k_c.stride(1), k_c.stride(2),
        gate.stride(0), gate.stride(1), gate.stride(2),
        HEAD_DIM=Dh, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(Dh)), num_warps=warps, num_stages=stages)
    return dq, dk, dgate, dM, dn_p


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", *, persistent: bool = True, head_dim: int = 64,
                    block_m: int = 128, block_n: int = 64, num_warps: int = 8, precision: str | None = None,
                    kernel: str = "forward") -> Any:
    """Compile a kernel ahead of time for CUDA compute capability `capability` (90: H100/H200) with q, k and
    their outputs/cotangents in `dtype` ("fp32", "fp16", "bf16"); no GPU needed (Triton's frontend, passes and
    ptxas run on the CPU). `kernel`: "forward" (`_omega_fwd`), "dq" (`_omega_fwd` without the division, as the
    backward launches it) or "dk" (`_omega_bwd_dk`). This is the check `TRITON_INTERPRET=1` cannot make, so it
    must run in a process without that variable."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tiles = {"HEAD_DIM": head_dim, "DOT_PRECISION": precision or ("ieee" if dtype == "fp32" else "tf32"),
             "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    fn: Any
    if kernel in ("forward", "dq"):
        fn, io = _omega_fwd, {"q_ptr", "k_ptr", "out_ptr"}
        constexprs = {**tiles, "HAS_PERSISTENT": persistent, "STORE_DEN": persistent and kernel == "forward",
                      "NORMALIZE": kernel == "forward"}
    elif kernel == "dk":
        fn, io, constexprs = _omega_bwd_dk, {"q_ptr", "k_ptr", "dn_ptr", "dk_ptr"}, tiles
    else:
        raise ValueError(f"compile_for_gpu: kernel must be 'forward', 'dq' or 'dk', got {kernel!r}")
    names: list[str] = fn.arg_names
    floats = {"log2_decay", "eps"}
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else "fp32" if name in floats else "i32" for name in names}
    # as a launch specialises: pointers 16-byte aligned, the row strides of q and k multiples of 16
    aligned = {name for name in names if name.endswith("_ptr")} | {"sq_l", "sk_l", "sq_h", "sk_h", "sq_b", "sk_b"}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": 2})


USE_KERNEL_BACKWARD = True  # False: the backward recomputes the torch blocked form (A/B timing, debugging)


class _TritonOmega(torch.autograd.Function):
    """Forward by the kernel; backward by the two backward kernels (or, with `USE_KERNEL_BACKWARD` off, by
    differentiating the torch blocked Gram form recomputed under grad)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, gate: Tensor, M_persistent: Tensor | None,
                norm_persistent: Tensor | None, window: int, decay_base: float, eps: float) -> Tensor:
        ctx.args = (window, decay_base, eps)
        ctx.kernel_backward = USE_KERNEL_BACKWARD
        out, den = omega_triton(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps,
                                return_den=ctx.kernel_backward)
        ctx.save_for_backward(q, k, gate, M_persistent, norm_persistent, out, den)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, gate, M_p, n_p, out, den = ctx.saved_tensors
        window, decay_base, eps = ctx.args
        if ctx.kernel_backward:
            grads = omega_triton_backward(grad_out, q, k, gate, out, den, window, decay_base, M_p, n_p)
            result = [grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[:5], strict=True)]
            return (*result, None, None, None)
        return (*_recompute_backward(grad_out, (q, k, gate, M_p, n_p), window, decay_base, eps), None, None, None)


def _recompute_backward(grad_out: Tensor, saved: tuple[Tensor | None, ...], window: int, decay_base: float,
                        eps: float) -> list[Tensor | None]:
    """Gradients by differentiating `optimized.omega.omega_blocked` (correct, slow)."""
    from optimized.omega import omega_blocked

    inputs: list[Tensor | None] = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                                   for t in saved]
    q, k, gate, M_p, n_p = inputs
    assert q is not None and k is not None and gate is not None
    with torch.enable_grad():
        out = omega_blocked(q, k, gate, window, decay_base, M_p, n_p, eps)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def omega_triton_autograd(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float,
                          M_persistent: Tensor | None = None, norm_persistent: Tensor | None = None,
                          eps: float = 1e-6) -> Tensor:
    """`omega_triton` with gradients for q, k, gate, M_persistent and norm_persistent (module docstring)."""
    apply = cast(Callable[..., Tensor], _TritonOmega.apply)
    return apply(q, k, gate, M_persistent, norm_persistent, window, decay_base, eps)
