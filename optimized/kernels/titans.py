"""Triton kernel for the Titans memory's chunk-to-chunk state passing (`optimized.titans` dispatches here on CUDA).

Implements `reference.titans.titans_memory_chunked` ([TITANS-7]) in the parallel chunk form of
`optimized.titans` (module docstring there). With the chunk's start state (M₀, S₀), R = K M₀ − V and the
state-independent coefficients W, m = A − λ W1, s, u, E_C of `optimized.titans.chunk_coefficients`:

    y   = P M₀ + Z S₀ + y_c,   P = diag(m) Q − 2 (W ⊙ Q Kᵀ) K,   Z = diag(s) Q,   y_c = 2 (W ⊙ Q Kᵀ) V
    M_C = m_C M₀ + s_C S₀ − 2 Kᵀ diag(W_C,·) R,      S_C = E_C S₀ − λ (Σ_j u_j) M₀ − 2 Kᵀ diag(u) R.

P, Z (C × d_k) and y_c (C × d_v) do not depend on the state: torch forms them for all chunks at once in batched
matmuls (the C × C scores never reach the kernel; `operands="torch"`), or, by default, `_titans_operands` does in
one launch (one program per (batch·head, chunk); on an H200 at B=4 H=8 d_k=d_v=128 C=64 bf16 it takes 0.24 ms where
the torch form, a few dozen launches, takes 1.18 ms at L = 2048, and the whole forward runs 2.3–3.2× faster). The
loss ‖M k − v‖² separates over value columns, so each column block of (M, S) evolves on its own: one program per
(batch·head, block of BLOCK_V value columns) keeps M[:, vblk] and S[:, vblk] (d_k × BLOCK_V, float32) in registers
and walks the chunks sequentially; per chunk it loads K_n, P_n, Z_n (C × d_k), V_n[:, vblk], y_c[:, vblk] and the
coefficient rows, makes five `tl.dot`s (P M, Z S, K M, Kᵀ(−2 W_C ⊙ R), Kᵀ(−2 u ⊙ R), the scalar terms folded into
their accumulators) and writes y_n[:, vblk]; when gradients are wanted it also stores each chunk's start state (M₀,
S₀) (N × d_k × d_v float32 each per (b, h): 16 MiB for both at L = 8192, C = 64, d_k = d_v = 128). C, d_k and
BLOCK_V are padded to powers of two ≥ 16 (tl.dot's smallest tile) with masked loads: zero rows and columns add
nothing. A length that C does not divide ends with one shorter chunk, run by the torch form
(`optimized.titans.torch_chunked`) from the kernel's final state.

Precision: the state and every accumulation are float32. float32 inputs: exact float32 dots
(`input_precision="ieee"`: no TF32, slow on the GPU, correct). bfloat16/float16 inputs, and any inputs under
`torch.autocast` (q, k, v cast to the autocast dtype, as autocast does for matmuls): dot operands in that
dtype (M, S and R rounded to it per product) with float32 accumulation on the tensor cores. Tolerances against
the float64 reference: float32 1e-5 on short sequences (model tolerance 1e-4 over long scans), bfloat16 5e-2
(model tolerance).

Backward (`titans_memory_triton_autograd`; verified against float64 autograd of these equations). With
w = −2 W_C·, u' = −2 u, the scalars (m_C, s_C, E_C, λΣu) and dM, dS the gradients of the chunk's end state,
`_titans_bwd` walks the chunks in reverse, one program per (batch·head, value block) carrying dM, dS
(d_k × BLOCK_V, float32) and reading the stored start states (M₀, S₀):

    dR = w ⊙ (K dM) + u' ⊙ (K dS)            dV = −dR           dy_c = dy
    dP = dy M₀ᵀ    dZ = dy S₀ᵀ    dK = dR M₀ᵀ + (w ⊙ R) dMᵀ + (u' ⊙ R) dSᵀ
    dw_i = Σ_v R_iv (K dM)_iv    du'_i = Σ_v R_iv (K dS)_iv
    d(m_C, s_C, E_C, λΣu) = (⟨dM, M₀⟩, ⟨dM, S₀⟩, ⟨dS, S₀⟩, −⟨dS, M₀⟩)
    dM₀ = Pᵀ dy + m_C dM − λΣu dS + Kᵀ dR,     dS₀ = Zᵀ dy + s_C dM + E_C dS

(eleven dots a chunk). Sums over value columns (dK, dP, dZ, the coefficient gradients) are written per value block
and added in torch (deterministic, no atomics). Torch autograd carries dP, dZ, dy_c, dK, dV and the coefficient
gradients back to q, k, v and the gates through the state-independent part, recomputed under grad
(`_kernel_operands`, the torch form of the operands the forward formed, under the forward's autocast state), and a
last, shorter chunk is differentiated in the torch form, which hands the kernel the gradient of its final state. Dot
operands follow the forward (the input dtype; dM, dS, dy rounded to it per product), accumulation is float32; the
same tolerances hold for the gradients.

Under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (tests call `titans_memory_triton` and
`titans_memory_triton_autograd` directly); `compile_for_gpu` compiles either kernel for sm_90 without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["compile_for_gpu", "titans_memory_triton", "titans_memory_triton_autograd"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations


@_jit
def _tiles(bh, vb, chunk, d_k, d_v, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # type: ignore[no-untyped-def]
           BLOCK_V: tl.constexpr):
    """A program's index tiles, shared by the forward and the backward kernel: chunk positions, key dimensions,
    its block `vb` of value columns, their masks, and its (d_k × BLOCK_V) offsets into a (B·H, d_k, d_v) state."""
    offs_c = tl.arange(0, BLOCK_C)  # positions in a chunk
    offs_k = tl.arange(0, BLOCK_K)  # key dimensions
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns
    mask_c = offs_c < chunk
    mask_k = offs_k < d_k
    mask_v = offs_v < d_v
    mask_kv = mask_k[:, None] & mask_v[None, :]
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_cv = mask_c[:, None] & mask_v[None, :]
    state_offs = bh * d_k * d_v + offs_k[:, None] * d_v + offs_v[None, :]
    return offs_c, offs_k, offs_v, mask_c, mask_kv, mask_ck, mask_cv, state_offs


@_jit
def _titans_fwd(k_ptr, v_ptr, P_ptr, Z_ptr, yc_ptr, vec_ptr, scal_ptr, M0_ptr, S0_ptr, y_ptr, M_ptr, S_ptr,  # type: ignore[no-untyped-def]
                Ms_ptr, Ss_ptr, n_chunks, chunk, d_k, d_v, heads, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                HAS_STATE: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_c, offs_k, offs_v, mask_c, mask_kv, mask_ck, mask_cv, state_offs = _tiles(
        bh, tl.program_id(1).to(tl.int64), chunk, d_k, d_v, BLOCK_C, BLOCK_K, BLOCK_V)
    if HAS_STATE:
        M = tl.load(M0_ptr + state_offs, mask=mask_kv, other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_V)
        S = tl.load(S0_ptr + state_offs, mask=mask_kv, other=0.0).to(tl.float32)
    else:
        M = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    k_offs = b * sk_b + h * sk_h + offs_c[:, None] * sk_l + offs_k[None, :] * sk_d  # (BLOCK_C, BLOCK_K)
    v_offs = b * sv_b + h * sv_h + offs_c[:, None] * sv_l + offs_v[None, :] * sv_d  # (BLOCK_C, BLOCK_V)
    pz_offs = bh * n_chunks * chunk * d_k + offs_c[:, None] * d_k + offs_k[None, :]  # P, Z: (B·H, N·C, d_k)
    y_offs = bh * n_chunks * chunk * d_v + offs_c[:, None] * d_v + offs_v[None, :]  # y, y_c: (B·H, N·C, d_v)
    for n in range(n_chunks):
        t0 = n * chunk
        row = bh * n_chunks + n  # this chunk's row of the coefficients
        K = tl.load(k_ptr + k_offs + t0 * sk_l, mask=mask_ck, other=0.0)  # (BLOCK_C, BLOCK_K), input dtype
        V = tl.load(v_ptr + v_offs + t0 * sv_l, mask=mask_cv, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_V)
        P = tl.load(P_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)  # (BLOCK_C, BLOCK_K), input dtype
        Z = tl.load(Z_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)
        y = tl.load(yc_ptr + y_offs + t0 * d_v, mask=mask_cv, other=0.0)  # (BLOCK_C, BLOCK_V) float32
        w_row = tl.load(vec_ptr + row * 2 * chunk + offs_c, mask=mask_c, other=0.0)  # −2 W_C· (BLOCK_C,)
        u_row = tl.load(vec_ptr + row * 2 * chunk + chunk + offs_c, mask=mask_c, other=0.0)  # −2 u
        m_last = tl.load(scal_ptr + row * 4)  # scalars m_C, s_C, E_C, λ Σ u
        s_last = tl.load(scal_ptr + row * 4 + 1)
        e_last = tl.load(scal_ptr + row * 4 + 2)
        lam_u = tl.load(scal_ptr + row * 4 + 3)
        if STORE_STATES:  # the chunk's start state, for the backward: (B·H, N, d_k, d_v) float32
            start_offs = row * d_k * d_v + offs_k[:, None] * d_v + offs_v[None, :]
            tl.store(Ms_ptr + start_offs, M, mask=mask_kv)
            tl.store(Ss_ptr + start_offs, S, mask=mask_kv)
        M_d = M.to(K.dtype)  # dot operands in the input dtype (a no-op for float32)
        S_d = S.to(K.dtype)
        y = tl.dot(P, M_d, acc=y, input_precision=PRECISION)  # y = P M₀ + Z S₀ + y_c
        y = tl.dot(Z, S_d, acc=y, input_precision=PRECISION)
        tl.store(y_ptr + y_offs + t0 * d_v, y.to(y_ptr.dtype.element_ty), mask=mask_cv)
        R = tl.dot(K, M_d, acc=-V, input_precision=PRECISION)  # (BLOCK_C, BLOCK_V) residuals K M₀ − V
        K_t = tl.trans(K)  # (BLOCK_K, BLOCK_C)
        M_next = tl.dot(K_t, (w_row[:, None] * R).to(K.dtype), acc=m_last * M + s_last * S,
                        input_precision=PRECISION)
        S = tl.dot(K_t, (u_row[:, None] * R).to(K.dtype), acc=e_last * S - lam_u * M, input_precision=PRECISION)
        M = M_next
    tl.store(M_ptr + state_offs, M, mask=mask_kv)
    tl.store(S_ptr + state_offs, S, mask=mask_kv)


@_jit
def _titans_bwd(k_ptr, v_ptr, P_ptr, Z_ptr, vec_ptr, scal_ptr, Ms_ptr, Ss_ptr, dy_ptr, dMf_ptr, dSf_ptr,  # type: ignore[no-untyped-def]
                dk_ptr, dv_ptr, dP_ptr, dZ_ptr, dvec_ptr, dscal_ptr, dM0_ptr, dS0_ptr,
                n_chunks, chunk, d_k, d_v, heads, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """The reverse walk over chunks (module docstring, "Backward"): carries dM, dS for this program's value
    columns; outputs summed over value columns (dK, dP, dZ, the coefficient rows) are partial sums per value
    block, added up by the caller."""
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_c, offs_k, offs_v, mask_c, mask_kv, mask_ck, mask_cv, state_offs = _tiles(
        bh, vb, chunk, d_k, d_v, BLOCK_C, BLOCK_K, BLOCK_V)
    dM = tl.load(dMf_ptr + state_offs, mask=mask_kv, other=0.0)  # (BLOCK_K, BLOCK_V) float32: ∂/∂ final M
    dS = tl.load(dSf_ptr + state_offs, mask=mask_kv, other=0.0)
    k_offs = b * sk_b + h * sk_h + offs_c[:, None] * sk_l + offs_k[None, :] * sk_d
    v_offs = b * sv_b + h * sv_h + offs_c[:, None] * sv_l + offs_v[None, :] * sv_d
    pz_offs = bh * n_chunks * chunk * d_k + offs_c[:, None] * d_k + offs_k[None, :]  # (B·H, N·C, d_k)
    part_offs = vb * n_bh * n_chunks * chunk * d_k + pz_offs  # into the partial sums (blocks, B·H, N·C, d_k)
    y_offs = bh * n_chunks * chunk * d_v + offs_c[:, None] * d_v + offs_v[None, :]  # (B·H, N·C, d_v)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        t0 = n * chunk
        row = bh * n_chunks + n
        part_row = vb * n_bh * n_chunks + row  # this chunk's row of the per-block coefficient partial sums
        # operands are loaded just before their use and the products ordered so that few tiles are live at once
        w_row = tl.load(vec_ptr + row * 2 * chunk + offs_c, mask=mask_c, other=0.0)
        u_row = tl.load(vec_ptr + row * 2 * chunk + chunk + offs_c, mask=mask_c, other=0.0)
        m_last = tl.load(scal_ptr + row * 4)
        s_last = tl.load(scal_ptr + row * 4 + 1)
        e_last = tl.load(scal_ptr + row * 4 + 2)
        lam_u = tl.load(scal_ptr + row * 4 + 3)
        start_offs = row * d_k * d_v + offs_k[:, None] * d_v + offs_v[None, :]
        M = tl.load(Ms_ptr + start_offs, mask=mask_kv, other=0.0)  # the chunk's start state, float32
        S = tl.load(Ss_ptr + start_offs, mask=mask_kv, other=0.0)
        tl.store(dscal_ptr + part_row * 4, tl.sum(tl.sum(dM * M, axis=1), axis=0))  # ∂/∂(m_C, s_C, E_C, λΣu)
        tl.store(dscal_ptr + part_row * 4 + 1, tl.sum(tl.sum(dM * S, axis=1), axis=0))
        tl.store(dscal_ptr + part_row * 4 + 2, tl.sum(tl.sum(dS * S, axis=1), axis=0))
        tl.store(dscal_ptr + part_row * 4 + 3, -tl.sum(tl.sum(dS * M, axis=1), axis=0))
        dy = tl.load(dy_ptr + y_offs + t0 * d_v, mask=mask_cv, other=0.0).to(k_ptr.dtype.element_ty)
        M_d = M.to(k_ptr.dtype.element_ty)  # dot operands in the input dtype (a no-op for float32)
        S_d = S.to(k_ptr.dtype.element_ty)
        dM_d = dM.to(k_ptr.dtype.element_ty)
        dS_d = dS.to(k_ptr.dtype.element_ty)
        tl.store(dP_ptr + part_offs + t0 * d_k, tl.dot(dy, tl.trans(M_d), input_precision=PRECISION), mask=mask_ck)
        tl.store(dZ_ptr + part_offs + t0 * d_k, tl.dot(dy, tl.trans(S_d), input_precision=PRECISION), mask=mask_ck)
        P = tl.load(P_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)  # (BLOCK_C, BLOCK_K), input dtype
        dM_prev = tl.dot(tl.trans(P), dy, acc=m_last * dM - lam_u * dS, input_precision=PRECISION)
        Z = tl.load(Z_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)
        dS_prev = tl.dot(tl.trans(Z), dy, acc=s_last * dM + e_last * dS, input_precision=PRECISION)
        K = tl.load(k_ptr + k_offs + t0 * sk_l, mask=mask_ck, other=0.0)
        V = tl.load(v_ptr + v_offs + t0 * sv_l, mask=mask_cv, other=0.0).to(tl.float32)
        R = tl.dot(K, M_d, acc=-V, input_precision=PRECISION)  # (BLOCK_C, BLOCK_V) residuals K M₀ − V
        KdM = tl.dot(K, dM_d, input_precision=PRECISION)
        KdS = tl.dot(K, dS_d, input_precision=PRECISION)
        tl.store(dvec_ptr + part_row * 2 * chunk + offs_c, tl.sum(R * KdM, axis=1), mask=mask_c)  # ∂/∂(−2W_C·)
        tl.store(dvec_ptr + part_row * 2 * chunk + chunk + offs_c, tl.sum(R * KdS, axis=1), mask=mask_c)  # −2u
        dR = w_row[:, None] * KdM + u_row[:, None] * KdS  # ∂/∂R
        tl.store(dv_ptr + y_offs + t0 * d_v, -dR, mask=mask_cv)  # ∂/∂V = −∂/∂R (value columns: no partials)
        dR_d = dR.to(k_ptr.dtype.element_ty)
        dK = tl.dot(dR_d, tl.trans(M_d), input_precision=PRECISION)  # (BLOCK_C, BLOCK_K)
        dK = tl.dot((w_row[:, None] * R).to(k_ptr.dtype.element_ty), tl.trans(dM_d), acc=dK,
                    input_precision=PRECISION)
        dK = tl.dot((u_row[:, None] * R).to(k_ptr.dtype.element_ty), tl.trans(dS_d), acc=dK,
                    input_precision=PRECISION)
        tl.store(dk_ptr + part_offs + t0 * d_k, dK, mask=mask_ck)
        dM_prev = tl.dot(tl.trans(K), dR_d, acc=dM_prev, input_precision=PRECISION)
        dS = dS_prev
        dM = dM_prev
    tl.store(dM0_ptr + state_offs, dM, mask=mask_kv)
    tl.store(dS0_ptr + state_offs, dS, mask=mask_kv)


@_jit
def _titans_operands(q_ptr, k_ptr, v_ptr, a_ptr, e_ptr, th_ptr, P_ptr, Z_ptr, yc_ptr, vec_ptr, scal_ptr,  # type: ignore[no-untyped-def]
                     n_chunks, chunk, d_k, d_v, heads, lam, log_floor, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
                     sv_b, sv_h, sv_l, sv_d, sg_b, sg_h, sg_l, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr):
    """`_kernel_operands` for one chunk of one (batch, head) per program: the chunk coefficients of
    `optimized.titans.chunk_coefficients` (log-space cumulative gates, the decay matrices, W, m, s, u, E_C), the
    scores W ⊙ Q Kᵀ and P, Z, y_c, the coefficient rows and scalars — one launch for all chunks instead of the
    torch form's few dozen. Dots accumulate in float32 (scores, P, Z rounded to the input dtype as torch does)."""
    # float32 whatever the launcher passes (under torch.compile inductor hands Python floats over as float64)
    lam = tl.cast(lam, tl.float32)
    log_floor = tl.cast(log_floor, tl.float32)
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    t0 = n * chunk
    row = bh * n_chunks + n
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_DV)
    mask_c = offs_c < chunk
    mask_ck = mask_c[:, None] & (offs_k < d_k)[None, :]
    mask_cv = mask_c[:, None] & (offs_v < d_v)[None, :]
    g_offs = b * sg_b + h * sg_h + (t0 + offs_c) * sg_l
    alpha = tl.load(a_ptr + g_offs, mask=mask_c, other=0.0).to(tl.float32)
    eta = tl.load(e_ptr + g_offs, mask=mask_c, other=1.0).to(tl.float32)
    theta = tl.load(th_ptr + g_offs, mask=mask_c, other=0.0).to(tl.float32)  # padded positions write nothing
    # log A_i, log E_i, each term clamped at log_floor (torch: log1p(−α)); the arguments are floored at 1e-30
    # (log = −69 < log_floor, so the clamp gives the same value) to keep log(0) out
    cum_a = tl.cumsum(tl.maximum(tl.log(tl.maximum(1.0 - alpha, 1e-30)), log_floor), axis=0)
    cum_e = tl.cumsum(tl.maximum(tl.log(tl.maximum(eta, 1e-30)), log_floor), axis=0)
    lower = offs_c[None, :] <= offs_c[:, None]  # j ≤ i
    L_a = tl.exp(tl.where(lower, cum_a[:, None] - cum_a[None, :], float("-inf")))  # (BLOCK_C, BLOCK_C)
    L_e = tl.exp(tl.where(lower, cum_e[:, None] - cum_e[None, :], float("-inf")))
    W = tl.dot(L_a, L_e, input_precision="ieee") * theta[None, :]  # (BLOCK_C, BLOCK_C)
    last = offs_c == chunk - 1
    cum_e_last = tl.sum(tl.where(last, cum_e, 0.0), axis=0)
    s = tl.sum(L_a * tl.exp(cum_e)[None, :], axis=1)  # (BLOCK_C,)
    m = tl.exp(cum_a) - lam * tl.sum(W, axis=1)  # the coefficient of M₀
    u = tl.where(mask_c, tl.exp(cum_e_last - cum_e), 0.0) * theta
    w_last = tl.sum(tl.where(last[:, None], W, 0.0), axis=0)  # W_C·
    vec_offs = row * 2 * chunk + offs_c
    tl.store(vec_ptr + vec_offs, -2.0 * w_last, mask=mask_c)
    tl.store(vec_ptr + vec_offs + chunk, -2.0 * u, mask=mask_c)
    tl.store(scal_ptr + row * 4, tl.sum(tl.where(last, m, 0.0), axis=0))
    tl.store(scal_ptr + row * 4 + 1, tl.sum(tl.where(last, s, 0.0), axis=0))
    tl.store(scal_ptr + row * 4 + 2, tl.exp(cum_e_last))
    tl.store(scal_ptr + row * 4 + 3, lam * tl.sum(u, axis=0))
    Q = tl.load(q_ptr + b * sq_b + h * sq_h + (t0 + offs_c)[:, None] * sq_l + offs_k[None, :] * sq_d, mask=mask_ck,
                other=0.0).to(P_ptr.dtype.element_ty)  # (BLOCK_C, BLOCK_K) in the io dtype
    K = tl.load(k_ptr + b * sk_b + h * sk_h + (t0 + offs_c)[:, None] * sk_l + offs_k[None, :] * sk_d, mask=mask_ck,
                other=0.0).to(P_ptr.dtype.element_ty)
    V = tl.load(v_ptr + b * sv_b + h * sv_h + (t0 + offs_c)[:, None] * sv_l + offs_v[None, :] * sv_d, mask=mask_cv,
                other=0.0).to(P_ptr.dtype.element_ty)  # (BLOCK_C, BLOCK_DV)
    scores = (W * tl.dot(Q, tl.trans(K), input_precision=PRECISION)).to(K.dtype)  # (BLOCK_C, BLOCK_C)
    P = m[:, None] * Q.to(tl.float32) - 2.0 * tl.dot(scores, K, input_precision=PRECISION)
    Z = s[:, None] * Q.to(tl.float32)
    y_c = 2.0 * tl.dot(scores, V, input_precision=PRECISION)
    pz_offs = row * chunk * d_k + offs_c[:, None] * d_k + offs_k[None, :]  # (B·H·N·C, d_k) rows
    tl.store(P_ptr + pz_offs, P.to(P_ptr.dtype.element_ty), mask=mask_ck)
    tl.store(Z_ptr + pz_offs, Z.to(Z_ptr.dtype.element_ty), mask=mask_ck)
    tl.store(yc_ptr + row * chunk * d_v + offs_c[:, None] * d_v + offs_v[None, :], y_c, mask=mask_cv)


