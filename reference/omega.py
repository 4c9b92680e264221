"""The Omega-rule memory of Atlas-MAG, literally: one query position at a time, the windowed sum spelled out.

Spec: specs/atlas_mag.md ([MAG-1] … [MAG-4]). For queries q and keys k (B, H, L, Dh), input-dependent gates
(B, H, L), a context window c and a decay base, position t reads

    M_t = M_persistent + Σ_{i=t−c+1..t} γ_i^(t) k_i k_iᵀ,      γ_i^(t) = decay_base^(t−i) · gate_i
    q'_t = M_t q_t / (norm_persistent + Σ_i γ_i^(t) ‖k_i‖² + eps)

Nothing here is fused: M_t is formed as a (Dh, Dh) matrix per position, as the seed writes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference.validation import (
    MemarchError,
    ShapeError,
    check_float64_mix,
    check_floating,
    check_rank,
    check_same_device,
)

__all__ = ["omega_memory", "omega_weights", "persistent_memory", "validate_omega"]


def validate_window_and_decay(window: int, decay_base: float, fn: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MemarchError(f"{fn}: window must be an int >= 1 (it counts the current token), got {window!r}")
    if not (isinstance(decay_base, (int, float)) and 0 < decay_base <= 1):
        raise MemarchError(f"{fn}: decay_base must be a number in (0, 1], got {decay_base!r}")


def validate_omega_weights(gate: Tensor, window: int, decay_base: float, fn: str) -> None:
    check_floating(gate, "gate", fn=fn)
    check_rank(gate, "gate", 3, fn=fn, layout="(B, H, L)")
    validate_window_and_decay(window, decay_base, fn)


def validate_omega(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float,
                   M_persistent: Tensor | None, norm_persistent: Tensor | None, eps: float, fn: str) -> None:
    """Argument checks shared by the reference and the optimized op."""
    for name, t in (("q", q), ("k", k)):
        check_floating(t, name, fn=fn)
        check_rank(t, name, 4, fn=fn, layout="(B, H, L, Dh)")
    if k.shape != q.shape:
        raise ShapeError(f"{fn}: k must have the shape of q {tuple(q.shape)} (B, H, L, Dh), got {tuple(k.shape)}")
    check_floating(gate, "gate", fn=fn)
    if tuple(gate.shape) != tuple(q.shape[:3]):
        raise ShapeError(f"{fn}: gate must have shape (B, H, L) = {tuple(q.shape[:3])}, got {tuple(gate.shape)}")
    check_float64_mix(("q", q), ("k", k), ("gate", gate), ("M_persistent", M_persistent),
                      ("norm_persistent", norm_persistent), fn=fn)
    check_same_device(("q", q), ("k", k), ("gate", gate), fn=fn)
    validate_window_and_decay(window, decay_base, fn)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise MemarchError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    if (M_persistent is None) != (norm_persistent is None):
        raise MemarchError(f"{fn}: M_persistent and norm_persistent go together; pass both or neither")
    if M_persistent is not None and norm_persistent is not None:
        B, H, _, Dh = q.shape
        check_floating(M_persistent, "M_persistent", fn=fn)
        check_floating(norm_persistent, "norm_persistent", fn=fn)
        if tuple(M_persistent.shape) not in ((H, Dh, Dh), (B, H, Dh, Dh)):
            raise ShapeError(f"{fn}: M_persistent must have shape (H, Dh, Dh) = {(H, Dh, Dh)} or (B, H, Dh, Dh), "
                             f"got {tuple(M_persistent.shape)}")
        if tuple(norm_persistent.shape) not in ((H,), (B, H)):
            raise ShapeError(f"{fn}: norm_persistent must have shape (H,) = {(H,)} or (B, H), "
                             f"got {tuple(norm_persistent.shape)}")


def omega_weights(gate: Tensor, window: int, decay_base: float) -> Tensor:
    """[MAG-2] The weights γ_i^(t) = decay_base^(t−i)·gate_i for t − c < i ≤ t, else 0, as (B, H, L, L) [t, i]."""
    validate_omega_weights(gate, window, decay_base, "omega_weights")
    length = gate.shape[2]
    rows: list[Tensor] = []
    for t in range(length):
        row = torch.zeros_like(gate)  # (B, H, L): weights of every key i for query t
        for i in range(max(0, t - window + 1), t + 1):
            row[:, :, i] = decay_base ** (t - i) * gate[:, :, i]
        rows.append(row)
    if not rows:
        return gate.new_zeros((*gate.shape, 0))
    return torch.stack(rows, dim=2)  # (B, H, L, L)


def persistent_memory(k_persistent: Tensor) -> tuple[Tensor, Tensor]:
    """[MAG-4] M_persistent = (1/P) Σ_p k_p k_pᵀ and norm_persistent = (1/P) Σ_p ‖k_p‖² from persistent keys.

    k_persistent (H, P, Dh) -> ((H, Dh, Dh), (H,)). P = 0 gives zeros (no persistent memory).
    """
    check_floating(k_persistent, "k_persistent", fn="persistent_memory")
    check_rank(k_persistent, "k_persistent", 3, fn="persistent_memory", layout="(H, P, Dh)")
    H, P, Dh = k_persistent.shape
    M = k_persistent.new_zeros(H, Dh, Dh)
    norm = k_persistent.new_zeros(H)
    for p in range(P):
        k_p = k_persistent[:, p]  # (H, Dh)
        M = M + k_p[:, :, None] * k_p[:, None, :] / P
        norm = norm + (k_p * k_p).sum(dim=-1) / P
    return M, norm


def omega_memory(q: Tensor, k: Tensor, gate: Tensor, window: int, decay_base: float = 0.95, *,
                 M_persistent: Tensor | None = None, norm_persistent: Tensor | None = None,
                 eps: float = 1e-6) -> Tensor:
    """[MAG-1] [MAG-2] [MAG-3] The Omega-rule read q'_t = M_t q_t / norm_sum_t, one position at a time.

    M_t is formed explicitly for every t from the keys of its window (the sum over i is one einsum).

    q, k (B, H, L, Dh); gate (B, H, L); M_persistent (H, Dh, Dh) or (B, H, Dh, Dh) and norm_persistent (H,) or
    (B, H), both or neither -> q' (B, H, L, Dh).
    """
    validate_omega(q, k, gate, window, decay_base, M_persistent, norm_persistent, eps, "omega_memory")
    B, H, length, Dh = q.shape
    if M_persistent is None or norm_persistent is None:
        M_p = q.new_zeros(B, H, Dh, Dh)
        n_p = q.new_zeros(B, H)
    else:
        M_p = M_persistent.expand(B, H, Dh, Dh)
        n_p = norm_persistent.expand(B, H)
    outputs: list[Tensor] = []
    for t in range(length):
        lo = max(0, t - window + 1)
        powers = torch.arange(t - lo, -1, -1, dtype=q.dtype, device=q.device)  # t − i for i = lo … t
        gamma = decay_base ** powers * gate[:, :, lo:t + 1]  # [MAG-2] γ_i^(t), (B, H, n_t)
        k_win = k[:, :, lo:t + 1]  # (B, H, n_t, Dh)
        M_t = M_p + torch.einsum("bhi,bhid,bhie->bhde", gamma, k_win, k_win)  # [MAG-1] (B, H, Dh, Dh)
        norm_sum = n_p + (gamma * (k_win * k_win).sum(dim=-1)).sum(dim=-1)  # (B, H)
        read = torch.einsum("bhde,bhe->bhd", M_t, q[:, :, t])  # M_t q_t, (B, H, Dh)
        outputs.append(read / (norm_sum + eps)[:, :, None])  # [MAG-3]
    if not outputs:
        return q.new_zeros(q.shape)
    return torch.stack(outputs, dim=2)  # (B, H, L, Dh)
