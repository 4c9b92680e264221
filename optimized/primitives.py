"""Shared primitives, fast: the API of `reference/primitives.py` with fused torch ops.

Tolerances against the float64 reference (tests/tolerances.py): float64 1e-10, float32 1e-5 relative,
bfloat16 1e-2. Under float16/bfloat16 inputs the reductions and rotations run in float32 and the result is
cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference import primitives as ref
from reference.primitives import (
    rotary_angle_dtype,
    validate_apply_rotary,
    validate_conv,
    validate_conv_step,
    validate_rms_norm,
    validate_rotary_sizes,
    validate_swiglu,
)

__all__ = [
    "CausalDepthwiseConv1d",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "causal_depthwise_conv1d",
    "causal_depthwise_conv1d_step",
    "rms_norm",
    "rotary_cos_sin",
    "swiglu",
]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (accumulate in fp32), the input dtype otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """Implements `reference.primitives.rms_norm` with `F.rms_norm` (one fused reduction), fp32 under half inputs."""
    validate_rms_norm(x, weight, eps, "rms_norm")
    work = _compute_dtype(x.dtype)
    w = None if weight is None else weight.to(work)
    return F.rms_norm(x.to(work), (x.shape[-1],), w, eps).to(x.dtype)


class RMSNorm(ref.RMSNorm):
    """`reference.primitives.RMSNorm` whose forward runs the fused `rms_norm` above."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Implements `reference.primitives.swiglu` with `F.linear` and `F.silu` (BLAS matmuls, fused activation)."""
    validate_swiglu(x, w_gate, w_up, w_down, "swiglu")
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class SwiGLU(ref.SwiGLU):
    """`reference.primitives.SwiGLU` whose forward runs the fused `swiglu` above."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w_gate.weight, self.w_up.weight, self.w_down.weight)


def rotary_cos_sin(seq_len: int, head_dim: int, *, base: float = 10000.0, offset: int = 0,
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Implements `reference.primitives.rotary_cos_sin`: one outer product and one sincos, angles in float64
    (float32 on MPS) so positions are exact; results cast to `dtype`. Same numbers as the reference."""
    validate_rotary_sizes(seq_len, head_dim, base, offset, "rotary_cos_sin")
    work = rotary_angle_dtype(device)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=work, device=device) / head_dim)  # (Dh/2,)
    positions = torch.arange(offset, offset + seq_len, dtype=work, device=device)  # (L,)
    angles = torch.outer(positions, inv_freq)  # (L, Dh/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Implements `reference.primitives.apply_rotary` on whole halves at once (rotate-half layout):
    `[x1·cos − x2·sin, x1·sin + x2·cos]`; fp32 under half inputs."""
    validate_apply_rotary(x, cos, sin, "apply_rotary")
    work = _compute_dtype(x.dtype)
    xw, c, s = x.to(work), cos.to(work), sin.to(work)
    x1, x2 = xw.chunk(2, dim=-1)  # (B, H, L, Dh/2) each
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Implements `reference.primitives.causal_depthwise_conv1d` with one grouped `F.conv1d` over a left-padded
    (B, D, L) view (cuDNN / oneDNN depthwise kernel). Tolerances: float64 1e-10, float32 1e-5, bf16 1e-2."""
    validate_conv(x, weight, bias, "causal_depthwise_conv1d")
    if x.shape[1] == 0:  # F.conv1d refuses an input shorter than the kernel
        return x.new_zeros(x.shape)
    taps = weight.shape[1]
    x_cl = F.pad(x.transpose(1, 2), (taps - 1, 0))  # (B, D, K − 1 + L)
    y = F.conv1d(x_cl, weight[:, None, :], bias, groups=x.shape[2])  # (B, D, L)
    return y.transpose(1, 2)  # (B, L, D)


def causal_depthwise_conv1d_step(conv_state: Tensor, x_t: Tensor, weight: Tensor,
                                 bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Implements `reference.primitives.causal_depthwise_conv1d_step`: roll the window, one fused multiply-sum
    (an `einsum` over the taps). Same tolerances as the full conv."""
    validate_conv_step(conv_state, x_t, weight, bias, "causal_depthwise_conv1d_step")
    new_state = torch.cat([conv_state[:, :, 1:], x_t[:, :, None]], dim=2)  # (B, D, K)
    y_t = torch.einsum("bdk,dk->bd", new_state, weight)  # (B, D)
    if bias is not None:
        y_t = y_t + bias
    return y_t, new_state


class CausalDepthwiseConv1d(ref.CausalDepthwiseConv1d):
    """`reference.primitives.CausalDepthwiseConv1d` whose forward and step run the fused functions above."""

    def forward(self, x: Tensor) -> Tensor:
        return causal_depthwise_conv1d(x, self.taps(), self.conv.bias)

    def step(self, conv_state: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        return causal_depthwise_conv1d_step(conv_state, x_t, self.taps(), self.conv.bias)
