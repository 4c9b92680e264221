"""Causal sliding-window attention, fast: blocked `scaled_dot_product_attention` whose cost grows linearly in L.

Method (`specs/primitives.md`, "Sliding-window attention: the blocked form"): the L queries are cut into blocks of
`c = max(window, MIN_BLOCK)` positions. Block j's queries need only sequence keys in [jc − window + 1,
(j + 1)c), which lie inside its own block and the previous one, so each block attends to P + 2c keys under a
small (c, P + 2c) boolean mask. All blocks go through one batched SDPA call (no Python loop over blocks); the
scores cost O(B·H·L·(P + 2c)) time and memory. Short sequences (L ≤ 2c) take one dense SDPA call with an
(L, P + L) mask, which is at most (2c, P + 2c); with no prefix and window ≥ L it is plain causal SDPA, no mask.

Tolerances against the float64 reference: float64 1e-10, float32 1e-5 relative, bfloat16 1e-2 (SDPA
accumulates in fp32 under half inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.primitives import apply_rotary, rotary_cos_sin
from reference import attention as ref
from reference.attention import validate_swa
from reference.validation import MemarchError

__all__ = ["MIN_BLOCK", "SlidingWindowAttention", "sliding_window_attention", "swa_dispatch"]

MIN_BLOCK = 64  # smallest query block: tiny windows would otherwise make many tiny SDPA problems


def block_size(window: int) -> int:
    """Query block length for the blocked path: at least the window, so a block reaches back one block only."""
    return max(window, MIN_BLOCK)


def swa_dispatch(length: int, window: int, num_prefix: int = 0) -> str:
    """The code path `sliding_window_attention` takes for these sizes: "sdpa-causal", "sdpa-dense" or
    "sdpa-blocked" (reported by `scripts/bench.py`)."""
    if num_prefix == 0 and window >= length:
        return "sdpa-causal"
    if length <= 2 * block_size(window):
        return "sdpa-dense"
    return "sdpa-blocked"


def dense_mask(length: int, window: int, num_prefix: int, device: torch.device) -> Tensor:
    """The visible set of `reference.attention.sliding_window_attention` as a boolean (L, P + L) mask, True
    where query t may see the key."""
    t = torch.arange(length, device=device)[:, None]  # (L, 1)
    s = torch.arange(length, device=device)[None, :]  # (1, L)
    seq = (s <= t) & (s > t - window)  # (L, L)
    pre = torch.ones(length, num_prefix, dtype=torch.bool, device=device)  # (L, P)
    return torch.cat([pre, seq], dim=1)


def block_mask(num_blocks: int, block: int, window: int, num_prefix: int, device: torch.device) -> Tensor:
    """The (num_blocks, c, P + 2c) boolean mask of the blocked form.

    Query a of block j is position jc + a; key b of the previous block is position (j − 1)c + b, key b of the
    own block is position jc + b. Block 0 has no previous block (those keys are zero padding).
    """
    a = torch.arange(block, device=device)[:, None]  # (c, 1)
    b = torch.arange(block, device=device)[None, :]  # (1, c)
    prev = b - block > a - window  # (c, c): position ≥ t − window + 1; always causal
    own = (b <= a) & (b > a - window)  # (c, c)
    pre = torch.ones(block, num_prefix, dtype=torch.bool, device=device)  # (c, P)
    mask = torch.cat([pre, prev, own], dim=1).expand(num_blocks, -1, -1).clone()  # (nb, c, P + 2c)
    mask[0, :, num_prefix:num_prefix + block] = False
    return mask


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, num_prefix: int,
                      block: int) -> Tensor:
    """The blocked form of the sliding-window attention; needs block ≥ window − 1 (each block reaches back at
    most one block)."""
    if block < window - 1 or block < 1:
        raise MemarchError(f"blocked_attention: block must be >= max(1, window - 1) = {max(1, window - 1)}, "
                           f"got {block!r}")
    batch, heads, length, head_dim = q.shape
    value_dim = v.shape[3]
    P, c = num_prefix, block
    num_blocks = -(-length // c)
    pad = num_blocks * c - length
    # SDPA sees (batch = B·H, "heads" = nb): the block-dependent mask is shared by every (b, h) through a
    # stride-0 expand (no copy; faster on CPU than a size-1 broadcast dim).
    q_blocks = F.pad(q, (0, 0, 0, pad)).reshape(batch * heads, num_blocks, c, head_dim)  # (B·H, nb, c, Dh)
    # One leading block of zeros stands for "the block before block 0"; unfold gives every (prev, own) pair.
    k_seq = F.pad(k[:, :, P:], (0, 0, c, pad))  # (B, H, c + nb·c, Dh)
    v_seq = F.pad(v[:, :, P:], (0, 0, c, pad))  # (B, H, c + nb·c, Dv)
    k_blocks = k_seq.unfold(2, 2 * c, c).transpose(-1, -2)  # (B, H, nb, 2c, Dh)
    v_blocks = v_seq.unfold(2, 2 * c, c).transpose(-1, -2)  # (B, H, nb, 2c, Dv)
    if P > 0:
        k_blocks = torch.cat([k[:, :, None, :P].expand(-1, -1, num_blocks, -1, -1), k_blocks], dim=3)
        v_blocks = torch.cat([v[:, :, None, :P].expand(-1, -1, num_blocks, -1, -1), v_blocks], dim=3)
    k_blocks = k_blocks.reshape(batch * heads, num_blocks, P + 2 * c, head_dim)  # (B·H, nb, P + 2c, Dh)
    v_blocks = v_blocks.reshape(batch * heads, num_blocks, P + 2 * c, value_dim)  # (B·H, nb, P + 2c, Dv)
    mask = block_mask(num_blocks, c, window, P, q.device).expand(batch * heads, -1, -1, -1)  # (B·H, nb, c, P + 2c)
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, num_blocks * c, value_dim)[:, :, :length]  # (B, H, L, Dv)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, num_prefix: int) -> Tensor:
    """The sliding-window attention in one SDPA call: plain causal when nothing is cut off, else an (L, P + L)
    mask."""
    length = q.shape[2]
    if num_prefix == 0 and window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = dense_mask(length, window, num_prefix, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, *, scale: float | None = None,
                             num_prefix: int = 0) -> Tensor:
    """Implements `reference.attention.sliding_window_attention` with SDPA: dense for L ≤ 2c, blocked beyond
    (see the module docstring; `swa_dispatch` names the path). Tolerances: float64 1e-10, float32 1e-5,
    bfloat16 1e-2."""
    validate_swa(q, k, v, window, scale, num_prefix, "sliding_window_attention")
    s = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    length = q.shape[2]
    if length == 0:
        return v.new_zeros(q.shape[:3] + v.shape[3:])
    if swa_dispatch(length, window, num_prefix) == "sdpa-blocked":
        return blocked_attention(q, k, v, window, s, num_prefix, block_size(window))
    return dense_attention(q, k, v, window, s, num_prefix)


class SlidingWindowAttention(ref.SlidingWindowAttention):
    """`reference.attention.SlidingWindowAttention` with the fast rotary and the blocked SDPA attention above;
    rotary tables are formed in fp32 under half inputs."""

    def _tables(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        return rotary_cos_sin(length, self.head_dim, base=self.rotary_base, dtype=dtype, device=like.device)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(x, cos, sin)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, num_prefix: int) -> Tensor:
        return sliding_window_attention(q, k, v, self.window, num_prefix=num_prefix)
