"""The Omega-rule memory of Atlas-MAG, fast: the banded q·k Gram form, never a (Dh, Dh) matrix per token.

Implements `reference.omega.omega_memory`. Expanding M_t q_t gives

    M_t q_t = M_persistent q_t + Σ_{t−c<i≤t} γ_i^(t) (k_i · q_t) k_i,    norm_sum_t = n_p + Σ γ_i^(t) ‖k_i‖²

i.e. linear attention whose values are the keys, under the banded weight W[t, i] = decay^(t−i)·gate_i. Two
implementations of that form, chosen by `omega_dispatch` (reported by `scripts/bench.py`):

* "triton-fused" (CUDA tensors, Triton importable, float32/bfloat16/float16, Dh ≤ 256): the fused kernel
  `optimized.kernels.omega`, flash-attention style — one program per (query block, batch·head) walks only the
  key blocks inside the window, Gram scores, weights, the weighted key sum and the denominator stay in
  registers; the persistent term is added in the kernel. Memory O(B·H·L·Dh), time O(B·H·L·(c + C)·Dh).
  Gradients: Triton kernels too (a dq pass through the forward kernel, a dk/dgate kernel per key block; see
  `optimized.kernels.omega`).
* "torch-blocked-gram" (CPU, float64, larger heads): `omega_blocked`. The sequence is cut into blocks of C
  positions (default 64); query block j meets key block j − m for the m = 0 … ⌈(c − 1)/C⌉ block offsets inside
  the window, each one batched matmul (B, H, L/C, C, C). Memory grows as O(B·H·L·C) per offset and time as
  O(B·H·L·(c + C)·Dh) — linear in L. Python loops run over the block offsets (≤ c/C + 1), never over tokens.

Both form the weights from the exponent directly (decay^(t−i), or a product of two factors ≤ 1), so nothing
overflows, underflows early or subtracts: the only error is float reassociation of the sums (and, in the
kernel under half inputs, the rounding of S∘W to the input dtype before its tensor-core dot, as
flash-attention rounds its probabilities). Half inputs are computed in float32 and cast back.

Measured error vs the float64 reference (tests): float64 ≤ 1e-10 (torch path), float32 ≤ 1e-5 relative to
max|q'| (both paths; the kernel's float32 dots are IEEE, not TF32), bfloat16 inputs ≤ 1e-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.kernels import kernel_available
from reference.omega import validate_omega, validate_omega_weights
from reference.validation import MemarchError, check_floating, check_rank

__all__ = ["DEFAULT_BLOCK", "omega_blocked", "omega_dispatch", "omega_memory", "omega_weights", "persistent_memory"]

DEFAULT_BLOCK = 64


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _use_kernel(q: Tensor, k: Tensor) -> bool:
    if not kernel_available(q, "omega"):
        return False
    from optimized.kernels.omega import kernel_supports

    return kernel_supports(q, k)


def omega_dispatch(q: Tensor) -> str:
    """The code path `omega_memory` takes for queries like `q` (reported by `scripts/bench.py`)."""
    return "triton-fused" if _use_kernel(q, q) else "torch-blocked-gram"


def band_weights(offset: int, block: int, window: int, decay_base: float, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """decay^(t−i) for query a of block j and key b of block j − offset (t − i = offset·C + a − b), zero
    outside 0 ≤ t − i < window; (C, C)."""
    a = torch.arange(block, device=device)[:, None]
    b = torch.arange(block, device=device)[None, :]
    dist = offset * block + a - b  # (C, C) integer distances t − i
    valid = (dist >= 0) & (dist < window)
    powers = torch.where(valid, dist, torch.zeros_like(dist)).to(dtype)
    table = torch.exp(powers * math.log(decay_base)) if decay_base != 1.0 else torch.ones_like(powers)
    return torch.where(valid, table, torch.zeros_like(table))


def omega_weights(gate: Tensor, window: int, decay_base: float) -> Tensor:
    """Implements `reference.omega.omega_weights` as one masked power table (B, H, L, L); exact up to rounding."""
    validate_omega_weights(gate, window, decay_base, "omega_weights")
    length = gate.shape[2]
    table = band_weights(0, length, window, decay_base, gate.dtype, gate.device)  # (L, L) [t, i]
    return table * gate[:, :, None, :]


def persistent_memory(k_persistent: Tensor) -> tuple[Tensor, Tensor]:
    """Implements `reference.omega.persistent_memory` with one einsum; tolerance as the inputs' dtype."""
    check_floating(k_persistent, "k_persistent", fn="persistent_memory")
    check_rank(k_persistent, "k_persistent", 3, fn="persistent_memory", layout="(H, P, Dh)")
    H, P, Dh = k_persistent.shape
    if P == 0:
        return k_persistent.new_zeros(H, Dh, Dh), k_persistent.new_zeros(H)
    M = torch.einsum("hpd,hpe->hde", k_persistent, k_persistent) / P  # (H, Dh, Dh)
    return M, (k_persistent * k_persistent).sum(dim=(1, 2)) / P


