"""Triton kernel for the selective scan (`optimized.ssm` dispatches here on CUDA when mamba-ssm is absent).

Implements the forward of `reference.ssm.selective_scan` ([SSM-1]–[SSM-6]):

    Ā_t = exp(Δ_t A),   h_t = Ā_t ⊙ h_{t−1} + Δ_t u_t B_t,   y_t = Σ_n C_t h_t + D u_t,   out_t = y_t silu(z_t).

Method. One single-warp program per (batch b, block of BLOCK_D = 8 channels), so the grid (B, D/8) has thousands
of programs (2048 for B = 8, D = 2048) that all fit on the GPU at once. A program walks time in tiles of BLOCK_L
steps. Each tile is one bulk load per tensor: u, Δ, z as (BLOCK_L, BLOCK_D) (contiguous along L), B and C as
(BLOCK_L, BLOCK_N) when one group covers the block (the (B, N, L) layout, and (B, G, N, L) when D/G is a multiple
of BLOCK_D), else gathered per channel as (BLOCK_L, BLOCK_N, BLOCK_D); the (D, N) layout is loaded once. The
tile's decays Ā and inputs Δ u B are formed as (BLOCK_L, BLOCK_N, BLOCK_D) register tensors, the state carried
from the previous tile is folded into the first step (x_0 ← Ā_0 h + x_0), and `tl.associative_scan` along time
with (a₁, x₁)∘(a₂, x₂) = (a₁a₂, a₂x₁ + x₂) gives every h_t of the tile; y is the sum over N of C ⊙ h, and the
last row is the state carried on. Two tile slots alternate: a slot is reloaded with the tile two ahead as
soon as it has been scanned, so each program has its next tile's loads in flight while it computes (register
double buffering; a third slot spills).

Why this is bandwidth-bound rather than latency-bound: no load depends on the state, so the only serial chain
is the in-register recurrence (one fused multiply-add per step and state); time is the first (slowest) axis of
the tile, so Triton's default layout (lanes along D, then N) keeps a thread's time steps in its own registers,
the scan is a plain in-thread loop, and N is spread over only 4 lanes (the readout needs 2 shuffle levels). Per
(t, d, n) the work is one exp2 and ~4 multiply-adds: about 15 SASS instructions in float32 and 18 in bfloat16
with the tile's overheads (layout shuffles, addresses; sm_90, Triton 3.6), against a memory floor of 16 bytes
per (t, d) (u, Δ, z, out); registers are capped at 128 (`MAX_REGISTERS`) so that all 16 programs an SM needs
are resident at once. The kernel is then bound by instruction issue and memory parallelism near the floor, not
by a memory latency per step (the sequential kernel it replaces paid ~1 µs per step). N is padded to the power
of two BLOCK_N with masks; past the end of the sequence Δ = 0, so Ā = 1 and the state is kept.

Tolerances against the float64 reference: the long-scan (MODEL) tolerances, float32 1e-4, bfloat16 5e-2; the
math runs in float32 whatever the input dtype (exp2 of Δ·A·log2 e: on the GPU one ex2.approx, relative error
~2⁻²²). Gradients (`selective_scan_triton_autograd`): `_selective_scan_bwd` computes them in one launch
(specs/ssm.md; on an H200 at B=8 D=2048 N=16 L=2048 fp32 forward + backward take 4.76 ms, 12× faster than the
torch recompute, 0.89× mamba-ssm's CUDA speed) where B and C are shared or one group per channel block; read per
channel, or with `MEMARCH_SCAN_BACKWARD=torch`, they recompute the forward with the torch two-level scan
(`optimized.ssm.chunked_scan`) and differentiate that: correct, not fast. Under
`TRITON_INTERPRET=1` the kernels run on CPU tensors (tests call `selective_scan_triton` and
`selective_scan_triton_backward` directly); `compile_for_gpu` checks that they compile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["compile_for_gpu", "selective_scan_triton", "selective_scan_triton_autograd"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations

# How a program reads B or C (MATRIX_* constexpr): the (D, N) layout once; one group for the whole block of
# channels ((B, N, L), or (B, G, N, L) with D/G a multiple of BLOCK_D) as a (BLOCK_L, BLOCK_N) tile per step
# block; any other grouping gathered per channel as (BLOCK_L, BLOCK_N, BLOCK_D).
SHARED, ONE_GROUP, PER_CHANNEL = 0, 1, 2
# Registers per thread: at most 128 lets 16 single-warp programs share an SM (65536 registers), so the B·D/8 = 2048
# programs of B = 8, D = 2048 all run at once on 132 SMs (the default tile needs ~148 uncapped; capped, no spills).
MAX_REGISTERS = 128


@_jit
def _combine(a_left, x_left, a_right, x_right):  # type: ignore[no-untyped-def]  # (no annotations: Triton 3.6 rejects `Any`)
    # step (a_left, x_left) then (a_right, x_right): h -> a_right (a_left h + x_left) + x_right
    return a_left * a_right, a_right * x_left + x_right


@_jit
def _load_matrix(ptr, base, offs_d, offs_n, t, mask_d, mask_n, mask_l, group, s_g, s_n, s_l,  # type: ignore[no-untyped-def]
                 MODE: tl.constexpr):
    """B or C at steps t as float32, broadcastable to (BLOCK_L, BLOCK_N, BLOCK_D) (MODE ONE_GROUP or PER_CHANNEL)."""
    if MODE == 1:  # ONE_GROUP: `base` points at the block's group
        m = mask_l[:, None] & mask_n[None, :]
        x = tl.load(ptr + base + offs_n[None, :] * s_n + t[:, None] * s_l, mask=m, other=0.0)
        return x.to(tl.float32)[:, :, None]
    else:
        m = mask_l[:, None, None] & mask_n[None, :, None] & mask_d[None, None, :]
        offs = (base + ((offs_d // group) * s_g)[None, None, :] + (offs_n * s_n)[None, :, None]
                + t[:, None, None] * s_l)
        return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)


@_jit
def _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d, offs_n, t, mask_d,  # type: ignore[no-untyped-def]
               mask_n, length, group_B, group_C, sB_g, sB_n, sB_l, sC_g, sC_n, sC_l, HAS_Z: tl.constexpr,
               B_MODE: tl.constexpr, C_MODE: tl.constexpr):
    """u, Δ, z (BLOCK_L, BLOCK_D) and B, C at steps t, float32, zero past the end (stand-ins for absent ones)."""
    mask_l = t < length
    mask_ld = mask_l[:, None] & mask_d[None, :]
    io = rows[None, :] + t[:, None]  # u, delta, z are contiguous (B, D, L)
    u = tl.load(u_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
    z = u
    if HAS_Z:
        z = tl.load(z_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
    Bm = u
    if B_MODE != 0:
        Bm = _load_matrix(B_ptr, base_B, offs_d, offs_n, t, mask_d, mask_n, mask_l, group_B, sB_g, sB_n, sB_l, B_MODE)
    Cm = u
    if C_MODE != 0:
        Cm = _load_matrix(C_ptr, base_C, offs_d, offs_n, t, mask_d, mask_n, mask_l, group_C, sC_g, sC_n, sC_l, C_MODE)
    return u, dt, z, Bm, Cm


@_jit
def _scan_tile(h, u, dt, z, B_tile, C_tile, B_fixed, C_fixed, A, D, bias, out_ptr, rows, t, offs_l, mask_d,  # type: ignore[no-untyped-def]
               length, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               B_MODE: tl.constexpr, C_MODE: tl.constexpr, BLOCK_L: tl.constexpr):
    """[SSM-1]–[SSM-5] for the steps t of one tile from the state h (BLOCK_N, BLOCK_D); stores out, returns h."""
    if B_MODE == 0:
        Bm = B_fixed
    else:
        Bm = B_tile
    if C_MODE == 0:
        Cm = C_fixed
    else:
        Cm = C_tile
    mask_ld = (t < length)[:, None] & mask_d[None, :]
    if HAS_BIAS:
        dt = dt + bias[None, :]
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    dt = tl.where(mask_ld, dt, 0.0)  # past the end: Ā = 1 and no input, so h is kept
    a = tl.exp2(dt[:, None, :] * A[None, :, :])  # Ā (BLOCK_L, BLOCK_N, BLOCK_D); A is scaled by log2 e
    x = (dt * u)[:, None, :] * Bm
    x = tl.where(offs_l[:, None, None] == 0, a * h[None, :, :] + x, x)  # seed the tile with the carried state
    a, hs = tl.associative_scan((a, x), 0, _combine)  # hs: h_t at every step of the tile
    y = tl.sum(Cm * hs, axis=1)  # (BLOCK_L, BLOCK_D)
    if HAS_D:
        y = y + D[None, :] * u
    if HAS_Z:
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + rows[None, :] + t[:, None], y.to(out_ptr.dtype.element_ty), mask=mask_ld)
    return tl.sum(tl.where(offs_l[:, None, None] == BLOCK_L - 1, hs, 0.0), axis=0)  # the tile's last state


@_jit
def _program_setup(b, d0, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, h0_ptr, dim, length, n_state, group_B,  # type: ignore[no-untyped-def]
                   group_C, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_H0: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """What the forward and the backward kernel load once per program (batch row b, channels d0 …): index tiles
    and masks, A (float32, natural units), D, delta_bias, B and C when SHARED (broadcastable to (BLOCK_L, BLOCK_N,
    BLOCK_D)), the rows of u/Δ/z, the bases of B and C when ONE_GROUP, and the start state h (BLOCK_N, BLOCK_D).
    Absent options get stand-ins (A) that are never read."""
    offs_d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    mask_d = offs_d < dim
    mask_n = offs_n < n_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    state_offs = (b * dim + offs_d)[None, :] * n_state + offs_n[:, None]  # (BLOCK_N, BLOCK_D) into (B, D, N)
    A = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_nd, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    D = A  # stand-ins for absent options
    bias = A
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    B_fixed = A
    if B_MODE == 0:  # SHARED (D, N): the same at every step
        B_fixed = tl.load(B_ptr + (offs_d * sB_g)[None, :] + (offs_n * sB_n)[:, None], mask=mask_nd, other=0.0)
        B_fixed = B_fixed.to(tl.float32)[None, :, :]
    C_fixed = A
    if C_MODE == 0:
        C_fixed = tl.load(C_ptr + (offs_d * sC_g)[None, :] + (offs_n * sC_n)[:, None], mask=mask_nd, other=0.0)
        C_fixed = C_fixed.to(tl.float32)[None, :, :]
    rows = (b * dim + offs_d) * length
    base_B = b * sB_b
    if B_MODE == 1:
        base_B += (d0 // group_B) * sB_g
    base_C = b * sC_b
    if C_MODE == 1:
        base_C += (d0 // group_C) * sC_g
    return offs_d, offs_n, mask_d, mask_n, mask_nd, state_offs, A, D, bias, B_fixed, C_fixed, rows, base_B, base_C, h


@_jit
def _selective_scan_fwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr,  # type: ignore[no-untyped-def]
                        last_ptr, dim, length, n_state, group_B, group_C,
                        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                        SOFTPLUS: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d, offs_n, mask_d, mask_n, mask_nd, state_offs, A, D, bias, B_fixed, C_fixed, rows, base_B, base_C, h = \
        _program_setup(b, d0, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, h0_ptr, dim, length, n_state, group_B, group_C,
                       sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, HAS_D, HAS_BIAS, HAS_H0, B_MODE, C_MODE, BLOCK_D, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)  # (BLOCK_L,) steps of a tile
    A = A * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e); padded states: A = 0, Ā = 1, no input
    # two tile slots, each reloaded (two tiles ahead) as soon as it is scanned, so a tile's loads are in flight
    # while the previous one is computed; the slots alternate, so no register copies (a third slot spills)
    u1, dt1, z1, B1, C1 = _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d, offs_n,
                                     offs_l, mask_d, mask_n, length, group_B, group_C, sB_g, sB_n, sB_l, sC_g,
                                     sC_n, sC_l, HAS_Z, B_MODE, C_MODE)
    u2, dt2, z2, B2, C2 = _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d, offs_n,
                                     BLOCK_L + offs_l, mask_d, mask_n, length, group_B, group_C, sB_g, sB_n, sB_l,
                                     sC_g, sC_n, sC_l, HAS_Z, B_MODE, C_MODE)
    for start in range(0, length, 2 * BLOCK_L):
        h = _scan_tile(h, u1, dt1, z1, B1, C1, B_fixed, C_fixed, A, D, bias, out_ptr, rows, start + offs_l, offs_l,
                       mask_d, length, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_MODE, C_MODE, BLOCK_L)
        u1, dt1, z1, B1, C1 = _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d,
                                         offs_n, start + 2 * BLOCK_L + offs_l, mask_d, mask_n, length, group_B,
                                         group_C, sB_g, sB_n, sB_l, sC_g, sC_n, sC_l, HAS_Z, B_MODE, C_MODE)
        h = _scan_tile(h, u2, dt2, z2, B2, C2, B_fixed, C_fixed, A, D, bias, out_ptr, rows,
                       start + BLOCK_L + offs_l, offs_l, mask_d, length, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_MODE,
                       C_MODE, BLOCK_L)
        u2, dt2, z2, B2, C2 = _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d,
                                         offs_n, start + 3 * BLOCK_L + offs_l, mask_d, mask_n, length, group_B,
                                         group_C, sB_g, sB_n, sB_l, sC_g, sC_n, sC_l, HAS_Z, B_MODE, C_MODE)
    tl.store(last_ptr + state_offs, h, mask=mask_nd)


@_jit
def _selective_scan_fwd_pipelined(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr,  # type: ignore[no-untyped-def]
                                  last_ptr, dim, length, n_state, group_B, group_C,
                                  sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                                  HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, B_MODE: tl.constexpr,
                                  C_MODE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_L: tl.constexpr, STAGES: tl.constexpr):
    """`_selective_scan_fwd` with one tile per iteration and Triton's software pipelining (`tl.range(...,
    num_stages=STAGES)`) in place of the two register slots: on sm_80+ the tile loads become asynchronous copies
    into shared memory issued STAGES − 1 tiles ahead (cp.async; LDGSTS in the sm_90 SASS), so more loads are in
    flight per program without holding them in registers. Same values; an alternative launch for
    `--op scan_sweep`, not the default (untimed when written)."""
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d, offs_n, mask_d, mask_n, mask_nd, state_offs, A, D, bias, B_fixed, C_fixed, rows, base_B, base_C, h = \
        _program_setup(b, d0, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, h0_ptr, dim, length, n_state, group_B, group_C,
                       sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, HAS_D, HAS_BIAS, HAS_H0, B_MODE, C_MODE, BLOCK_D, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    A = A * 1.4426950408889634  # see _selective_scan_fwd
    for start in tl.range(0, length, BLOCK_L, num_stages=STAGES):
        u, dt, z, Bt, Ct = _load_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, rows, base_B, base_C, offs_d, offs_n,
                                      start + offs_l, mask_d, mask_n, length, group_B, group_C, sB_g, sB_n, sB_l,
                                      sC_g, sC_n, sC_l, HAS_Z, B_MODE, C_MODE)
        h = _scan_tile(h, u, dt, z, Bt, Ct, B_fixed, C_fixed, A, D, bias, out_ptr, rows, start + offs_l, offs_l,
                       mask_d, length, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, B_MODE, C_MODE, BLOCK_L)
    tl.store(last_ptr + state_offs, h, mask=mask_nd)


@_jit
def _delta_at(delta_ptr, io, mask_ld, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # type: ignore[no-untyped-def]
    """Δ at the (BLOCK_L, BLOCK_D) offsets `io` after delta_bias and softplus, 0 where masked; and dΔ/d(raw δ)."""
    raw = tl.load(delta_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    slope = tl.full(raw.shape, 1.0, tl.float32)
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
        slope = tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
    return tl.where(mask_ld, dt, 0.0), slope


@_jit
def _selective_scan_bwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, dout_ptr,  # type: ignore[no-untyped-def]
                        dlast_ptr, ckpt_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                        dh0_ptr, dim, length, n_state, n_tiles, group_B, group_C,
                        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                        SOFTPLUS: tl.constexpr, B_MODE: tl.constexpr, C_MODE: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """The selective scan's backward for one (batch b, block of BLOCK_D channels); B and C SHARED or ONE_GROUP.

    Pass 1 walks time forward and stores the state entering every tile (`ckpt`, (B, D, n_tiles, N) float32).
    Pass 2 walks the tiles in reverse: it recomputes the tile's states h_t from its checkpoint (the forward's
    associative scan), forms dy = dout ⊙ silu(z) and the adjoint g_t = ∂L/∂h_t = C_t dy_t + Ā_{t+1} g_{t+1} by a
    reverse associative scan (Ā_{t+1} from Δ loaded one step ahead; the carry from the tile after seeds the last
    row, `dlast` seeds the end), and reads every gradient off g and h: with Ā_t h_{t−1} = h_t − x_t,
    dΔ_t = Σ_n g (u B + A (h − x)), du_t = Σ_n g Δ B + D dy, dB_tn = Σ_d g Δ u, dC_tn = Σ_d dy h,
    dA = Σ_t Δ g (h − x), dD = Σ_t dy u, dz = dout y silu′(z), dh0 = Ā_0 g_0. Sums over channels of a group (dB,
    dC in ONE_GROUP) are written per program and added in torch; sums over time (dA, dD, dbias, and dB, dC in
    SHARED) stay in registers and are written per batch row."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    d0 = blk * BLOCK_D
    offs_d, offs_n, mask_d, mask_n, mask_nd, state_offs, A_nat, D, bias, B_fixed, C_fixed, rows, base_B, base_C, h = \
        _program_setup(b, d0, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, h0_ptr, dim, length, n_state, group_B, group_C,
                       sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, HAS_D, HAS_BIAS, HAS_H0, B_MODE, C_MODE, BLOCK_D, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)  # (BLOCK_L,) steps of a tile
    A = A_nat * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e)
    ckpt_offs = ((b * dim + offs_d)[None, :] * n_tiles) * n_state + offs_n[:, None]  # + tile · N
    # pass 1: the state entering every tile
    for tile in range(n_tiles):
        t = tile * BLOCK_L + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None] & mask_d[None, :]
        tl.store(ckpt_ptr + ckpt_offs + tile * n_state, h, mask=mask_nd)
        io = rows[None, :] + t[:, None]
        u = tl.load(u_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
        dt, _ = _delta_at(delta_ptr, io, mask_ld, bias, HAS_BIAS, SOFTPLUS)
        Bm = B_fixed
        if B_MODE != 0:
            Bm = _load_matrix(B_ptr, base_B, offs_d, offs_n, t, mask_d, mask_n, mask_l, group_B, sB_g, sB_n, sB_l,
                              B_MODE)
        a = tl.exp2(dt[:, None, :] * A[None, :, :])
        x = (dt * u)[:, None, :] * Bm
        x = tl.where(offs_l[:, None, None] == 0, a * h[None, :, :] + x, x)
        a, hs = tl.associative_scan((a, x), 0, _combine)
        h = tl.sum(tl.where(offs_l[:, None, None] == BLOCK_L - 1, hs, 0.0), axis=0)
    # pass 2: the tiles in reverse, carrying g at the first row of the tile after (the end: ∂L/∂ last state)
    carry = tl.load(dlast_ptr + state_offs, mask=mask_nd, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
    dA = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dB_sum = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # SHARED B, C: sums over time
    dC_sum = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    a0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # Ā at step 0 (for dh0)
    for back in range(n_tiles):
        tile = n_tiles - 1 - back
        t = tile * BLOCK_L + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None] & mask_d[None, :]
        io = rows[None, :] + t[:, None]
        u = tl.load(u_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
        dt, slope = _delta_at(delta_ptr, io, mask_ld, bias, HAS_BIAS, SOFTPLUS)
        mask_next = (t + 1 < length)[:, None] & mask_d[None, :]
        dt_next, _ = _delta_at(delta_ptr, io + 1, mask_next, bias, HAS_BIAS, SOFTPLUS)  # Δ_{t+1}, 0 past the end
        dout = tl.load(dout_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
        Bm = B_fixed
        if B_MODE != 0:
            Bm = _load_matrix(B_ptr, base_B, offs_d, offs_n, t, mask_d, mask_n, mask_l, group_B, sB_g, sB_n, sB_l,
                              B_MODE)
        Cm = C_fixed
        if C_MODE != 0:
            Cm = _load_matrix(C_ptr, base_C, offs_d, offs_n, t, mask_d, mask_n, mask_l, group_C, sC_g, sC_n, sC_l,
                              C_MODE)
        h_in = tl.load(ckpt_ptr + ckpt_offs + tile * n_state, mask=mask_nd, other=0.0)
        a = tl.exp2(dt[:, None, :] * A[None, :, :])  # Ā_t
        x_in = (dt * u)[:, None, :] * Bm  # Δ u B
        x = tl.where(offs_l[:, None, None] == 0, a * h_in[None, :, :] + x_in, x_in)
        _, hs = tl.associative_scan((a, x), 0, _combine)  # h_t
        y = tl.sum(Cm * hs, axis=1)  # (BLOCK_L, BLOCK_D)
        if HAS_D:
            y = y + D[None, :] * u
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + io, mask=mask_ld, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            dy = dout * z * sig
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + io, dz, mask=mask_ld)
        a_next = tl.exp2(dt_next[:, None, :] * A[None, :, :])  # Ā_{t+1}
        xg = Cm * dy[:, None, :]
        xg = tl.where(offs_l[:, None, None] == BLOCK_L - 1, xg + a_next * carry[None, :, :], xg)
        _, g = tl.associative_scan((a_next, xg), 0, _combine, reverse=True)  # g_t = xg_t + Ā_{t+1} g_{t+1}
        carry = tl.sum(tl.where(offs_l[:, None, None] == 0, g, 0.0), axis=0)  # g at the tile's first step
        a0 = tl.sum(tl.where(offs_l[:, None, None] == 0, a, 0.0), axis=0)
        decayed = hs - x_in  # Ā_t h_{t−1}
        ddt = tl.sum(g * (u[:, None, :] * Bm + A_nat[None, :, :] * decayed), axis=1)  # (BLOCK_L, BLOCK_D)
        du = tl.sum(g * Bm, axis=1) * dt
        if HAS_D:
            du = du + D[None, :] * dy
            dD += tl.sum(dy * u, axis=0)
        ddt = tl.where(mask_ld, ddt * slope, 0.0)  # through softplus: d/d(δ + bias)
        tl.store(du_ptr + io, du, mask=mask_ld)
        tl.store(ddelta_ptr + io, ddt, mask=mask_ld)
        dbias += tl.sum(ddt, axis=0)
        dA += tl.sum(g * decayed * dt[:, None, :], axis=0)
        gB = g * (dt * u)[:, None, :]  # ∂L/∂B per channel (BLOCK_L, BLOCK_N, BLOCK_D)
        gC = hs * dy[:, None, :]
        if B_MODE == 0:
            dB_sum += tl.sum(gB, axis=0)
        else:  # partial over this program's channels: (B, programs, N, L)
            part = ((b * tl.num_programs(1) + blk) * n_state + offs_n[None, :]) * length + t[:, None]
            tl.store(dB_ptr + part, tl.sum(gB, axis=2), mask=mask_l[:, None] & mask_n[None, :])
        if C_MODE == 0:
            dC_sum += tl.sum(gC, axis=0)
        else:
            part = ((b * tl.num_programs(1) + blk) * n_state + offs_n[None, :]) * length + t[:, None]
            tl.store(dC_ptr + part, tl.sum(gC, axis=2), mask=mask_l[:, None] & mask_n[None, :])
    tl.store(dA_ptr + state_offs, dA, mask=mask_nd)  # per batch row: (B, D, N)
    if B_MODE == 0:
        tl.store(dB_ptr + state_offs, dB_sum, mask=mask_nd)
    if C_MODE == 0:
        tl.store(dC_ptr + state_offs, dC_sum, mask=mask_nd)
    tl.store(dD_ptr + b * dim + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + offs_d, dbias, mask=mask_d)
    tl.store(dh0_ptr + state_offs, a0 * carry, mask=mask_nd)  # ∂L/∂h0 = Ā_0 g_0


def _matrix_strides(x: Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(channels per group, stride of batch, group, state, time) for B or C in any of mamba-ssm's layouts."""
    if x.ndim == 2:  # (D, N): one "group" per channel, no batch or time stride
        return 1, 0, x.stride(0), x.stride(1), 0
    if x.ndim == 3:  # (B, N, L): one group for all channels
        return dim, x.stride(0), 0, x.stride(1), x.stride(2)
    return dim // x.shape[1], x.stride(0), x.stride(1), x.stride(2), x.stride(3)  # (B, G, N, L)


def _matrix_mode(x: Tensor, group: int, block_d: int) -> int:
    """How the kernel reads B or C (SHARED, ONE_GROUP, PER_CHANNEL; see their comment)."""
    if x.ndim == 2:
        return SHARED
    return ONE_GROUP if group % block_d == 0 else PER_CHANNEL


def default_blocks(n_state: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L) for N states: 8 channels per single-warp program (lanes: 8 along D, 4 along N); BLOCK_L
    so that a thread holds ~16 (step, state) pairs per tile (4 steps at N = 16: 128 registers without spills on
    sm_90; 8 steps would need ~235, or spill under the cap)."""
    block_n = max(2, triton.next_power_of_2(n_state))
    return 8, max(1, min(8, 64 // block_n))


# The forward's default: the software-pipelined kernel with 3 stages (the eighth session's H200 sweep, B = 8,
# D = 2048, N = 16 fp32: 0.368 ms at L = 2K against the double-buffered kernel's 0.689 ms; 1.26 ms at 8K)
DEFAULT_STAGES = 3


def pipelined_blocks(n_state: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L) of the pipelined forward for N states: 16 channels per single-warp program and twice the
    double-buffered tile's steps (8 at N = 16), the fastest of the sweep's twelve pipelined launches; the tile
    registers it no longer double-buffers pay for the larger tile."""
    block_n = max(2, triton.next_power_of_2(n_state))
    return 16, max(1, min(8, 128 // block_n))


def _tiles(n_state: int, block_d: int | None, block_l: int | None,
           pipelined: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, BLOCK_L) of a launch: N padded to a power of two, the others as given or
    `default_blocks` (`pipelined_blocks` for the pipelined forward)."""
    default_d, default_l = pipelined_blocks(n_state) if pipelined else default_blocks(n_state)
    return max(2, triton.next_power_of_2(n_state)), block_d or default_d, block_l or default_l


def _matrix_layout(x: Tensor, dim: int, block_d: int) -> tuple[int, list[int], int]:
    """B or C as a launch reads it: (channels per group, its four strides, SHARED/ONE_GROUP/PER_CHANNEL)."""
    group, *strides = _matrix_strides(x, dim)
    return group, strides, _matrix_mode(x, group, block_d)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          initial_state: Tensor | None = None, *, block_d: int | None = None,
                          block_l: int | None = None, num_warps: int = 1,
                          maxnreg: int | None = MAX_REGISTERS,
                          stages: int | None = DEFAULT_STAGES) -> tuple[Tensor, Tensor]:
    """Forward only: (out (B, D, L) in u's dtype, last_state (B, D, N) float32). Inputs as in
    `reference.ssm.selective_scan` (already validated by the caller). `block_d` channels per program and
    `block_l` steps per tile (powers of two; defaults: `pipelined_blocks`, or `default_blocks` with
    `stages=None`), `num_warps` per program (1: the layout the module docstring describes), `maxnreg` registers per
    thread (None: uncapped). `stages` (≥ 1, default `DEFAULT_STAGES`) launches `_selective_scan_fwd_pipelined` with
    that many pipeline stages; `stages=None` launches `_selective_scan_fwd`, the register double buffering."""
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
        raise ValueError(f"selective_scan_triton: stages must be an int >= 1 or None, got {stages!r}")
    batch, dim, length = u.shape
    n_state = A.shape[1]
    block_n, block_d, block_l = _tiles(n_state, block_d, block_l, pipelined=stages is not None)
    u_c, delta_c = u.contiguous(), delta.contiguous()
    z_c = z.contiguous() if z is not None else u_c
    A_c = A.float().contiguous()
    out = torch.empty_like(u_c)
    last = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else last
    D_c = D.float().contiguous() if D is not None else A_c
    bias_c = delta_bias.float().contiguous() if delta_bias is not None else A_c
    (group_B, strides_B, B_mode), (group_C, strides_C, C_mode) = (_matrix_layout(x, dim, block_d) for x in (B, C))
    if PER_CHANNEL in (B_mode, C_mode) and maxnreg == MAX_REGISTERS:
        maxnreg = None  # the per-channel gathers need ~170 registers: capped at 128 they would spill
    grid = (batch, triton.cdiv(dim, block_d))
    kernel, extra = (_selective_scan_fwd, {}) if stages is None else (_selective_scan_fwd_pipelined,
                                                                       {"STAGES": stages})
    kernel[grid](
        u_c, delta_c, A_c, B, C, D_c, z_c, bias_c, h0, out, last, dim, length, n_state, group_B, group_C,
        *strides_B, *strides_C, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, B_MODE=B_mode, C_MODE=C_mode, BLOCK_D=block_d,
        BLOCK_N=block_n, BLOCK_L=block_l, num_warps=num_warps, maxnreg=maxnreg, **extra)
    return out, last


def triton_backward_supported(u: Tensor, B: Tensor, C: Tensor, block_d: int | None = None) -> bool:
    """Whether `selective_scan_triton_backward` takes these B, C layouts (SHARED or ONE_GROUP; not PER_CHANNEL)."""
    dim, n_state = u.shape[1], B.shape[-2] if B.ndim > 2 else B.shape[1]
    block = block_d or default_blocks(n_state)[0]
    return all(_matrix_layout(x, dim, block)[2] != PER_CHANNEL for x in (B, C))


def _matrix_grad(partial: Tensor, x: Tensor) -> Tensor:
    """dB or dC in x's layout from the kernel's partial sums: (B, D, N) per batch row for SHARED, (B, programs,
    N, L) per program for ONE_GROUP."""
    if x.ndim == 2:
        return partial.sum(0)
    if x.ndim == 3:
        return partial.sum(1)
    batch, programs, n_state, length = partial.shape
    groups = x.shape[1]
    return partial.view(batch, groups, programs // groups, n_state, length).sum(2)


def selective_scan_triton_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                                   z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                                   initial_state: Tensor | None, grad_out: Tensor, grad_last: Tensor | None, *,
                                   block_d: int | None = None, block_l: int | None = None,
                                   num_warps: int = 1) -> tuple[Tensor | None, ...]:
    """Gradients of (out, last_state) of `selective_scan_triton` with respect to (u, delta, A, B, C, D, z,
    delta_bias, initial_state) — None for the absent ones — by `_selective_scan_bwd` (one launch; B and C as
    SHARED or ONE_GROUP: see `triton_backward_supported`). Each in its input's dtype and layout. Scratch: the state
    entering every tile, B·D·N·⌈L/BLOCK_L⌉ float32, and for ONE_GROUP B or C a (B, D/BLOCK_D, N, L) float32
    partial sum."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    block_n, block_d, block_l = _tiles(n_state, block_d, block_l)
    u_c, delta_c, dout = u.contiguous(), delta.contiguous(), grad_out.contiguous()
    z_c = z.contiguous() if z is not None else u_c
    A_c = A.float().contiguous()
    D_c = D.float().contiguous() if D is not None else A_c
    bias_c = delta_bias.float().contiguous() if delta_bias is not None else A_c
    h0 = initial_state.float().contiguous() if initial_state is not None else A_c
    dlast = (grad_last.float().contiguous() if grad_last is not None
             else torch.zeros(batch, dim, n_state, device=u.device, dtype=torch.float32))
    (group_B, strides_B, B_mode), (group_C, strides_C, C_mode) = (_matrix_layout(x, dim, block_d) for x in (B, C))
    if PER_CHANNEL in (B_mode, C_mode):
        raise ValueError("selective_scan_triton_backward: B or C is grouped so that a group does not fill whole "
                         f"blocks of {block_d} channels (per-channel reads); use the torch backward for it")
    programs = triton.cdiv(dim, block_d)
    n_tiles = max(1, triton.cdiv(length, block_l))

    def f32(*shape: int) -> Tensor:
        return torch.empty(*shape, device=u.device, dtype=torch.float32)

    ckpt = f32(batch, dim, n_tiles, n_state)
    du, ddelta = f32(batch, dim, length), f32(batch, dim, length)
    dz = f32(batch, dim, length) if z is not None else du
    dA, dh0 = f32(batch, dim, n_state), f32(batch, dim, n_state)
    dD, dbias = f32(batch, dim), f32(batch, dim)
    dB_part = f32(batch, dim, n_state) if B_mode == SHARED else f32(batch, programs, n_state, length)
    dC_part = f32(batch, dim, n_state) if C_mode == SHARED else f32(batch, programs, n_state, length)
    _selective_scan_bwd[(batch, programs)](
        u_c, delta_c, A_c, B, C, D_c, z_c, bias_c, h0, dout, dlast, ckpt, du, ddelta, dz, dA, dB_part, dC_part, dD,
        dbias, dh0, dim, length, n_state, n_tiles, group_B, group_C, *strides_B, *strides_C, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
        SOFTPLUS=delta_softplus, B_MODE=B_mode, C_MODE=C_mode, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l,
        num_warps=num_warps)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype),
            _matrix_grad(dB_part, B).to(B.dtype), _matrix_grad(dC_part, C).to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz.to(z.dtype) if z is not None else None,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None)


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", *, options: bool = True, matrix_mode: int = ONE_GROUP,
                    block_d: int = 8, block_n: int = 16, block_l: int = 4, num_warps: int = 1,
                    maxnreg: int | None = MAX_REGISTERS, backward: bool = False, stages: int | None = None) -> Any:
    """Compile `_selective_scan_fwd` ahead of time for CUDA compute capability `capability` (90: H100) with
    (u, delta, B, C, z, out) in `dtype` ("fp32", "fp16", "bf16"), every option on or off and B, C read as
    `matrix_mode` (SHARED, ONE_GROUP, PER_CHANNEL); no GPU needed (Triton's frontend, its passes and ptxas run on
    the CPU). This is the check `TRITON_INTERPRET=1` cannot make, so it must run in a process without that
    variable (the tests use a subprocess). With `backward`, `_selective_scan_bwd` instead (`matrix_mode` SHARED
    or ONE_GROUP; the gradient buffers float32); with `stages`, `_selective_scan_fwd_pipelined`. Per-step B and C
    are taken as contiguous along L (their L stride specialised to 1, as a launch on such tensors is). Returns
    Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _selective_scan_bwd if backward else _selective_scan_fwd if stages is None \
        else _selective_scan_fwd_pipelined
    names: list[str] = kernel.arg_names
    constexprs = {"HAS_D": options, "HAS_Z": options, "HAS_BIAS": options, "HAS_H0": options, "SOFTPLUS": options,
                  "B_MODE": matrix_mode, "C_MODE": matrix_mode, "BLOCK_D": block_d, "BLOCK_N": block_n,
                  "BLOCK_L": block_l}
    if stages is not None and not backward:
        constexprs["STAGES"] = stages
    if matrix_mode != SHARED:  # B and C contiguous along L, as Triton specialises a launch's stride of 1
        constexprs.update({"sB_l": 1, "sC_l": 1})
    io = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr"}  # input dtype; the rest fp32
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in names}
    # as Triton specialises a typical launch: pointers 16-byte aligned, sizes and strides multiples of 16
    aligned = [name for name in names if name not in constexprs
               and name not in {"n_state", "n_tiles", "sB_l", "sC_l"}]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "maxnreg": maxnreg})


def use_triton_backward(u: Tensor, B: Tensor, C: Tensor) -> bool:
    """The backward kernel, where it takes B and C (SHARED or ONE_GROUP), unless `MEMARCH_SCAN_BACKWARD=torch`
    asks for the torch chunked recompute (for A/B timing and debugging)."""
    choice = os.environ.get("MEMARCH_SCAN_BACKWARD", "triton")
    if choice not in ("triton", "torch"):
        raise ValueError(f"MEMARCH_SCAN_BACKWARD must be 'triton' or 'torch', got {choice!r}")
    return choice == "triton" and triton_backward_supported(u, B, C)


class _TritonScan(torch.autograd.Function):
    """Forward by the kernel; backward by `_selective_scan_bwd` where `use_triton_backward` says so, otherwise by
    differentiating the torch two-level scan (recomputed under grad)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = delta_softplus
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_last: Tensor) -> tuple[Tensor | None, ...]:
        from optimized.ssm import chunked_scan

        inputs: list[Tensor | None] = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                                       for t in ctx.saved_tensors]
        u, delta, A, B, C, D, z, delta_bias, initial_state = inputs
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        if use_triton_backward(u, B, C):
            found = selective_scan_triton_backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                                   initial_state, grad_out, grad_last)
            kept = [g if t is not None and t.requires_grad else None for g, t in zip(found, inputs, strict=True)]
            return (*kept[:8], None, kept[8])
        with torch.enable_grad():
            out, last = chunked_scan(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((out, last), wanted, (grad_out, grad_last.to(last.dtype)),
                                             allow_unused=True))
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result[:8], None, result[8])


def selective_scan_triton_autograd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                                   z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                                   initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """`selective_scan_triton` with gradients (see the module docstring)."""
    apply = cast(Callable[..., tuple[Tensor, Tensor]], _TritonScan.apply)
    return apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
