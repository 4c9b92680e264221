"""Liquid time-constant (LTC) recurrent cell, literally. Spec: specs/emma.md ([EMMA-1] … [EMMA-3]).

    dh/dt = −[1/τ + f(h, x)] ⊙ h + f(h, x) ⊙ A,        f(h, x) = σ(W_in x + W_rec h + b)

discretised by the fused semi-implicit Euler step of Hasani et al. (2021), unrolled `ode_unfolds` times per
input with Δt = dt / ode_unfolds:

    h ← (h + Δt · f(h, x) ⊙ A) / (1 + Δt · (1/τ + f(h, x)))

The reference recomputes every term inside the loops over time and unfolds; `optimized/liquid.py` hoists the input
projection out of both loops (same parameters, by subclassing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.validation import ConfigError, ShapeError, check_floating, check_rank

__all__ = ["TAU_MIN", "LiquidCell"]

TAU_MIN = 0.01  # τ = TAU_MIN + softplus(τ_raw): a strictly positive time constant [EMMA-1]


class LiquidCell(nn.Module):
    """[EMMA-1] [EMMA-2] [EMMA-3] LTC cell: x (B, L, input_dim) → states (B, L, hidden_dim), last state (B, hidden_dim).

    Parameters: `w_in` (hidden, input) with bias b, `w_rec` (hidden, hidden), `tau_raw` (hidden,) with
    τ = 0.01 + softplus(τ_raw) (initialised to τ = 1), reversal potentials `A` (hidden,) ~ U(−1, 1).
    All drawn from `seed` (never the global RNG).
    """

    def __init__(self, input_dim: int, hidden_dim: int, *, ode_unfolds: int = 6, dt: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("ode_unfolds", ode_unfolds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LiquidCell: {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ConfigError(f"LiquidCell: dt must be a finite number > 0, got {dt!r}")
        self.input_dim, self.hidden_dim, self.ode_unfolds, self.dt = input_dim, hidden_dim, ode_unfolds, float(dt)
        g = torch.Generator().manual_seed(seed)
        self.w_in = nn.Linear(input_dim, hidden_dim)
        self.w_rec = nn.Linear(hidden_dim, hidden_dim, bias=False)
        with torch.no_grad():
            bound_in, bound_rec = input_dim ** -0.5, hidden_dim ** -0.5
            self.w_in.weight.copy_((torch.rand(hidden_dim, input_dim, generator=g) * 2 - 1) * bound_in)
            self.w_in.bias.copy_((torch.rand(hidden_dim, generator=g) * 2 - 1) * bound_in)
            self.w_rec.weight.copy_((torch.rand(hidden_dim, hidden_dim, generator=g) * 2 - 1) * bound_rec)
        # softplus⁻¹(1 − TAU_MIN), so that τ = 1 at initialisation
        self.tau_raw = nn.Parameter(torch.full((hidden_dim,), math.log(math.expm1(1.0 - TAU_MIN))))
        self.A = nn.Parameter(torch.rand(hidden_dim, generator=g) * 2 - 1)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, ode_unfolds={self.ode_unfolds}, "
                f"dt={self.dt}")

    def tau(self) -> Tensor:
        """[EMMA-1] τ = TAU_MIN + softplus(τ_raw) > 0, (hidden,)."""
        return TAU_MIN + F.softplus(self.tau_raw)

    def f(self, x_t: Tensor, h: Tensor) -> Tensor:
        """[EMMA-1] The synaptic activation f(h, x) = σ(W_in x + b + W_rec h) ∈ (0, 1), (B, hidden)."""
        return torch.sigmoid(self.w_in(x_t) + self.w_rec(h))

    def step(self, x_t: Tensor, h: Tensor) -> Tensor:
        """[EMMA-2] One input step: `ode_unfolds` fused semi-implicit Euler steps with Δt = dt / ode_unfolds.
        x_t (B, input_dim), h (B, hidden) → h (B, hidden)."""
        delta = self.dt / self.ode_unfolds
        tau = self.tau()  # (hidden,)
        for _ in range(self.ode_unfolds):
            f = self.f(x_t, h)  # (B, hidden)
            h = (h + delta * f * self.A) / (1 + delta * (1 / tau + f))
        return h

    def check_input(self, x: Tensor, h0: Tensor | None, fn: str) -> None:
        check_floating(x, "x", fn=fn)
        check_rank(x, "x", 3, fn=fn, layout="(batch, seq_len, input_dim)")
        if x.shape[-1] != self.input_dim:
            raise ShapeError(f"{fn}: x must have shape (B, L, input_dim={self.input_dim}), got {tuple(x.shape)}")
        if h0 is not None:
            check_floating(h0, "h0", fn=fn)
        if h0 is not None and tuple(h0.shape) != (x.shape[0], self.hidden_dim):
            raise ShapeError(f"{fn}: h0 must have shape (B={x.shape[0]}, hidden_dim={self.hidden_dim}), "
                             f"got {tuple(h0.shape)}")

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[EMMA-3] The recurrence over time from h0 (default 0): states h_1 … h_L (B, L, hidden), last (B, hidden)."""
        self.check_input(x, h0, "LiquidCell.forward")
        h = x.new_zeros(x.shape[0], self.hidden_dim) if h0 is None else h0  # (B, hidden)
        states: list[Tensor] = []
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h)
            states.append(h)
        if not states:
            return x.new_zeros(x.shape[0], 0, self.hidden_dim), h
        return torch.stack(states, dim=1), h