def _operands_triton(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, C: int,
                     lam: float, io: torch.dtype, *, num_warps: int = 8) -> tuple[Tensor, ...]:
    """`_kernel_operands` (same outputs, shapes and dtypes) by `_titans_operands`: one launch, no autograd."""
    from optimized.titans import LOG_FLOOR

    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    N = L // C
    k_io, v_io = k.to(io), v.to(io)
    P = torch.empty(B, H, N, C, d_k, dtype=io, device=k.device)
    Z = torch.empty_like(P)
    y_c = torch.empty(B, H, N, C, d_v, dtype=torch.float32, device=k.device)
    vecs = torch.empty(B, H, N, 2, C, dtype=torch.float32, device=k.device)
    scalars = torch.empty(B, H, N, 4, dtype=torch.float32, device=k.device)
    if N == 0:
        return k_io, v_io, P, Z, y_c, vecs, scalars
    alpha, eta, theta = (t.float() for t in (alpha, eta, theta))
    if not (alpha.stride() == eta.stride() == theta.stride()):
        alpha, eta, theta = (t.contiguous() for t in (alpha, eta, theta))
    block_c, block_k, _ = _blocks(C, d_k, d_v, None)
    _titans_operands[(B * H, N)](
        q, k_io, v_io, alpha, eta, theta, P, Z, y_c, vecs, scalars, N, C, d_k, d_v, H, float(lam), LOG_FLOOR,
        *q.stride(), *k_io.stride(), *v_io.stride(), *alpha.stride(),
        PRECISION="ieee" if io == torch.float32 else "tf32", BLOCK_C=block_c, BLOCK_K=block_k,
        BLOCK_DV=max(16, triton.next_power_of_2(d_v)), num_warps=num_warps)
    return k_io, v_io, P, Z, y_c, vecs, scalars


