"""StableMax and ⊥Grad (Prieto et al., 2025, "Grokking at the Edge of Numerical Stability"), literally.

Spec: `specs/titans.md`, [TITANS-16]–[TITANS-18]. StableMax replaces exp in softmax by a function that grows
linearly for positive inputs, so the loss cannot push logits into float overflow ("softmax collapse"); ⊥Grad
removes from each weight's gradient its component along the weight ("naïve loss minimisation" direction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.validation import DTypeError, ShapeError, check_floating

__all__ = ["log_stablemax", "perp_grad", "stablemax", "stablemax_cross_entropy", "stablemax_s"]


def stablemax_s(x: Tensor) -> Tensor:
    """[TITANS-16] s(x) = x + 1 for x ≥ 0, 1 / (1 − x) for x < 0 (continuous, positive, s(0) = 1)."""
    check_floating(x, "x", fn="stablemax_s")
    positive = torch.clamp(x, min=0) + 1
    negative = 1 / (1 - torch.clamp(x, max=0))  # both branches finite everywhere, so gradients are too
    return torch.where(x >= 0, positive, negative)


def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """[TITANS-16] StableMax(x)_i = s(x_i) / Σ_j s(x_j) along `dim`: non-negative, sums to 1."""
    check_floating(x, "x", fn="stablemax")
    s = stablemax_s(x)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """[TITANS-16] log StableMax(x) = log s(x_i) − log Σ_j s(x_j)."""
    check_floating(x, "x", fn="log_stablemax")
    s = stablemax_s(x)
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """[TITANS-17] Mean over positions whose target is not `ignore_index` of −log StableMax(logits)[target].

    logits (..., V), targets (...) int64 -> scalar. With no counted position the loss is 0.
    """
    check_floating(logits, "logits", fn="stablemax_cross_entropy")
    if targets.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"stablemax_cross_entropy: targets must be int64/int32 class ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(f"stablemax_cross_entropy: targets must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    t = targets.reshape(-1)
    keep = t != ignore_index
    counted = torch.where(keep, t, 0)
    if counted.numel() > 0 and not torch.compiler.is_compiling():  # one sync: a bad id would fail in gather
        bounds = torch.aminmax(counted)
        low, high = int(bounds.min.item()), int(bounds.max.item())
        if low < 0 or high >= logits.shape[-1]:
            raise ShapeError(f"stablemax_cross_entropy: targets must lie in [0, V={logits.shape[-1]}) or equal "
                             f"ignore_index={ignore_index}, got min {low}, max {high}")
    flat = log_stablemax(logits.reshape(-1, logits.shape[-1]))  # (N, V)
    picked = flat.gather(1, counted.long()[:, None])[:, 0]  # (N,)
    count = keep.sum().clamp_min(1).to(flat.dtype)
    return -(picked * keep.to(flat.dtype)).sum() / count


def perp_grad(weight: Tensor, grad: Tensor) -> Tensor:
    """[TITANS-18] ⊥Grad: g − (⟨θ, g⟩ / ⟨θ, θ⟩) θ, per weight tensor θ; g unchanged where θ = 0."""
    check_floating(weight, "weight", fn="perp_grad")
    check_floating(grad, "grad", fn="perp_grad")
    if weight.shape != grad.shape:
        raise ShapeError(f"perp_grad: grad must have the weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    theta_sq = (weight * weight).sum()
    coef = torch.where(theta_sq > 0, (weight * grad).sum() / torch.where(theta_sq > 0, theta_sq, 1), 0)
    return grad - coef * weight
