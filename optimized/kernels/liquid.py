"""Triton kernels for the liquid time-constant recurrence (`optimized.liquid.LiquidCell` dispatches here on CUDA).

Implements `optimized.liquid.ltc_unfolds` applied over all L steps ([EMMA-2] [EMMA-3]) in one launch forward and one
launch backward, instead of a Python loop of ~10 small kernels per step and unfold. With the hoisted input term
u_t = W_in x_t + b (B, H), W = W_recᵀ (H, H), a = Δt·A and d₀ = 1 + Δt/τ (H,), Δt = dt / ode_unfolds, each step
runs `ode_unfolds` times

    f = σ(u_t + h W),   h ← (h + a ⊙ f) / (d₀ + Δt f)

and the state after the last unfold is output t. One program per block of BLOCK_B = 16 batch rows (tl.dot's
smallest tile) keeps h (BLOCK_B × H) in registers and walks the time steps; H is padded to a power of two ≥ 16 with
masked loads (padded columns stay 0: their u, W entries and a are 0, d₀ is 1; padded rows get no gradient).
H ≤ 128: Triton stages W (H × H) in shared memory, 64 KiB at H = 128 in float32 (the backward ~110 KiB in all);
at H = 256 float32 the forward alone needs 272 KiB, more than an H100/H200 has per block.

Backward (`liquid_triton_autograd`): with g = ∂ℓ/∂h' for one unfold h' = n / d (n = h + a ⊙ f, d = d₀ + Δt f),

    ∂n = g / d,   ∂d = −∂n ⊙ h',   ∂z = (∂n ⊙ a + Δt ∂d) ⊙ f (1 − f),   ∂h = ∂n + ∂z Wᵀ,
    ∂u_t += ∂z,   ∂W += hᵀ ∂z,   ∂a += Σ_b ∂n ⊙ f,   ∂d₀ += Σ_b ∂d.

The forward saves only its outputs h_1 … h_L (the module's output); the backward walks time in reverse, recomputes
step t's unfolds from h_{t−1} (storing each unfold's h and f in a small per-program scratch buffer, BLOCK_B × H per
unfold) and back-propagates through them. ∂W, ∂a, ∂d₀ accumulate per program in float32 registers and are written
as per-program partials that torch sums: deterministic, no atomics.

Precision: the state, u, every elementwise op and every accumulation are float32 whatever the input dtype (the
torch path computes in float32 for bfloat16/float16 inputs too). The products h W, ∂z Wᵀ, hᵀ ∂z are exact float32
dots (`input_precision="ieee"`: no TF32); under `torch.autocast` their operands are rounded to the autocast dtype
(float32 accumulation, tensor cores), as autocast does for the torch path's `addmm`. Tolerances against the float64
reference: float32 1e-5 per step (model tolerance 1e-4 over long L), bfloat16 5e-2 (model tolerance).

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors (tests call `liquid_triton_autograd` directly);
`compile_for_gpu` compiles both for sm_90 without a GPU. On an H200 (B=32, L=1024, H=128, 2 unfolds) forward +
backward take 73 ms against the torch loop's 888 ms, in float32 and under bf16 autocast alike (latency-bound: 2
programs walk 1,024 steps); `num_warps` is still chosen from the sm_90 compile (registers, spills), see
`_num_warps`, not from a sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK_B", "compile_for_gpu", "liquid_triton_autograd", "liquid_triton_backward",
           "liquid_triton_forward"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations

BLOCK_B = 16  # batch rows per program: tl.dot's smallest tile; more rows would only mean fewer programs
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@_jit
def _liquid_fwd(u_ptr, h0_ptr, w_ptr, a_ptr, d0_ptr, out_ptr,  # type: ignore[no-untyped-def]
                B, L, H, sw_k, sw_n, delta,
                UNFOLDS: tl.constexpr, HAS_H0: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    # float32 whatever the launcher passes (under torch.compile inductor hands Python floats over as float64)
    delta = tl.cast(delta, tl.float32)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # this program's batch rows
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = (offs_b < B)[:, None] & mask_h[None, :]
    a = tl.load(a_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]  # Δt·A (1, BLOCK_H)
    d0 = tl.load(d0_ptr + offs_h, mask=mask_h, other=1.0).to(tl.float32)[None, :]  # 1 + Δt/τ
    w = tl.load(w_ptr + offs_h[:, None] * sw_k + offs_h[None, :] * sw_n, mask=mask_h[:, None] & mask_h[None, :],
                other=0.0).to(DOT_DTYPE)  # W = W_recᵀ (BLOCK_H, BLOCK_H)
    seq = offs_b.to(tl.int64)[:, None] * L * H + offs_h[None, :]  # into (B, L, H) at t = 0
    if HAS_H0:
        h = tl.load(h0_ptr + offs_b[:, None] * H + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for t in range(L):
        u_t = tl.load(u_ptr + seq + t * H, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_H)
        for _ in range(UNFOLDS):
            f = tl.sigmoid(tl.dot(h.to(DOT_DTYPE), w, acc=u_t, input_precision=PRECISION))
            h = (h + a * f) / (d0 + delta * f)
        tl.store(out_ptr + seq + t * H, h, mask=mask)


@_jit
def _step_bwd(u_ptr, gout_ptr, du_ptr, scratch, seq, mask, t, h, g, dw, da, dd0, w, a, d0,  # type: ignore[no-untyped-def]
              H, delta, UNFOLDS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Back-propagate through step t from its input state h = h_{t−1}: returns ∂ℓ/∂h_{t−1} and the accumulators."""
    g += tl.load(gout_ptr + seq + t * H, mask=mask, other=0.0).to(tl.float32)  # ∂ℓ/∂h_t
    u_t = tl.load(u_ptr + seq + t * H, mask=mask, other=0.0).to(tl.float32)
    for j in range(UNFOLDS):  # recompute step t, keeping each unfold's input h and its f
        f = tl.sigmoid(tl.dot(h.to(DOT_DTYPE), w, acc=u_t, input_precision=PRECISION))
        tl.store(scratch + j * 2 * BLOCK_B * BLOCK_H, h)
        tl.store(scratch + (j * 2 + 1) * BLOCK_B * BLOCK_H, f)
        h = (h + a * f) / (d0 + delta * f)
    tl.debug_barrier()  # the scratch is written and read in different layouts
    du = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for i in range(UNFOLDS):
        j = UNFOLDS - 1 - i
        h = tl.load(scratch + j * 2 * BLOCK_B * BLOCK_H)
        f = tl.load(scratch + (j * 2 + 1) * BLOCK_B * BLOCK_H)
        d = d0 + delta * f
        h_next = (h + a * f) / d
        dn = g / d
        dd = -dn * h_next
        dz = (dn * a + delta * dd) * f * (1.0 - f)  # 0 on padded rows and columns: their g is 0
        du += dz
        da += tl.sum(dn * f, axis=0)
        dd0 += tl.sum(dd, axis=0)
        dz_d = dz.to(DOT_DTYPE)
        dw = tl.dot(tl.trans(h.to(DOT_DTYPE)), dz_d, acc=dw, input_precision=PRECISION)
        g = tl.dot(dz_d, tl.trans(w), acc=dn, input_precision=PRECISION)
    tl.debug_barrier()  # the next step overwrites the scratch
    tl.store(du_ptr + seq + t * H, du, mask=mask)
    return g, dw, da, dd0