def _blocks(chunk: int, d_k: int, d_v: int, block_v: int | None) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, BLOCK_V): powers of two ≥ 16 (tl.dot's smallest tile); by default BLOCK_V keeps each
    state tile at ≤ 4096 float32 elements (d_k = 128: 32 value columns)."""
    block_c = max(16, triton.next_power_of_2(chunk))
    block_k = max(16, triton.next_power_of_2(d_k))
    if block_v is None:
        block_v = min(triton.next_power_of_2(d_v), max(16, 4096 // block_k))
    return block_c, block_k, max(16, block_v)


def _io_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The dots' operand dtype: the inputs' promoted dtype, or autocast's."""
    if torch.is_autocast_enabled(k.device.type):
        return torch.get_autocast_dtype(k.device.type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def _kernel_operands(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, C: int, lam: float,
                     io: torch.dtype) -> tuple[Tensor, ...]:
    """The kernel's inputs over L = N·C positions (C divides L), in torch (differentiable): k, v in `io`,
    P, Z (B, H, N, C, d_k) in `io`, y_c (B, H, N, C, d_v) float32, the coefficient rows −2 (W_C·, u)
    (B, H, N, 2, C) and scalars (m_C, s_C, E_C, λ Σ u) (B, H, N, 4)."""
    from optimized.titans import chunk_coefficients

    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    N = L // C
    q_io, k_io, v_io = (t.to(io) for t in (q, k, v))
    W, m_coef, s, u, e_last = chunk_coefficients(alpha.float(), eta.float(), theta.float(), C, lam)
    # the state-independent part of y = (diag(m) Q − 2 scores K) M₀ + diag(s) Q S₀ + 2 scores V, all chunks
    Q_n = q_io.reshape(B, H, N, C, d_k)
    K_n = k_io.reshape(B, H, N, C, d_k)
    scores = (W * (Q_n @ K_n.transpose(-1, -2)).float()).to(io)  # (B, H, N, C, C)
    P = (m_coef[..., None] * Q_n.float() - 2 * (scores @ K_n).float()).to(io)  # (B, H, N, C, d_k)
    Z = (s[..., None] * Q_n.float()).to(io)
    y_c = 2 * (scores @ v_io.reshape(B, H, N, C, d_v)).float()  # (B, H, N, C, d_v)
    vecs = -2 * torch.stack([W[..., -1, :], u], dim=-2)  # (B, H, N, 2, C)
    scalars = torch.stack([m_coef[..., -1], s[..., -1], e_last, lam * u.sum(dim=-1)], dim=-1)  # (B, H, N, 4)
    return k_io, v_io, P, Z, y_c, vecs, scalars


def _check_stages(num_stages: int) -> None:
    """num_stages=1 (no software pipelining) made the forward fault with an illegal memory access under Triton
    3.6 on an H200 (block_v=16, 4 warps, bf16, L=2048: `scripts/bench.py --op titans_sweep`); the cause is not
    diagnosed, so both kernels refuse it rather than corrupt the CUDA context."""
    if num_stages < 2:
        raise ValueError(f"titans kernel: num_stages must be >= 2, got {num_stages} (num_stages=1 faulted with an "
                         f"illegal memory access on the GPU); use the default 2")


def _forward(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, C: int, lam: float,
             initial_state: tuple[Tensor, Tensor] | None, *, store_states: bool, block_v: int | None = None,
             num_warps: int = 4, num_stages: int = 2,
             operands: str = "triton") -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The kernel over the first N·C positions: y (B, H, N·C, d_v) in v's dtype, the final M, S (float32) and,
    with `store_states`, every chunk's start state (B, H, N, d_k, d_v) float32. `operands`: "torch"
    (`_kernel_operands`) or "triton" (`_operands_triton`, one launch)."""
    _check_stages(num_stages)
    if operands not in ("torch", "triton"):
        raise ValueError(f"titans kernel: operands must be 'torch' or 'triton', got {operands!r}")
    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    N = L // C
    main = N * C
    if initial_state is None:
        M = torch.zeros(B, H, d_k, d_v, dtype=torch.float32, device=k.device)
        S = torch.zeros_like(M)
    else:
        M = initial_state[0].to(torch.float32).contiguous()
        S = initial_state[1].to(torch.float32).contiguous()
    if N == 0:
        return v.new_zeros(B, H, 0, d_v), M, S, None, None
    io = _io_dtype(q, k, v)
    build = _operands_triton if operands == "triton" else _kernel_operands
    built = build(q[:, :, :main], k[:, :, :main], v[:, :, :main], alpha[:, :, :main], eta[:, :, :main],
                  theta[:, :, :main], C, lam, io)
    return _state_pass(built, M, S, v.dtype, has_state=initial_state is not None, store_states=store_states,
                       block_v=block_v, num_warps=num_warps, num_stages=num_stages)


def _state_pass(operands: tuple[Tensor, ...], M: Tensor, S: Tensor, out_dtype: torch.dtype, *, has_state: bool,
                store_states: bool, block_v: int | None = None, num_warps: int = 4,
                num_stages: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """`_titans_fwd` over the operands of N ≥ 1 whole chunks (`_kernel_operands`' tuple) from the float32 start
    state M, S (read only with `has_state`): y (B, H, N·C, d_v) in `out_dtype`, the final M, S (float32) and, with
    `store_states`, every chunk's start state (B, H, N, d_k, d_v) float32."""
    k_io, v_io, P, Z, y_c, vecs, scalars = operands
    P, Z, y_c, vecs, scalars = (t.contiguous() for t in (P, Z, y_c, vecs, scalars))
    B, H, N, C, d_k = P.shape
    d_v = v_io.shape[-1]
    main = N * C
    y = torch.empty(B, H, main, d_v, dtype=out_dtype, device=v_io.device)
    M_out = torch.empty(B, H, d_k, d_v, dtype=torch.float32, device=k_io.device)
    S_out = torch.empty_like(M_out)
    Ms = torch.empty(B, H, N, d_k, d_v, dtype=torch.float32, device=k_io.device) if store_states else M_out
    Ss = torch.empty_like(Ms) if store_states else S_out
    block_c, block_k, bv = _blocks(C, d_k, d_v, block_v)
    _titans_fwd[(B * H, triton.cdiv(d_v, bv))](
        k_io, v_io, P, Z, y_c, vecs, scalars, M, S, y, M_out, S_out, Ms, Ss, N, C, d_k, d_v, H, *k_io.stride(),
        *v_io.stride(), HAS_STATE=has_state, STORE_STATES=store_states,
        PRECISION="ieee" if k_io.dtype == torch.float32 else "tf32", BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_V=bv,
        num_warps=num_warps, num_stages=num_stages)
    return y, M_out, S_out, (Ms if store_states else None), (Ss if store_states else None)


def titans_memory_triton(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                         chunk_size: int, global_decay: float = 0.0,
                         initial_state: tuple[Tensor, Tensor] | None = None, block_v: int | None = None,
                         num_warps: int = 4, num_stages: int = 2,
                         operands: str = "triton") -> tuple[Tensor, Tensor, Tensor]:
    """Forward only: (y (B, H, L, d_v), M, S (B, H, d_k, d_v)), all in v's dtype, as
    `optimized.titans.titans_memory_chunked` (inputs already validated). `block_v` value columns per program
    (a power of two; default: see `_blocks`); `operands="triton"` (the default) forms the state-independent
    operands in one launch (`_operands_triton`), `"torch"` by torch's batched ops (`_kernel_operands`)."""
    L = k.shape[2]
    C = min(chunk_size, max(L, 1))
    main = (L // C) * C
    lam = float(global_decay)
    y, M, S, _, _ = _forward(q, k, v, alpha, eta, theta, C, lam, initial_state, store_states=False,
                             block_v=block_v, num_warps=num_warps, num_stages=num_stages, operands=operands)
    return _with_tail((q, k, v, alpha, eta, theta), main, lam, y, M, S)


def _with_tail(inputs: tuple[Tensor, ...], main: int, lam: float, y: Tensor, M: Tensor,
               S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's result over the first `main` positions (y, final M, S) completed by the last, shorter chunk
    (the torch form from the kernel's final state) where `main` < L; the states in v's dtype (its work dtype after
    a tail)."""
    from optimized.titans import _compute_dtype, torch_chunked

    q, k, v, alpha, eta, theta = inputs
    L = k.shape[2]
    if main == L:
        return y, M.to(v.dtype), S.to(v.dtype)
    work = _compute_dtype(v.dtype)
    y_tail, M, S = torch_chunked(q[:, :, main:], k[:, :, main:], v[:, :, main:], alpha[:, :, main:],
                                 eta[:, :, main:], theta[:, :, main:], chunk_size=L - main, global_decay=lam,
                                 initial_state=(M.to(work), S.to(work)))
    return torch.cat([y, y_tail], dim=2), M, S


def _backward_kernel(operands: tuple[Tensor, ...], Ms: Tensor, Ss: Tensor, dy: Tensor, dM: Tensor, dS: Tensor, *,
                     block_v: int | None = None, num_warps: int = 8,
                     num_stages: int = 2) -> tuple[list[Tensor], Tensor, Tensor]:
    """Gradients of the kernel's outputs (y over N·C positions, final M, S) with respect to its operands
    (`_kernel_operands`, in that order) and its start state: ([dk, dv, dP, dZ, dy_c, dvecs, dscalars], dM₀, dS₀)."""
    _check_stages(num_stages)
    k_io, v_io, P, Z, y_c, vecs, scalars = operands
    B, H, N, C, d_k = P.shape
    d_v = v_io.shape[-1]
    P, Z, vecs, scalars = (t.detach().contiguous() for t in (P, Z, vecs, scalars))
    k_io, v_io = k_io.detach(), v_io.detach()
    dy = dy.contiguous()
    dM = dM.to(torch.float32).contiguous()
    dS = dS.to(torch.float32).contiguous()
    block_c, block_k, bv = _blocks(C, d_k, d_v, block_v)
    blocks = triton.cdiv(d_v, bv)
    dM0 = torch.empty_like(dM)  # (B, H, d_k, d_v) float32
    dS0 = torch.empty_like(dM)
    dk_part = dM.new_empty(blocks, B, H, N * C, d_k)  # partial sums over value blocks, float32
    dP_part = torch.empty_like(dk_part)
    dZ_part = torch.empty_like(dk_part)
    dv = dM.new_empty(B, H, N * C, d_v)
    dvec_part = dM.new_empty(blocks, B, H, N, 2, C)
    dscal_part = dM.new_empty(blocks, B, H, N, 4)
    _titans_bwd[(B * H, blocks)](
        k_io, v_io, P, Z, vecs, scalars, Ms, Ss, dy, dM, dS, dk_part, dv, dP_part, dZ_part, dvec_part, dscal_part,
        dM0, dS0, N, C, d_k, d_v, H, *k_io.stride(), *v_io.stride(),
        PRECISION="ieee" if k_io.dtype == torch.float32 else "tf32", BLOCK_C=block_c, BLOCK_K=block_k,
        BLOCK_V=bv, num_warps=num_warps, num_stages=num_stages)
    grads = [dk_part.sum(0), dv, dP_part.sum(0).reshape(P.shape), dZ_part.sum(0).reshape(Z.shape),
             dy.reshape(y_c.shape), dvec_part.sum(0), dscal_part.sum(0)]
    return grads, dM0, dS0


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", *, chunk: int = 64, d_k: int = 128,
                    block_v: int | None = None, num_warps: int = 4, num_stages: int = 2,
                    precision: str = "ieee", backward: bool = False, operands: bool = False) -> Any:
    """Compile `_titans_fwd` (or, with `backward`, `_titans_bwd`; with `operands`, `_titans_operands` at
    d_v = d_k, 8 warps unless told) ahead of time for CUDA compute capability
    `capability` (90: H100) with q, k, v, y in `dtype` ("fp32", "fp16", "bf16"), without a GPU (Triton's frontend,
    its passes and ptxas run on the CPU): the check `TRITON_INTERPRET=1` cannot make, so it must run in a process
    without that variable. Returns Triton's compiled kernel (its `n_regs` and `n_spills` tell the register
    pressure)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_c, block_k, bv = _blocks(chunk, d_k, d_k, block_v)
    if operands:
        return _compile_operands(capability, dtype, block_c, block_k, precision, num_warps)
    kernel = _titans_bwd if backward else _titans_fwd
    names: list[str] = kernel.arg_names
    # as a launch specialises them: unit strides are constants, pointers and the other ints 16-divisible
    constexprs: dict[str, Any] = {"sk_d": 1, "sv_d": 1, "PRECISION": precision if dtype == "fp32" else "tf32",
                                  "BLOCK_C": block_c, "BLOCK_K": block_k, "BLOCK_V": bv}
    if not backward:
        constexprs.update(HAS_STATE=True, STORE_STATES=True)
    io = {"k_ptr", "v_ptr", "P_ptr", "Z_ptr", "y_ptr", "dy_ptr"}  # in the input dtype; the rest: fp32
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in names}
    aligned = [name for name in names if name not in constexprs and name not in ("n_chunks", "heads")]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps,
                                                                              "num_stages": num_stages})


def _compile_operands(capability: int, dtype: str, block_c: int, block_k: int, precision: str,
                      num_warps: int) -> Any:
    """`compile_for_gpu` for `_titans_operands` (unit feature strides, contiguous gates)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names: list[str] = _titans_operands.arg_names
    constexprs: dict[str, Any] = {"sq_d": 1, "sk_d": 1, "sv_d": 1, "sg_l": 1,
                                  "PRECISION": precision if dtype == "fp32" else "tf32", "BLOCK_C": block_c,
                                  "BLOCK_K": block_k, "BLOCK_DV": block_k}
    io = {"q_ptr", "k_ptr", "v_ptr", "P_ptr", "Z_ptr"}  # in the input dtype; the rest: fp32
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else ("fp32" if name in ("lam", "log_floor") else "i32") for name in names}
    aligned = [name for name in names if name not in constexprs
               and name not in ("n_chunks", "heads", "lam", "log_floor")]
    source = ASTSource(fn=_titans_operands, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


class _TritonTitans(torch.autograd.Function):
    """Forward by `_titans_fwd` (storing each chunk's start state); backward by `_titans_bwd` for the state
    passing and torch autograd for the rest (the state-independent operands, recomputed under grad with the
    forward's autocast state, and the last, shorter chunk)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                M0: Tensor | None, S0: Tensor | None, chunk_size: int, global_decay: float,
                operands: str) -> tuple[Tensor, Tensor, Tensor]:
        L = k.shape[2]
        C = min(chunk_size, max(L, 1))
        main = (L // C) * C
        state = (M0, S0) if M0 is not None and S0 is not None else None
        y, M, S, Ms, Ss = _forward(q, k, v, alpha, eta, theta, C, global_decay, state, store_states=True,
                                   operands=operands)
        ctx.save_for_backward(q, k, v, alpha, eta, theta, M0, S0, Ms, Ss, M, S)
        ctx.chunk, ctx.main, ctx.global_decay = C, main, global_decay
        device = k.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return _with_tail((q, k, v, alpha, eta, theta), main, global_decay, y, M, S)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_M: Tensor, grad_S: Tensor) -> tuple[Tensor | None, ...]:
        from optimized.titans import torch_chunked

        q, k, v, alpha, eta, theta, M0, S0, Ms, Ss, M_main, S_main = ctx.saved_tensors
        C, main, lam = ctx.chunk, ctx.main, ctx.global_decay
        L = k.shape[2]
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v, alpha, eta, theta),
                                                                    ctx.needs_input_grad[:6], strict=True)]
        wanted = [t for t in leaves if t.requires_grad]
        grads: list[Tensor | None] = [None] * len(wanted)

        def accumulate(outputs: list[Tensor], cotangents: list[Tensor], extra: list[Tensor]) -> list[Tensor | None]:
            found = torch.autograd.grad(outputs, [*wanted, *extra], cotangents, allow_unused=True)
            for i, g in enumerate(found[:len(wanted)]):
                previous = grads[i]
                if g is not None:
                    grads[i] = g if previous is None else previous + g
            return list(found[len(wanted):])

        device, autocast, autocast_dtype = ctx.autocast
        dM: Tensor = grad_M  # ∂/∂ the kernel's final state
        dS: Tensor = grad_S
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            if main < L:  # the last, shorter chunk: differentiate the torch form, to the kernel's final state
                M_in, S_in = (t.detach().requires_grad_(True) for t in (M_main, S_main))
                tail = torch_chunked(*(t[:, :, main:] for t in leaves), chunk_size=L - main, global_decay=lam,
                                     initial_state=(M_in, S_in))
                found_M, found_S = accumulate(list(tail), [grad_y[:, :, main:], grad_M, grad_S], [M_in, S_in])
                dM = torch.zeros_like(M_main) if found_M is None else found_M
                dS = torch.zeros_like(S_main) if found_S is None else found_S
            dM0, dS0 = dM, dS
            if main > 0:
                q_, k_, v_, a_, e_, th_ = (t[:, :, :main] for t in leaves)
                operands = _kernel_operands(q_, k_, v_, a_, e_, th_, C, lam, _io_dtype(q_, k_, v_))
                cotangents, dM0, dS0 = _backward_kernel(operands, Ms, Ss, grad_y[:, :, :main], dM, dS)
                pairs = [(t, g.to(t.dtype)) for t, g in zip(operands, cotangents, strict=True) if t.requires_grad]
                if pairs and wanted:
                    accumulate([t for t, _ in pairs], [g for _, g in pairs], [])
        result = iter(grads)
        input_grads = [next(result) if t.requires_grad else None for t in leaves]
        grad_M0 = dM0.to(M0.dtype) if M0 is not None and ctx.needs_input_grad[6] else None
        grad_S0 = dS0.to(S0.dtype) if S0 is not None and ctx.needs_input_grad[7] else None
        return (*input_grads, grad_M0, grad_S0, None, None, None)


