"""Shared primitives, literally: RMSNorm, SwiGLU, rotary embeddings, causal depthwise conv1d.

The math lives in `specs/primitives.md`; each function names its equation IDs. Loops run over time and taps
where the spec states a sum over them; nothing here is fused or in place, and every function works in
float64. The argument checks (`validate_*`) are shared with `optimized/primitives.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.validation import MemarchError, ShapeError, check_floating, check_positive, check_rank, check_size

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


# ---------------------------------------------------------------------------------------------- checks

def validate_rms_norm(x: Tensor, weight: Tensor | None, eps: float, fn: str) -> None:
    check_floating(x, "x", fn=fn)
    if x.ndim < 1:
        raise ShapeError(f"{fn}: x must have at least 1 dimension (..., D), got a 0-dim tensor")
    if weight is not None:
        check_rank(weight, "weight", 1, fn=fn, layout="(D,)")
        check_size(weight, "weight", 0, x.shape[-1], fn=fn, what="D, the last dim of x")
    check_positive(eps, "eps", fn=fn, allow_zero=True)


def validate_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, fn: str) -> None:
    check_floating(x, "x", fn=fn)
    if x.ndim < 1:
        raise ShapeError(f"{fn}: x must have at least 1 dimension (..., D), got a 0-dim tensor")
    dim = x.shape[-1]
    check_rank(w_gate, "w_gate", 2, fn=fn, layout="(hidden_dim, D)")
    check_size(w_gate, "w_gate", 1, dim, fn=fn, what="D, the last dim of x")
    hidden = w_gate.shape[0]
    check_rank(w_up, "w_up", 2, fn=fn, layout="(hidden_dim, D)")
    if tuple(w_up.shape) != (hidden, dim):
        raise ShapeError(f"{fn}: w_up must have shape {(hidden, dim)} like w_gate, got {tuple(w_up.shape)}")
    check_rank(w_down, "w_down", 2, fn=fn, layout="(D, hidden_dim)")
    if tuple(w_down.shape) != (dim, hidden):
        raise ShapeError(f"{fn}: w_down must have shape {(dim, hidden)} (D, hidden_dim), "
                         f"got {tuple(w_down.shape)}")


def validate_rotary_sizes(seq_len: int, head_dim: int, base: float, offset: int, fn: str) -> None:
    if seq_len < 0:
        raise MemarchError(f"{fn}: seq_len must be >= 0, got {seq_len!r}")
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ShapeError(f"{fn}: head_dim must be a positive even number (rotary rotates pairs), got {head_dim!r}")
    check_positive(base, "base", fn=fn)
    if offset < 0:
        raise MemarchError(f"{fn}: offset must be >= 0, got {offset!r}")


def validate_apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, fn: str) -> None:
    check_floating(x, "x", fn=fn)
    check_rank(x, "x", 4, fn=fn, layout="(B, H, L, Dh)")
    length, head_dim = x.shape[2], x.shape[3]
    if head_dim % 2 != 0:
        raise ShapeError(f"{fn}: x.shape[3] (head_dim) must be even for rotary embeddings, got shape "
                         f"{tuple(x.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_floating(table, name, fn=fn)
        check_rank(table, name, (2, 3, 4), fn=fn, layout="(L, Dh/2), broadcastable against (B, H, L, Dh/2)")
        if tuple(table.shape[-2:]) != (length, head_dim // 2):
            raise ShapeError(f"{fn}: {name} must end in (L, Dh/2) = {(length, head_dim // 2)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(table.shape)}")
    if cos.shape != sin.shape:
        raise ShapeError(f"{fn}: cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")


def validate_conv(x: Tensor, weight: Tensor, bias: Tensor | None, fn: str) -> None:
    check_floating(x, "x", fn=fn)
    check_rank(x, "x", 3, fn=fn, layout="(B, L, D)")
    check_rank(weight, "weight", 2, fn=fn, layout="(D, K)")
    check_size(weight, "weight", 0, x.shape[2], fn=fn, what="D, the last dim of x")
    if weight.shape[1] < 1:
        raise ShapeError(f"{fn}: weight must have at least one tap (D, K >= 1), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_rank(bias, "bias", 1, fn=fn, layout="(D,)")
        check_size(bias, "bias", 0, x.shape[2], fn=fn, what="D, the last dim of x")


def validate_conv_step(conv_state: Tensor, x_t: Tensor, weight: Tensor, bias: Tensor | None, fn: str) -> None:
    check_floating(x_t, "x_t", fn=fn)
    check_rank(x_t, "x_t", 2, fn=fn, layout="(B, D)")
    check_rank(weight, "weight", 2, fn=fn, layout="(D, K)")
    check_size(weight, "weight", 0, x_t.shape[1], fn=fn, what="D, the last dim of x_t")
    check_rank(conv_state, "conv_state", 3, fn=fn, layout="(B, D, K)")
    want = (x_t.shape[0], x_t.shape[1], weight.shape[1])
    if tuple(conv_state.shape) != want:
        raise ShapeError(f"{fn}: conv_state must have shape (B, D, K) = {want}, got {tuple(conv_state.shape)}")
    if bias is not None:
        check_rank(bias, "bias", 1, fn=fn, layout="(D,)")
        check_size(bias, "bias", 0, x_t.shape[1], fn=fn, what="D, the last dim of x_t")


# ---------------------------------------------------------------------------------------------- RMSNorm

def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """[PRIM-1] RMS normalisation over the last dim, optionally scaled by `weight` (D,)."""
    validate_rms_norm(x, weight, eps, "rms_norm")
    mean_square = (x * x).mean(dim=-1, keepdim=True)  # (..., 1)
    y = x / torch.sqrt(mean_square + eps)  # (..., D)
    if weight is not None:
        y = y * weight
    return y


class RMSNorm(nn.Module):
    """[PRIM-1] RMSNorm with a learned gain `weight` (dim,), initialised to ones."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise MemarchError(f"RMSNorm: dim must be >= 1, got {dim!r}")
        check_positive(eps, "eps", fn="RMSNorm", allow_zero=True)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------- SwiGLU