@_jit
def _liquid_bwd(u_ptr, h0_ptr, w_ptr, a_ptr, d0_ptr, out_ptr, gout_ptr, scratch_ptr,  # type: ignore[no-untyped-def]
                du_ptr, dh0_ptr, dw_ptr, da_ptr, dd0_ptr, B, L, H, sw_k, sw_n, delta,
                UNFOLDS: tl.constexpr, HAS_H0: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    delta = tl.cast(delta, tl.float32)  # see _liquid_fwd
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = (offs_b < B)[:, None] & mask_h[None, :]
    mask_w = mask_h[:, None] & mask_h[None, :]
    a = tl.load(a_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    d0 = tl.load(d0_ptr + offs_h, mask=mask_h, other=1.0).to(tl.float32)[None, :]
    w = tl.load(w_ptr + offs_h[:, None] * sw_k + offs_h[None, :] * sw_n, mask=mask_w, other=0.0).to(DOT_DTYPE)
    seq = offs_b.to(tl.int64)[:, None] * L * H + offs_h[None, :]
    # this program's scratch: per unfold, h and f (BLOCK_B, BLOCK_H), unpadded offsets need no mask
    tile = tl.arange(0, BLOCK_B)[:, None] * BLOCK_H + offs_h[None, :]
    scratch = scratch_ptr + pid.to(tl.int64) * UNFOLDS * 2 * BLOCK_B * BLOCK_H + tile
    g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)  # ∂ℓ/∂h_t carried from step t + 1
    dw = tl.zeros([BLOCK_H, BLOCK_H], dtype=tl.float32)
    da = tl.zeros([BLOCK_H], dtype=tl.float32)
    dd0 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for step in range(L - 1):  # t = L − 1 … 1 start from the saved h_{t−1}; t = 0 from h0
        t = L - 1 - step
        h = tl.load(out_ptr + seq + (t - 1) * H, mask=mask, other=0.0)
        g, dw, da, dd0 = _step_bwd(u_ptr, gout_ptr, du_ptr, scratch, seq, mask, t, h, g, dw, da, dd0, w, a, d0,
                                   H, delta, UNFOLDS, DOT_DTYPE, PRECISION, BLOCK_B, BLOCK_H)
    if HAS_H0:
        h = tl.load(h0_ptr + offs_b[:, None] * H + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    g, dw, da, dd0 = _step_bwd(u_ptr, gout_ptr, du_ptr, scratch, seq, mask, 0, h, g, dw, da, dd0, w, a, d0, H,
                               delta, UNFOLDS, DOT_DTYPE, PRECISION, BLOCK_B, BLOCK_H)
    if HAS_H0:
        tl.store(dh0_ptr + offs_b[:, None] * H + offs_h[None, :], g, mask=mask)
    part = pid.to(tl.int64) * H
    tl.store(dw_ptr + part * H + offs_h[:, None] * H + offs_h[None, :], dw, mask=mask_w)
    tl.store(da_ptr + part + offs_h, da, mask=mask_h)
    tl.store(dd0_ptr + part + offs_h, dd0, mask=mask_h)


def _config(H: int, dot_dtype: torch.dtype) -> dict[str, Any]:
    """Launch constants shared by both kernels and `compile_for_gpu`."""
    return {"DOT_DTYPE": _DOT_DTYPES[dot_dtype], "PRECISION": "ieee" if dot_dtype == torch.float32 else "tf32",
            "BLOCK_B": BLOCK_B, "BLOCK_H": max(16, triton.next_power_of_2(H))}


def _num_warps(H: int, backward: bool, dot_dtype: torch.dtype) -> int:
    """4 warps up to H = 64; at H = 128, 8 (the float32 backward 16: its ∂W accumulator, 128 × 128 float32, and the
    FMA dots' operands spill at 8 warps; sm_90 compile: 128 registers, ~120 bytes of spill at 16)."""
    if max(16, triton.next_power_of_2(H)) <= 64:
        return 4
    return 16 if backward and dot_dtype == torch.float32 else 8


def liquid_triton_forward(u: Tensor, h0: Tensor | None, w_rec_t: Tensor, dt_a: Tensor, denom0: Tensor,
                          delta: float, unfolds: int, dot_dtype: torch.dtype = torch.float32, *,
                          num_warps: int | None = None) -> Tensor:
    """Forward only: the states h_1 … h_L (B, L, H), float32, from u (B, L, H), h0 (B, H) or None (zeros),
    W = W_recᵀ (H, H), Δt·A and 1 + Δt/τ (H,). `dot_dtype`: the dots' operand dtype (see the module docstring);
    `num_warps` overrides `_num_warps` (for tuning)."""
    B, L, H = u.shape
    u = u.contiguous()
    out = torch.empty(B, L, H, dtype=torch.float32, device=u.device)
    h0_arg = h0.contiguous() if h0 is not None else out
    _liquid_fwd[(triton.cdiv(B, BLOCK_B),)](
        u, h0_arg, w_rec_t, dt_a.contiguous(), denom0.contiguous(), out, B, L, H, *w_rec_t.stride(), float(delta),
        UNFOLDS=unfolds, HAS_H0=h0 is not None, **_config(H, dot_dtype),
        num_warps=num_warps or _num_warps(H, False, dot_dtype))
    return out


def liquid_triton_backward(grad_out: Tensor, u: Tensor, h0: Tensor | None, w_rec_t: Tensor, dt_a: Tensor,
                           denom0: Tensor, out: Tensor, delta: float, unfolds: int,
                           dot_dtype: torch.dtype = torch.float32, *,
                           num_warps: int | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Gradients (∂u (B, L, H), ∂h0 (B, H) or None, ∂W (H, H), ∂(Δt·A), ∂(1 + Δt/τ) (H,)), float32, of
    ⟨grad_out, states⟩ where `out` are the forward's states."""
    B, L, H = u.shape
    programs = triton.cdiv(B, BLOCK_B)
    config = _config(H, dot_dtype)
    scratch = u.new_empty(programs, unfolds, 2, BLOCK_B, config["BLOCK_H"], dtype=torch.float32)
    du = u.new_empty(B, L, H, dtype=torch.float32)
    dh0 = u.new_empty(B, H, dtype=torch.float32) if h0 is not None else None
    dw = u.new_empty(programs, H, H, dtype=torch.float32)
    da = u.new_empty(programs, H, dtype=torch.float32)
    dd0 = u.new_empty(programs, H, dtype=torch.float32)
    h0_arg = h0.contiguous() if h0 is not None else out
    _liquid_bwd[(programs,)](
        u.contiguous(), h0_arg, w_rec_t, dt_a.contiguous(), denom0.contiguous(), out, grad_out.contiguous(),
        scratch, du, dh0 if dh0 is not None else du, dw, da, dd0, B, L, H, *w_rec_t.stride(), float(delta),
        UNFOLDS=unfolds, HAS_H0=h0 is not None, **config, num_warps=num_warps or _num_warps(H, True, dot_dtype))
    return du, dh0, dw.sum(0), da.sum(0), dd0.sum(0)


class _TritonLiquid(torch.autograd.Function):
    """Forward and backward by the kernels; saves u, h0, the parameters' terms and the output states."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, h0: Tensor | None, w_rec_t: Tensor, dt_a: Tensor, denom0: Tensor,
                delta: float, unfolds: int, dot_dtype: torch.dtype) -> Tensor:
        out = liquid_triton_forward(u, h0, w_rec_t, dt_a, denom0, delta, unfolds, dot_dtype)
        ctx.save_for_backward(u, h0, w_rec_t, dt_a, denom0, out)
        ctx.delta, ctx.unfolds, ctx.dot_dtype = delta, unfolds, dot_dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        u, h0, w_rec_t, dt_a, denom0, out = ctx.saved_tensors
        du, dh0, dw, da, dd0 = liquid_triton_backward(grad_out, u, h0, w_rec_t, dt_a, denom0, out, ctx.delta,
                                                      ctx.unfolds, ctx.dot_dtype)
        return (du.to(u.dtype), dh0.to(h0.dtype) if dh0 is not None else None, dw.to(w_rec_t.dtype),
                da.to(dt_a.dtype), dd0.to(denom0.dtype), None, None, None)


def liquid_triton_autograd(u: Tensor, h0: Tensor | None, w_rec_t: Tensor, dt_a: Tensor, denom0: Tensor,
                           delta: float, unfolds: int) -> Tensor:
    """The states h_1 … h_L (B, L, H), float32, of `unfolds` fused steps per input from h0 (None: zeros), with
    gradients for u, h0, w_rec_t, dt_a and denom0 (see the module docstring). Under `torch.autocast` on u's device
    the dots take operands in the autocast dtype; otherwise exact float32."""
    device = u.device.type
    dot_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    apply = cast(Callable[..., Tensor], _TritonLiquid.apply)
    return apply(u, h0, w_rec_t, dt_a, denom0, float(delta), int(unfolds), dot_dtype)


def compile_for_gpu(capability: int = 90, dot_dtype: str = "fp32", *, hidden: int = 128, unfolds: int = 2,
                    backward: bool = False, num_warps: int | None = None) -> Any:
    """Compile `_liquid_fwd` (or `_liquid_bwd`) ahead of time for CUDA compute capability `capability` (90: H100)
    with dot operands in `dot_dtype` ("fp32", "bf16", "fp16"), without a GPU (Triton's frontend, its passes and
    ptxas run on the CPU): the check `TRITON_INTERPRET=1` cannot make, so it must run in a process without that
    variable. Returns Triton's compiled kernel (its `n_regs` and `n_spills` tell the register pressure)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dot_dtype]
    kernel = _liquid_bwd if backward else _liquid_fwd
    names: list[str] = kernel.arg_names
    # as a launch specialises them: W's unit stride is a constant, pointers and the other ints 16-divisible
    constexprs = {"sw_n": 1, "UNFOLDS": unfolds, "HAS_H0": True, **_config(hidden, torch_dtype)}
    signature = {name: "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr")
                 else "fp32" if name == "delta" else "i32" for name in names}
    aligned = [name for name in names if name not in constexprs and name not in ("B", "L", "delta")]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    warps = num_warps if num_warps is not None else _num_warps(hidden, backward, torch_dtype)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
