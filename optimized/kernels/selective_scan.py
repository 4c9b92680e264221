"""Triton kernel for the selective scan (`optimized.ssm` dispatches here on CUDA when mamba-ssm is absent).

One program per (batch b, block of BLOCK_D channels); it walks time sequentially, as mamba-ssm's CUDA kernel
does, holding the state h as a (BLOCK_D, BLOCK_N) float32 register tile, parallel over channels and states:

    Ā_t = exp(Δ_t A),   h_t = Ā_t ⊙ h_{t−1} + Δ_t u_t B_t,   y_t = Σ_n C_t h_t + D u_t,   out_t = y_t silu(z_t).

Time advances in blocks of BLOCK_L steps unrolled with `tl.static_range`, so the loads of a block (which do not
depend on h) can be issued ahead of the arithmetic. N is padded to the power of two BLOCK_N with masks. B and C
are read through (channels per group, batch, group, state, time) strides, which covers mamba-ssm's three layouts
((D, N), (B, N, L), (B, G, N, L)) with one 2-D load. Only plain constructs: scalar-indexed loads and stores, a
runtime `range` loop, `tl.static_range`, `tl.exp`, `tl.sum(axis=1)`, `tl.where` (no `tl.associative_scan`,
no reshapes), so it compiles on every Triton 3.x.

Tolerances against the float64 reference: the long-scan (MODEL) tolerances, float32 1e-4, bfloat16 5e-2; the
math runs in float32 whatever the input dtype. Gradients (`selective_scan_triton_autograd`) recompute the
forward with the torch two-level scan (`optimized.ssm.chunked_scan`) and differentiate that: correct, not fast.
Under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (tests call `selective_scan_triton` directly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["compile_for_gpu", "selective_scan_triton", "selective_scan_triton_autograd"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations


@_jit
def _selective_scan_fwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr,  # type: ignore[no-untyped-def]
                        last_ptr, dim, length, n_state, group_B, group_C,
                        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) states
    mask_d = offs_d < dim
    mask_n = offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    zero_d = tl.zeros([BLOCK_D], dtype=tl.int32)
    state_offs = (b * dim + offs_d)[:, None] * n_state + offs_n[None, :]  # into (B, D, N) h0 and last
    A = tl.load(A_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    rows = (b * dim + offs_d) * length  # u, delta, z, out are contiguous (B, D, L)
    # B, C: row d reads group d // group_*; the shared (D, N) layout has group size 1 and no batch or time stride
    B_offs = b * sB_b + (offs_d // group_B)[:, None] * sB_g + offs_n[None, :] * sB_n  # (BLOCK_D, BLOCK_N)
    C_offs = b * sC_b + (offs_d // group_C)[:, None] * sC_g + offs_n[None, :] * sC_n
    for start in range(0, length, BLOCK_L):
        for i in tl.static_range(BLOCK_L):
            t = start + i
            mask_t = mask_d & (zero_d + t < length)  # a (BLOCK_D,) compare: the interpreter rejects scalar masks
            u = tl.load(u_ptr + rows + t, mask=mask_t, other=0.0).to(tl.float32)  # (BLOCK_D,)
            dt = tl.load(delta_ptr + rows + t, mask=mask_t, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(mask_t, dt, 0.0)  # past the end: Ā = 1 and no input, so h is kept
            mask_tn = mask_t[:, None] & mask_n[None, :]
            B_t = tl.load(B_ptr + B_offs + t * sB_l, mask=mask_tn, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + C_offs + t * sC_l, mask=mask_tn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t
            y = tl.sum(C_t * h, axis=1)  # (BLOCK_D,)
            if HAS_D:
                y = y + D * u
            if HAS_Z:
                z = tl.load(z_ptr + rows + t, mask=mask_t, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + rows + t, y.to(out_ptr.dtype.element_ty), mask=mask_t)
    tl.store(last_ptr + state_offs, h, mask=mask_dn)


def _matrix_strides(x: Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(channels per group, stride of batch, group, state, time) for B or C in any of mamba-ssm's layouts."""
    if x.ndim == 2:  # (D, N): one "group" per channel, no batch or time stride
        return 1, 0, x.stride(0), x.stride(1), 0
    if x.ndim == 3:  # (B, N, L): one group for all channels
        return dim, x.stride(0), 0, x.stride(1), x.stride(2)
    return dim // x.shape[1], x.stride(0), x.stride(1), x.stride(2), x.stride(3)  # (B, G, N, L)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          initial_state: Tensor | None = None, *, block_d: int | None = None,
                          block_l: int = 8) -> tuple[Tensor, Tensor]:
    """Forward only: (out (B, D, L) in u's dtype, last_state (B, D, N) float32). Inputs as in
    `reference.ssm.selective_scan` (already validated by the caller). `block_d` channels per program (a power of
    two; default: up to 2048 state elements per program), `block_l` time steps unrolled per loop iteration."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    block_n = max(2, triton.next_power_of_2(n_state))
    if block_d is None:
        block_d = max(1, min(triton.next_power_of_2(dim), 2048 // block_n, 64))
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
    grid = (batch, triton.cdiv(dim, block_d))
    _selective_scan_fwd[grid](
        u_c, delta_c, A_c, B, C, D_c, z_c, bias_c, h0, out, last, dim, length, n_state, group_B, group_C,
        *strides_B, *strides_C, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_L=block_l)
    return out, last


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", *, options: bool = True, block_d: int = 32,
                    block_n: int = 16, block_l: int = 8) -> Any:
    """Compile `_selective_scan_fwd` ahead of time for CUDA compute capability `capability` (90: H100) with
    (u, delta, B, C, z, out) in `dtype` ("fp32", "fp16", "bf16") and every option on or off; no GPU needed (Triton's
    frontend, its passes and ptxas run on the CPU). This is the check `TRITON_INTERPRET=1` cannot make, so it
    must run in a process without that variable (the tests use a subprocess). Returns Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names: list[str] = _selective_scan_fwd.arg_names
    constexprs = {"HAS_D": options, "HAS_Z": options, "HAS_BIAS": options, "HAS_H0": options, "SOFTPLUS": options,
                  "BLOCK_D": block_d, "BLOCK_N": block_n, "BLOCK_L": block_l}
    io = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr"}  # in the input dtype; A, D, bias, h0: fp32
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in names}
    source = ASTSource(fn=_selective_scan_fwd, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


class _TritonScan(torch.autograd.Function):
    """Forward by the kernel; backward by differentiating the torch two-level scan (recomputed under grad)."""

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