class _TritonStatePass(torch.autograd.Function):
    """The kernel's state passing alone, from operands formed by differentiable torch ops (`_kernel_operands`):
    forward `_titans_fwd`, backward `_titans_bwd`; autograd carries the operands' gradients on to q, k, v and the
    gates. Two kernel launches and no autograd calls inside, so `torch.compile` traces it into one graph."""

    @staticmethod
    def forward(ctx: Any, k_io: Tensor, v_io: Tensor, P: Tensor, Z: Tensor, y_c: Tensor, vecs: Tensor,
                scalars: Tensor, M0: Tensor, S0: Tensor, has_state: bool,
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        operands = (k_io, v_io, P, Z, y_c, vecs, scalars)
        y, M, S, Ms, Ss = _state_pass(operands, M0, S0, out_dtype, has_state=has_state, store_states=True)
        ctx.save_for_backward(k_io, v_io, P, Z, y_c, vecs, scalars, Ms, Ss)
        ctx.has_state = has_state
        return y, M, S

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_M: Tensor, grad_S: Tensor) -> tuple[Tensor | None, ...]:
        k_io, v_io, P, Z, y_c, vecs, scalars, Ms, Ss = ctx.saved_tensors
        grads, dM0, dS0 = _backward_kernel((k_io, v_io, P, Z, y_c, vecs, scalars), Ms, Ss, grad_y, grad_M, grad_S)
        cast_grads = [g.to(t.dtype) for g, t in zip(grads, (k_io, v_io, P, Z, y_c, vecs, scalars), strict=True)]
        return (*cast_grads, dM0 if ctx.has_state else None, dS0 if ctx.has_state else None, None, None)


