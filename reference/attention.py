"""Causal sliding-window attention with optional persistent (prefix) tokens, literally: one query at a time.

Convention ([PRIM-8]): q is (B, H, L, Dh); k is (B, H, P + L, Dh) and v is (B, H, P + L, Dv), whose first
P = `num_prefix` positions are persistent tokens visible to every query. Query t (0-based among the L
sequence positions) sees the P prefix keys and the sequence keys s with max(0, t − window + 1) ≤ s ≤ t:
the window counts the current token, so window = 1 attends only to itself (plus the prefix).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reference.primitives import apply_rotary, rotary_cos_sin
from reference.validation import (
    MemarchError,
    ShapeError,
    check_float64_mix,
    check_floating,
    check_rank,
    check_same_device,
)

__all__ = ["SlidingWindowAttention", "sliding_window_attention"]


def validate_swa(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None, num_prefix: int,
                 fn: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name, fn=fn)
        check_rank(t, name, 4, fn=fn, layout="(B, H, L, Dh) for q, (B, H, P + L, Dh) for k and v")
    check_float64_mix(("q", q), ("k", k), ("v", v), fn=fn)
    check_same_device(("q", q), ("k", k), ("v", v), fn=fn)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MemarchError(f"{fn}: window must be an int >= 1 (it counts the current token), got {window!r}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise MemarchError(f"{fn}: num_prefix must be an int >= 0, got {num_prefix!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise MemarchError(f"{fn}: scale must be a finite float > 0 or None (1/sqrt(Dh)), got {scale!r}")
    batch, heads, length, head_dim = q.shape
    want_k = (batch, heads, num_prefix + length, head_dim)
    if tuple(k.shape) != want_k:
        raise ShapeError(f"{fn}: k must have shape (B, H, P + L, Dh) = {want_k} for q of shape {tuple(q.shape)} "
                         f"and num_prefix={num_prefix}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != want_k[:3]:
        raise ShapeError(f"{fn}: v must have shape (B, H, P + L, Dv) with (B, H, P + L) = {want_k[:3]}, "
                         f"got {tuple(v.shape)}")


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None,
                             num_prefix: int = 0) -> Tensor:
    """[PRIM-8] visible set and [PRIM-9] softmax attention over it, one query position at a time.

    q (B, H, L, Dh), k (B, H, P + L, Dh), v (B, H, P + L, Dv) -> (B, H, L, Dv). `scale` defaults to 1/sqrt(Dh).
    """
    validate_swa(q, k, v, window, scale, num_prefix, "sliding_window_attention")
    length = q.shape[2]
    P = num_prefix
    s = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    outputs: list[Tensor] = []
    for t in range(length):
        lo = max(0, t - window + 1)
        keys = torch.cat([k[:, :, :P], k[:, :, P + lo:P + t + 1]], dim=2)  # (B, H, P + n_t, Dh)
        values = torch.cat([v[:, :, :P], v[:, :, P + lo:P + t + 1]], dim=2)  # (B, H, P + n_t, Dv)
        scores = torch.einsum("bhd,bhnd->bhn", q[:, :, t], keys) * s  # (B, H, P + n_t)
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        outputs.append(torch.einsum("bhn,bhnd->bhd", weights, values))  # (B, H, Dv)
    if not outputs:
        return v.new_zeros(q.shape[:3] + v.shape[3:])
    return torch.stack(outputs, dim=2)  # (B, H, L, Dv)


class SlidingWindowAttention(nn.Module):
    """[PRIM-10] Multi-head causal sliding-window attention with rotary positions and persistent tokens.

    forward(x (B, L, D), prefix (B, P, D) or (P, D) or None) -> (B, L, D). Rotary ([PRIM-3], [PRIM-4]) is
    applied to the sequence's q and k at positions 0 … L − 1; the prefix's keys carry no rotation (they act as
    keys at position 0 for every query). The optimized subclass overrides `_rotate`,
    `_tables` and `_attend` only.
    """

    def __init__(self, dim: int, num_heads: int, window: int, *, rotary_base: float = 10000.0,
                 bias: bool = False) -> None:
        super().__init__()
        fn = "SlidingWindowAttention"
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise MemarchError(f"{fn}: dim must be a positive multiple of num_heads, got dim={dim!r}, "
                               f"num_heads={num_heads!r}")
        if (dim // num_heads) % 2 != 0:
            raise ShapeError(f"{fn}: head_dim = dim / num_heads must be even for rotary embeddings, got "
                             f"dim={dim}, num_heads={num_heads} (head_dim={dim // num_heads})")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise MemarchError(f"{fn}: window must be an int >= 1 (it counts the current token), got {window!r}")
        if not rotary_base > 0:
            raise MemarchError(f"{fn}: rotary_base must be > 0, got {rotary_base!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.rotary_base = rotary_base
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, y: Tensor) -> Tensor:
        """(B, n, D) -> (B, H, n, Dh)."""
        return y.view(y.shape[0], y.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _tables(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(length, self.head_dim, base=self.rotary_base, dtype=like.dtype, device=like.device)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(x, cos, sin)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, num_prefix: int) -> Tensor:
        return sliding_window_attention(q, k, v, self.window, num_prefix=num_prefix)

    def forward(self, x: Tensor, prefix: Tensor | None = None) -> Tensor:
        fn = "SlidingWindowAttention"
        check_floating(x, "x", fn=fn)
        check_rank(x, "x", 3, fn=fn, layout="(B, L, D)")
        if x.shape[2] != self.dim:
            raise ShapeError(f"{fn}: x.shape[2] must be dim={self.dim}, got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        cos, sin = self._tables(length, x)  # (L, Dh/2) each
        q = self._rotate(self._heads(self.q_proj(x)), cos, sin)  # (B, H, L, Dh)
        k = self._rotate(self._heads(self.k_proj(x)), cos, sin)  # (B, H, L, Dh)
        v = self._heads(self.v_proj(x))  # (B, H, L, Dh)
        num_prefix = 0
        if prefix is not None:
            check_floating(prefix, "prefix", fn=fn)
            check_rank(prefix, "prefix", (2, 3), fn=fn, layout="(B, P, D) or (P, D)")
            if prefix.ndim == 2:
                prefix = prefix.unsqueeze(0).expand(batch, -1, -1)  # (B, P, D)
            if prefix.shape[0] != batch or prefix.shape[2] != self.dim:
                raise ShapeError(f"{fn}: prefix must have shape (B, P, D) with B={batch}, D={self.dim}, "
                                 f"got {tuple(prefix.shape)}")
            num_prefix = prefix.shape[1]
            k = torch.cat([self._heads(self.k_proj(prefix)), k], dim=2)  # (B, H, P + L, Dh)
            v = torch.cat([self._heads(self.v_proj(prefix)), v], dim=2)  # (B, H, P + L, Dh)
        out = self._attend(q, k, v, num_prefix)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.dim))