def omega_memory(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float = 0.95, *,
                 M_persistent: Tensor | None = None, norm_persistent: Tensor | None = None,
                 eps: float = 1e-6, block: int = DEFAULT_BLOCK) -> Tensor:
    """Implements `reference.omega.omega_memory`: the fused Triton kernel on CUDA, else the blocked banded Gram
    form (module docstring; `omega_dispatch` names the path).

    `block` is the torch path's block length C (a speed knob only; the kernel picks its own tiles).
    Tolerances: float64 1e-10, float32 1e-5, bfloat16 1e-2.
    """
    validate_omega(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps, "omega_memory")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise MemarchError(f"omega_memory: block must be an int >= 1, got {block!r}")
    if q.shape[2] > 0 and _use_kernel(q, k):
        from optimized.kernels.omega import omega_triton_autograd

        return omega_triton_autograd(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps)
    return omega_blocked(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps, block)


def omega_blocked(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float,
                  M_persistent: Tensor | None = None, norm_persistent: Tensor | None = None, eps: float = 1e-6,
                  block: int = DEFAULT_BLOCK) -> Tensor:
    """The torch blocked banded Gram form (module docstring) on validated inputs; differentiable by autograd
    (the Triton path's backward could recompute through it: `optimized.kernels.omega.USE_KERNEL_BACKWARD`)."""
    B, H, length, Dh = q.shape
    if length == 0:
        return q.new_zeros(q.shape)
    out_dtype = q.dtype
    work = _work_dtype(q.dtype)
    C = min(block, length)
    nb = -(-length // C)
    pad = nb * C - length
    qb = F.pad(q.to(work), (0, 0, 0, pad)).view(B, H, nb, C, Dh)  # (B, H, nb, C, Dh)
    kb = F.pad(k.to(work), (0, 0, 0, pad)).view(B, H, nb, C, Dh)  # (B, H, nb, C, Dh)
    gb = F.pad(gate.to(work), (0, pad)).view(B, H, nb, C)  # (B, H, nb, C); padded keys weigh 0
    gk = gb * (kb * kb).sum(dim=-1)  # gate_i ‖k_i‖², (B, H, nb, C)
    num = qb.new_zeros(B, H, nb, C, Dh)
    den = qb.new_zeros(B, H, nb, C)
    max_offset = min(nb - 1, -(-(window - 1) // C))
    for m in range(max_offset + 1):  # block offsets inside the window, not tokens
        W = band_weights(m, C, window, decay_base, work, q.device)  # (C, C)
        k_src = kb[:, :, :nb - m]  # key block j − m for query blocks j = m … nb − 1
        scores = qb[:, :, m:] @ k_src.transpose(-1, -2)  # (B, H, nb − m, C, C)
        weighted = scores * W * gb[:, :, :nb - m, None, :]
        num = num + F.pad(weighted @ k_src, (0, 0, 0, 0, m, 0))
        den = den + F.pad(gk[:, :, :nb - m] @ W.T, (0, 0, m, 0))
    if M_persistent is not None and norm_persistent is not None:
        M_p = M_persistent.to(work)
        M_p = M_p[None] if M_p.ndim == 3 else M_p  # (B or 1, H, Dh, Dh)
        num = num + torch.einsum("bhde,bhnce->bhncd", M_p, qb)
        n_p = norm_persistent.to(work)
        n_p = n_p[None] if n_p.ndim == 1 else n_p  # (B or 1, H)
        den = den + n_p[:, :, None, None]
    out = num / (den + eps)[..., None]  # (B, H, nb, C, Dh)
    return out.reshape(B, H, nb * C, Dh)[:, :, :length].to(out_dtype)
