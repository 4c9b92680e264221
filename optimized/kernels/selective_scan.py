"""Triton kernel for the selective scan (`optimized.ssm` dispatches here on CUDA when mamba-ssm is absent).

One program per (batch, channel): it walks time in blocks of BLOCK_L steps, holding the state h (N,) in
registers. Inside a block the recurrence h_t = a_t h_{t−1} + b_t (a_t = e^{Δ_t A}, b_t = Δ_t B_t u_t) is a
first-order linear scan, solved by `tl.associative_scan` over (a, b) pairs; the output y_t = C_t·h_t + D u_t,
gated by silu(z_t), is written per block. Reads u, Δ, z, B, C once and writes out once: the memory floor.

Tolerances against the float64 reference: the long-scan (MODEL) tolerances, float32 1e-4, bfloat16 5e-2; the
math runs in float32. Gradients (`selective_scan_triton_autograd`) recompute the forward with the torch
chunked scan (`optimized.ssm.chunked_scan`) and differentiate that: correct, not fast.
Under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (tests call `selective_scan_triton` directly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["selective_scan_triton", "selective_scan_triton_autograd"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations


@_jit
def _combine(a_left: Any, b_left: Any, a_right: Any, b_right: Any) -> Any:
    # (a_l, b_l) then (a_r, b_r): h -> a_r (a_l h + b_l) + b_r
    return a_left * a_right, a_right * b_left + b_right


@_jit
def _selective_scan_fwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr,  # type: ignore[no-untyped-def]
                        last_ptr, dim, length, n_state, group_B, group_C,
                        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                        SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // dim
    d = pid % dim
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_state
    A = tl.load(A_ptr + d * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (N,)
    if HAS_H0:
        h = tl.load(h0_ptr + pid * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)
    row = pid * length  # u, delta, z, out are contiguous (B, D, L)
    B_base = B_ptr + b * sB_b + (d // group_B) * sB_g
    C_base = C_ptr + b * sC_b + (d // group_C) * sC_g
    rows = tl.arange(0, BLOCK_L)
    for start in range(0, length, BLOCK_L):
        offs_l = start + rows
        mask_l = offs_l < length
        u = tl.load(u_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)  # (BLOCK_L,)
        dt = tl.load(delta_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.where(mask_l, dt, 0.0)  # padding: decay 1, input 0
        mask_2d = mask_l[:, None] & mask_n[None, :]
        B_t = tl.load(B_base + offs_l[:, None] * sB_l + offs_n[None, :] * sB_n, mask=mask_2d, other=0.0)
        C_t = tl.load(C_base + offs_l[:, None] * sC_l + offs_n[None, :] * sC_n, mask=mask_2d, other=0.0)
        a = tl.exp(dt[:, None] * A[None, :])  # (BLOCK_L, N)
        x = (dt * u)[:, None] * B_t.to(tl.float32)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _combine)
        states = a_cum * h[None, :] + x_cum  # h_t for the block (BLOCK_L, N)
        y = tl.sum(states * C_t.to(tl.float32), axis=1)  # (BLOCK_L,)
        if HAS_D:
            y = y + D * u
        if HAS_Z:
            z = tl.load(z_ptr + row + offs_l, mask=mask_l, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + row + offs_l, y.to(out_ptr.dtype.element_ty), mask=mask_l)
        h = tl.sum(tl.where(rows[:, None] == BLOCK_L - 1, states, 0.0), axis=0)  # padded rows keep the state
    tl.store(last_ptr + pid * n_state + offs_n, h, mask=mask_n)


def _matrix_strides(x: Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(channels per group, stride of batch, group, state, time) for B or C in any of mamba-ssm's layouts."""
    if x.ndim == 2:  # (D, N): one "group" per channel, no batch or time stride
        return 1, 0, x.stride(0), x.stride(1), 0
    if x.ndim == 3:  # (B, N, L): one group for all channels
        return dim, x.stride(0), 0, x.stride(1), x.stride(2)
    return dim // x.shape[1], x.stride(0), x.stride(1), x.stride(2), x.stride(3)  # (B, G, N, L)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          initial_state: Tensor | None = None, *, block_l: int = 128) -> tuple[Tensor, Tensor]:
    """Forward only: (out (B, D, L) in u's dtype, last_state (B, D, N) float32). Inputs as in
    `reference.ssm.selective_scan` (already validated by the caller); `block_l` must be a power of two."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    u_c, delta_c = u.contiguous(), delta.contiguous()
    z_c = z.contiguous() if z is not None else u_c
    A_c = A.float().contiguous()
    out = torch.empty_like(u_c)
    last = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else last
    D_c = D.float().contiguous() if D is not None else A_c
    bias_c = delta_bias.float().contiguous() if delta_bias is not None else A_c
    group_B, *strides_B = _matrix_strides(B, dim)
    group_C, *strides_C = _matrix_strides(C, dim)
    _selective_scan_fwd[(batch * dim,)](
        u_c, delta_c, A_c, B, C, D_c, z_c, bias_c, h0, out, last, dim, length, n_state, group_B, group_C,
        *strides_B, *strides_C, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, BLOCK_L=block_l,
        BLOCK_N=max(2, triton.next_power_of_2(n_state)))
    return out, last


class _TritonScan(torch.autograd.Function):
    """Forward by the kernel; backward by differentiating the torch chunked scan (recomputed)."""

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