def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """[PRIM-2] SwiGLU feed-forward with weight matrices in `nn.Linear` layout (out_features, in_features)."""
    validate_swiglu(x, w_gate, w_up, w_down, "swiglu")
    gate = x @ w_gate.T  # (..., hidden)
    up = x @ w_up.T  # (..., hidden)
    silu_gate = gate / (1 + torch.exp(-gate))  # SiLU(a) = a·σ(a)
    return (silu_gate * up) @ w_down.T  # (..., D)


class SwiGLU(nn.Module):
    """[PRIM-2] SwiGLU block: `w_down(silu(w_gate(x)) * w_up(x))`, all three Linear maps without bias."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise MemarchError(f"SwiGLU: dim and hidden_dim must be >= 1, got dim={dim!r}, hidden_dim={hidden_dim!r}")
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w_gate.weight, self.w_up.weight, self.w_down.weight)


# ---------------------------------------------------------------------------------------------- rotary

def rotary_angle_dtype(device: torch.device | None) -> torch.dtype:
    """Angles are formed in float64 (exact positions up to 2**53) except where the device has no float64 (MPS)."""
    return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64


def rotary_cos_sin(seq_len: int, head_dim: int, *, base: float = 10000.0, offset: int = 0,
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """[PRIM-3] Rotary tables: cos and sin of `(offset + t)·base^(−2i/Dh)`, each (seq_len, head_dim // 2)."""
    validate_rotary_sizes(seq_len, head_dim, base, offset, "rotary_cos_sin")
    work = rotary_angle_dtype(device)
    half = head_dim // 2
    i = torch.arange(half, dtype=work, device=device)  # (Dh/2,)
    inv_freq = base ** (-2.0 * i / head_dim)  # θ_i, (Dh/2,)
    positions = torch.arange(seq_len, dtype=work, device=device) + offset  # (L,)
    angles = positions[:, None] * inv_freq[None, :]  # (L, Dh/2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """[PRIM-4] Rotate each pair (x_i, x_{i+Dh/2}) of x (B, H, L, Dh) by its angle (rotate-half layout).

    [PRIM-5] holds by construction: each pair is a planar rotation, so norms are kept and q·k after rotation
    depends only on the position difference.
    """
    validate_apply_rotary(x, cos, sin, "apply_rotary")
    half = x.shape[-1] // 2
    first: list[Tensor] = []
    second: list[Tensor] = []
    for i in range(half):  # one planar rotation per frequency
        a, b = x[..., i], x[..., i + half]  # (B, H, L)
        c, s = cos[..., i], sin[..., i]  # (L,) or broadcastable
        first.append(a * c - b * s)
        second.append(a * s + b * c)
    return torch.stack(first + second, dim=-1)  # (B, H, L, Dh)


# ---------------------------------------------------------------------------------------------- conv1d

def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """[PRIM-6] Causal depthwise conv: y_t = Σ_j weight[:, j]·x_{t−K+1+j} + bias, zeros before t = 0."""
    validate_conv(x, weight, bias, "causal_depthwise_conv1d")
    _, length, _ = x.shape  # x: (B, L, D)
    taps = weight.shape[1]  # weight: (D, K)
    outputs: list[Tensor] = []
    for t in range(length):
        y_t = torch.zeros_like(x[:, 0])  # (B, D)
        for j in range(taps):
            source = t - taps + 1 + j
            if source >= 0:
                y_t = y_t + weight[:, j] * x[:, source]
        if bias is not None:
            y_t = y_t + bias
        outputs.append(y_t)
    if not outputs:
        return x.new_zeros(x.shape)
    return torch.stack(outputs, dim=1)  # (B, L, D)


def causal_depthwise_conv1d_step(conv_state: Tensor, x_t: Tensor, weight: Tensor,
                                 bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """[PRIM-7] One recurrent step of [PRIM-6]: shift x_t into the window of the last K inputs, then dot with weight.

    conv_state (B, D, K) holds x_{t−K} … x_{t−1} (oldest first; zeros before the sequence starts). Returns
    y_t (B, D) and the new state holding x_{t−K+1} … x_t. The input state is not modified.
    """
    validate_conv_step(conv_state, x_t, weight, bias, "causal_depthwise_conv1d_step")
    new_state = torch.cat([conv_state[:, :, 1:], x_t[:, :, None]], dim=2)  # (B, D, K)
    y_t = (new_state * weight).sum(dim=-1)  # (B, D)
    if bias is not None:
        y_t = y_t + bias
    return y_t, new_state


class CausalDepthwiseConv1d(nn.Module):
    """[PRIM-6] Causal depthwise conv over (B, L, D).

    Parameters live in `conv` (weight (D, 1, K), bias (D,)), as in mamba-ssm.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1:
            raise MemarchError(f"CausalDepthwiseConv1d: channels and kernel_size must be >= 1, got "
                               f"channels={channels!r}, kernel_size={kernel_size!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)

    def taps(self) -> Tensor:
        """The depthwise filter as (D, K)."""
        return self.conv.weight[:, 0, :]

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> Tensor:
        """An all-zero recurrent state (B, D, K), the state before the first token."""
        return torch.zeros(batch_size, self.channels, self.kernel_size,
                           dtype=dtype or self.conv.weight.dtype, device=device or self.conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return causal_depthwise_conv1d(x, self.taps(), self.conv.bias)

    def step(self, conv_state: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """[PRIM-7] One token: (conv_state (B, D, K), x_t (B, D)) -> (y_t (B, D), new_state)."""
        return causal_depthwise_conv1d_step(conv_state, x_t, self.taps(), self.conv.bias)

