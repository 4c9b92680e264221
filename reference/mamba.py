"""The Mamba block and a residual stack of them (Gu & Dao, 2023), literally; math in `specs/ssm.md`.

Parameter names follow mamba-ssm's `Mamba` (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`),
except that the depthwise conv lives in `conv1d.conv` (the shared `CausalDepthwiseConv1d`). Class attributes
`scan`, `scan_step` and `conv_class` are the hot path `optimized/mamba.py` swaps; parameters are defined once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.primitives import CausalDepthwiseConv1d, RMSNorm, causal_depthwise_conv1d_step
from reference.ssm import selective_scan, selective_scan_step
from reference.validation import ConfigError, ShapeError, check_floating, check_rank

__all__ = ["MambaBlock", "MambaStack", "MambaState"]


class MambaState(NamedTuple):
    """[SSM-12] A block's recurrent state: the last d_conv inputs of the conv (B, d_inner, d_conv) and the SSM
    state (B, d_inner, d_state)."""

    conv: Tensor
    ssm: Tensor


def _check_config(d_model: int, d_state: int, d_conv: int, expand: int, n_layers: int = 1) -> None:
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                        ("n_layers", n_layers)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"Mamba: {name} must be an integer >= 1, got {value!r}")


class MambaBlock(nn.Module):
    """[SSM-8] [SSM-9] [SSM-10] The Mamba block on (B, L, d_model) -> (B, L, d_model)."""

    scan = staticmethod(selective_scan)
    scan_step = staticmethod(selective_scan_step)
    conv_step = staticmethod(causal_depthwise_conv1d_step)
    conv_class: type[CausalDepthwiseConv1d] = CausalDepthwiseConv1d

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, *,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        _check_config(d_model, d_state, d_conv, expand)
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"MambaBlock: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = self.conv_class(self.d_inner, d_conv, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # [SSM-10] dt_proj: weight U(±dt_rank^-1/2); bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max].
        with torch.no_grad():
            bound = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp_min(dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        # [SSM-9] A = −exp(A_log), A_log = log(1..N) in every channel (S4D-real); D = 1.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def _check(self, x: Tensor, rank: int, layout: str) -> None:
        check_floating(x, "x", fn="MambaBlock")
        check_rank(x, "x", rank, fn="MambaBlock", layout=layout)
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"MambaBlock: x.shape[-1] must be d_model = {self.d_model}, got shape {tuple(x.shape)}")

    def _ssm_inputs(self, x_conv: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[SSM-8] x_proj then dt_proj (without its bias, which the scan adds as delta_bias): (Δ, B, C, A)."""
        x_dbl = self.x_proj(x_conv)  # (..., dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # (..., d_inner)
        A = -torch.exp(self.A_log)  # [SSM-9] (d_inner, N)
        return delta, B, C, A

    def forward(self, x: Tensor) -> Tensor:
        """[SSM-8] x (B, L, d_model) -> (B, L, d_model)."""
        return self.forward_with_state(x)[0]

    def forward_with_state(self, x: Tensor) -> tuple[Tensor, MambaState]:
        """[SSM-8] [SSM-12] The forward pass and the state after its last token (to continue with `step`)."""
        self._check(x, 3, "(B, L, d_model)")
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, d_inner) each
        x_conv = F.silu(self.conv1d(x_in))  # (B, L, d_inner)
        delta, B, C, A = self._ssm_inputs(x_conv)  # (B, L, d_inner), (B, L, N), (B, L, N)
        y, ssm_state = self.scan(x_conv.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                 C.transpose(1, 2), self.D, z.transpose(1, 2), self.dt_proj.bias, True, True)
        tail = x_in[:, -self.d_conv:].transpose(1, 2)  # (B, d_inner, min(L, d_conv))
        conv_state = F.pad(tail, (self.d_conv - tail.shape[-1], 0))  # (B, d_inner, d_conv)
        return self.out_proj(y.transpose(1, 2)), MambaState(conv_state, ssm_state.to(x.dtype))

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> MambaState:
        """[SSM-12] The state before the first token: zeros."""
        dtype = dtype or self.A_log.dtype
        device = device or self.A_log.device
        return MambaState(torch.zeros(batch_size, self.d_inner, self.d_conv, dtype=dtype, device=device),
                          torch.zeros(batch_size, self.d_inner, self.d_state, dtype=dtype, device=device))

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """[SSM-12] One token for recurrent inference: x_t (B, d_model) -> (y_t (B, d_model), new state)."""
        self._check(x_t, 2, "(B, d_model)")
        x_in, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, d_inner) each
        conv_out, conv_state = self.conv_step(state.conv, x_in, self.conv1d.taps(), self.conv1d.conv.bias)
        x_conv = F.silu(conv_out)  # (B, d_inner)
        delta, B, C, A = self._ssm_inputs(x_conv)  # (B, d_inner), (B, N), (B, N)
        y, ssm_state = self.scan_step(state.ssm, x_conv, delta, A, B[:, None], C[:, None], self.D, z,
                                      self.dt_proj.bias, True)
        return self.out_proj(y), MambaState(conv_state, ssm_state.to(x_t.dtype))


class MambaStack(nn.Module):
    """[SSM-11] n_layers residual Mamba blocks with pre-RMSNorm and a final RMSNorm: (B, L, d) -> (B, L, d)."""

    block_class: type[MambaBlock] = MambaBlock
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, n_layers: int = 2, expand: int = 2) -> None:
        super().__init__()
        _check_config(d_model, d_state, d_conv, expand, n_layers)
        self.layers = nn.ModuleList([self.block_class(d_model, d_state, d_conv, expand) for _ in range(n_layers)])
        self.norms = nn.ModuleList([self.norm_class(d_model) for _ in range(n_layers)])
        self.final_norm = self.norm_class(d_model)

    def blocks(self) -> list[MambaBlock]:
        """The layers, typed."""
        return [block for block in self.layers if isinstance(block, MambaBlock)]

    def forward(self, x: Tensor) -> Tensor:
        """[SSM-11] x_{l+1} = x_l + Mamba_l(RMSNorm_l(x_l)); output RMSNorm(x_n)."""
        return self.forward_with_state(x)[0]

    def forward_with_state(self, x: Tensor) -> tuple[Tensor, list[MambaState]]:
        """[SSM-11] [SSM-12] The forward pass and every layer's state after the last token."""
        states: list[MambaState] = []
        for block, norm in zip(self.blocks(), self.norms, strict=True):
            out, state = block.forward_with_state(norm(x))
            x = x + out
            states.append(state)
        return self.final_norm(x), states

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> list[MambaState]:
        """[SSM-12] Every layer's zero state."""
        return [block.init_state(batch_size, dtype=dtype, device=device) for block in self.blocks()]

    def step(self, x_t: Tensor, states: list[MambaState]) -> tuple[Tensor, list[MambaState]]:
        """[SSM-12] One token through every layer: x_t (B, d_model) -> (y_t (B, d_model), new states)."""
        if len(states) != len(self.layers):
            raise ShapeError(f"MambaStack.step: states must hold one MambaState per layer ({len(self.layers)}), "
                             f"got {len(states)}")
        new_states: list[MambaState] = []
        for block, norm, state in zip(self.blocks(), self.norms, states, strict=True):
            out, new_state = block.step(norm(x_t), state)
            x_t = x_t + out
            new_states.append(new_state)
        return self.final_norm(x_t), new_states
