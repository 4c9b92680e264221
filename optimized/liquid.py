"""Liquid time-constant cell, fast path.

Implements `reference.liquid.LiquidCell.forward` (subclass: same parameters and state_dict keys). Method: the input
projection W_in x + b of all L steps is one (B·L, I)×(I, H) matmul hoisted out of the time and unfold loops;
Δt·A and Δt/τ are computed once; each unfold is one fused `addmm` (u_t + h W_recᵀ), a sigmoid and three
elementwise ops, with the denominator's reciprocal fused into one `addcmul`. The loop over time (× unfolds) is
inherent to the nonlinear recurrence; there are no per-feature loops, host syncs or data-dependent branches, so
`torch.compile` captures it whole (the unrolled graph grows with L; compile the step, or the model at small L).
Accumulates in fp32 under bf16/fp16 inputs. Tolerance vs the float64 reference: float64 1e-10, float32 1e-5
relative per step (model tolerances over long L), bf16 5e-2.

Dispatch (`liquid_dispatch` names the branch; `scripts/bench.py` reports it): on CUDA, for float32/bfloat16/float16
inputs with hidden_dim ≤ 128 and Triton importable, the whole loop over time × unfolds runs in one Triton launch
forward and one backward (`optimized.kernels.liquid`: same math, float32 state, exact float32 dots; under autocast
the recurrent dots take autocast-dtype operands as `addmm` would); `MEMARCH_DISABLE_KERNELS=liquid` sends it to
the torch loop above, which CPU tensors always take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.kernels import kernel_available
from reference.liquid import TAU_MIN
from reference.liquid import LiquidCell as ReferenceLiquidCell

__all__ = ["TAU_MIN", "LiquidCell", "liquid_dispatch", "ltc_unfolds"]

_HALF = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_HIDDEN = 128  # the kernel stages W (H × H) in shared memory: at H = 256 float32 it needs 272 KiB


def liquid_dispatch(x: Tensor, hidden_dim: int) -> str:
    """The branch `LiquidCell.forward` takes for inputs like `x` (B, L, input_dim): "triton" (CUDA, Triton importable,
    float32/float16/bfloat16, hidden_dim ≤ 128, L ≥ 1) or "torch" (the loop over time × unfolds)."""
    if (kernel_available(x, "liquid") and x.dtype in _KERNEL_DTYPES and hidden_dim <= KERNEL_MAX_HIDDEN
            and x.shape[1] > 0):
        return "triton"
    return "torch"


def ltc_unfolds(u_t: Tensor, h: Tensor, w_rec_t: Tensor, dt_a: Tensor, denom0: Tensor, delta: float,
                unfolds: int) -> Tensor:
    """[EMMA-2] `unfolds` fused semi-implicit steps from h (B, H) with the hoisted input term u_t (B, H):
    f = σ(u_t + h W_recᵀ); h = (h + Δt·A ⊙ f) / (1 + Δt/τ + Δt·f). `w_rec_t` = W_recᵀ (H, H), `dt_a` = Δt·A,
    `denom0` = 1 + Δt/τ (H,)."""
    for _ in range(unfolds):
        f = torch.sigmoid(torch.addmm(u_t, h, w_rec_t))  # (B, H)
        h = torch.addcmul(h, dt_a, f) / torch.add(denom0, f, alpha=delta)
    return h


class LiquidCell(ReferenceLiquidCell):
    """`reference.liquid.LiquidCell` with the input projection hoisted and the unfold fused (see module doc)."""

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input(x, h0, "LiquidCell.forward")
        out_dtype = x.dtype
        work = torch.float32 if out_dtype in _HALF else out_dtype
        B = x.shape[0]
        w_in = self.w_in.weight.to(work)
        u = F.linear(x.to(work), w_in, self.w_in.bias.to(work))  # W_in x + b for every step, (B, L, H)
        delta = self.dt / self.ode_unfolds
        tau = TAU_MIN + F.softplus(self.tau_raw.to(work))  # (H,)
        dt_a = delta * self.A.to(work)  # (H,)
        denom0 = 1 + delta / tau  # (H,)
        w_rec_t = self.w_rec.weight.to(work).t()  # (H, H)
        if liquid_dispatch(x, self.hidden_dim) == "triton":
            from optimized.kernels.liquid import liquid_triton_autograd

            out = liquid_triton_autograd(u, None if h0 is None else h0.to(work), w_rec_t, dt_a, denom0, delta,
                                         self.ode_unfolds)  # (B, L, H) float32
            return out.to(out_dtype), out[:, -1].to(out_dtype)
        h = x.new_zeros(B, self.hidden_dim, dtype=work) if h0 is None else h0.to(work)
        states: list[Tensor] = []
        for u_t in u.unbind(1):  # one unbind, not L selects (whose backward zero-fills (B, L, H) per step)
            h = ltc_unfolds(u_t, h, w_rec_t, dt_a, denom0, delta, self.ode_unfolds)
            states.append(h)
        if not states:
            return x.new_zeros(B, 0, self.hidden_dim), h.to(out_dtype)
        return torch.stack(states, dim=1).to(out_dtype), h.to(out_dtype)