def _composed(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, chunk_size: int,
              lam: float, initial_state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """`titans_memory_triton` with gradients as a composition: the operands by `_kernel_operands` (torch,
    differentiable), the state passing by `_TritonStatePass`, a last shorter chunk by the torch form. Same values as
    `_TritonTitans`; it keeps the operands' autograd intermediates instead of recomputing them in backward."""
    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    C = min(chunk_size, max(L, 1))
    main = (L // C) * C
    if initial_state is None:
        M = torch.zeros(B, H, d_k, d_v, dtype=torch.float32, device=k.device)
        S = torch.zeros_like(M)
    else:
        M, S = (t.to(torch.float32) for t in initial_state)
    y = v.new_zeros(B, H, 0, d_v)
    if main > 0:
        operands = _kernel_operands(q[:, :, :main], k[:, :, :main], v[:, :, :main], alpha[:, :, :main],
                                    eta[:, :, :main], theta[:, :, :main], C, lam, _io_dtype(q, k, v))
        apply = cast(Callable[..., tuple[Tensor, Tensor, Tensor]], _TritonStatePass.apply)
        y, M, S = apply(*operands, M.contiguous(), S.contiguous(), initial_state is not None, v.dtype)
    return _with_tail((q, k, v, alpha, eta, theta), main, lam, y, M, S)


def titans_memory_triton_autograd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                                  chunk_size: int, global_decay: float = 0.0,
                                  initial_state: tuple[Tensor, Tensor] | None = None,
                                  operands: str = "triton",
                                  composed: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`titans_memory_triton` with gradients (see the module docstring); without any (grad mode off, or no input
    requiring grad) the plain forward, which stores no chunk states. The backward recomputes the operands with
    torch (under grad) whichever `operands` formed them in the forward.

    `composed` (default: while `torch.compile` traces) takes `_composed` instead: the same values by a graph that
    dynamo can trace (the recomputing backward calls autograd inside a backward, which dynamo cannot, and every
    compiled model holding a Titans memory broke its graph there); inductor then fuses the torch-formed operands."""
    tensors = [q, k, v, alpha, eta, theta, *(initial_state or ())]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return titans_memory_triton(q, k, v, alpha, eta, theta, chunk_size=chunk_size, global_decay=global_decay,
                                    initial_state=initial_state, operands=operands)
    if torch.compiler.is_compiling() if composed is None else composed:
        return _composed(q, k, v, alpha, eta, theta, chunk_size, float(global_decay), initial_state)
    apply = cast(Callable[..., tuple[Tensor, Tensor, Tensor]], _TritonTitans.apply)
    M0, S0 = initial_state if initial_state is not None else (None, None)
    return apply(q, k, v, alpha, eta, theta, M0, S0, chunk_size, float(global_decay), operands)
