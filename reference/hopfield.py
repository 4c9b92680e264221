"""Modern (continuous) Hopfield memory, literally (Ramsauer et al. 2020). Spec: specs/hopfield.md.

Stored patterns are the rows of `X` (M, D). `hopfield_retrieve` is one update ξ_new = Xᵀ softmax(β X ξ),
`hopfield_energy` the energy it descends, `retrieval_error_bound` the bound of [HOP-3]. `HopfieldMemory` holds the
patterns (learnable, or a buffer written with `write`); `optimized/hopfield.py` swaps the two functions for fused /
chunked ones through the class attributes `retrieve_fn` and `energy_fn`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reference.validation import ConfigError, ShapeError, check_float64_mix, check_floating, check_same_device

__all__ = ["HopfieldMemory", "hopfield_energy", "hopfield_retrieve", "retrieval_error_bound", "separation"]


def check_hopfield_args(xi: Tensor, X: Tensor, beta: float, fn: str) -> None:
    check_floating(xi, "xi", fn=fn)
    check_floating(X, "X", fn=fn)
    check_float64_mix(("xi", xi), ("X", X), fn=fn)
    check_same_device(("xi", xi), ("X", X), fn=fn)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ShapeError(f"{fn}: X (stored patterns) must be (memory_size >= 1, D), got shape {tuple(X.shape)}")
    if xi.ndim < 1 or xi.shape[-1] != X.shape[1]:
        raise ShapeError(f"{fn}: xi must be (..., D) with D = X.shape[1] = {X.shape[1]}, got shape {tuple(xi.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"{fn}: beta must be a finite number > 0, got {beta!r}")


def hopfield_retrieve(xi: Tensor, X: Tensor, beta: float) -> Tensor:
    """[HOP-2] ξ_new = Xᵀ softmax(β X ξ): xi (..., D), X (M, D) -> (..., D)."""
    check_hopfield_args(xi, X, beta, "hopfield_retrieve")
    scores = beta * (xi @ X.T)  # (..., M)
    p = torch.softmax(scores, dim=-1)  # (..., M)
    return p @ X  # (..., D)


def hopfield_energy(xi: Tensor, X: Tensor, beta: float) -> Tensor:
    """[HOP-1] E(ξ) = −β⁻¹ log Σ_i exp(β x_iᵀξ) + ½ ξᵀξ + β⁻¹ log M + ½ max_i ‖x_i‖²: (..., D) -> (...)."""
    check_hopfield_args(xi, X, beta, "hopfield_energy")
    M = X.shape[0]
    lse = torch.logsumexp(beta * (xi @ X.T), dim=-1) / beta  # (...)
    m_sq = (X * X).sum(-1).max()  # max_i ‖x_i‖²
    return -lse + 0.5 * (xi * xi).sum(-1) + math.log(M) / beta + 0.5 * m_sq


def separation(X: Tensor, i: int) -> Tensor:
    """[HOP-3] Δ_i = x_iᵀx_i − max_{j≠i} x_iᵀx_j (a 0-dim tensor; needs M >= 2)."""
    check_floating(X, "X", fn="separation")
    if X.ndim != 2 or X.shape[0] < 2:
        raise ShapeError(f"separation: X must be (M >= 2, D), got shape {tuple(X.shape)}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < X.shape[0]:
        raise ShapeError(f"separation: i must be a pattern index in [0, M={X.shape[0]}), got {i!r}")
    dots = X @ X[i]  # (M,)
    others = torch.cat([dots[:i], dots[i + 1:]])
    return dots[i] - others.max()


def retrieval_error_bound(X: Tensor, i: int, xi: Tensor, beta: float) -> Tensor:
    """[HOP-3] 2 m (M − 1) exp(−β (Δ_i − 2 m ‖ξ − x_i‖)), the bound on ‖ξ_new − x_i‖ after one update. xi: (D,)."""
    check_floating(xi, "xi", fn="retrieval_error_bound")
    if X.ndim == 2 and tuple(xi.shape) != (X.shape[1],):
        raise ShapeError(f"retrieval_error_bound: xi must be one query of shape (D,) = ({X.shape[1]},), "
                         f"got {tuple(xi.shape)}")
    separation(X, i)  # checks X and i
    m = torch.linalg.vector_norm(X, dim=-1).max()
    gap = separation(X, i) - 2 * m * torch.linalg.vector_norm(xi - X[i])
    return 2 * m * (X.shape[0] - 1) * torch.exp(-beta * gap)


class HopfieldMemory(nn.Module):
    """[HOP-4] M stored patterns (M, D), learnable or written; `retrieve` [HOP-2], `energy` [HOP-1]."""

    patterns: Tensor
    retrieve_fn = staticmethod(hopfield_retrieve)
    energy_fn = staticmethod(hopfield_energy)

    def __init__(self, memory_size: int, d_model: int, beta: float = 2.0, *, learnable: bool = True,
                 init_std: float | None = None) -> None:
        super().__init__()
        for name, value in (("memory_size", memory_size), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"HopfieldMemory: {name} must be an integer >= 1, got {value!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
            raise ConfigError(f"HopfieldMemory: beta must be a finite number > 0, got {beta!r}")
        std = d_model ** -0.5 if init_std is None else init_std
        if not std > 0:
            raise ConfigError(f"HopfieldMemory: init_std must be > 0, got {init_std!r}")
        self.memory_size, self.d_model, self.beta, self.learnable = memory_size, d_model, float(beta), learnable
        init = torch.randn(memory_size, d_model) * std  # (M, D)
        if learnable:
            self.patterns = nn.Parameter(init)
        else:
            self.register_buffer("patterns", init)
        self.twice_differentiable = False  # read by the optimized retrieval (see specs/hopfield.md)

    @torch.no_grad()
    def write(self, patterns: Tensor, start: int = 0) -> None:
        """[HOP-4] Store `patterns` (K, D) into slots start … start+K−1."""
        check_floating(patterns, "patterns", fn="HopfieldMemory.write")
        K = patterns.shape[0] if patterns.ndim == 2 else -1
        if patterns.ndim != 2 or patterns.shape[1] != self.d_model:
            raise ShapeError(f"HopfieldMemory.write: patterns must be (K, d_model={self.d_model}), "
                             f"got shape {tuple(patterns.shape)}")
        if not 0 <= start <= self.memory_size - K:
            raise ShapeError(f"HopfieldMemory.write: start={start!r} puts the slots [{start}, {start + K}) outside "
                             f"[0, memory_size={self.memory_size})")
        self.patterns[start:start + K] = patterns.to(self.patterns)

    def retrieve(self, xi: Tensor) -> Tensor:
        """[HOP-2] One update of every query: (..., D) -> (..., D)."""
        return self.retrieve_fn(xi, self.patterns, self.beta)

    def energy(self, xi: Tensor) -> Tensor:
        """[HOP-1] The energy of every query: (..., D) -> (...)."""
        return self.energy_fn(xi, self.patterns, self.beta)

    def forward(self, xi: Tensor) -> Tensor:
        return self.retrieve(xi)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, d_model={self.d_model}, beta={self.beta}, learnable={self.learnable}"
