"""Titans / Miras matrix memory learned at test time, literally (spec: `specs/titans.md`).

Per head the memory is a matrix M (d_k, d_v) trained online on the attentional bias ℓ(M; k, v) = ‖kᵀM − vᵀ‖²
(+ global retention (λ/2)‖M‖²) by gradient descent with momentum S and a local forget gate α. Two literal
recurrences live here: the per-token one ([TITANS-4]–[TITANS-6]) and the chunked one ([TITANS-7]) in which every
gradient of a chunk is taken at the chunk's start state. `optimized/titans.py` computes the chunked one in
parallel form. Everything loops over time, is dtype-agnostic and runs in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from reference.primitives import RMSNorm
from reference.validation import (
    MemarchError,
    ShapeError,
    check_float64_mix,
    check_floating,
    check_rank,
    check_same_device,
)

__all__ = [
    "MemoryOutput",
    "MemoryState",
    "TitansMemory",
    "memory_gradient",
    "memory_stats",
    "normalize_queries",
    "qk_projection",
    "titans_learning_rate",
    "titans_memory_chunked",
    "titans_memory_read",
    "titans_memory_recurrent",
]


class MemoryState(NamedTuple):
    """The memory's state per head: M and S (B, H, d_k, d_v), the written keys' Gram P (B, H, d_k, d_k)."""

    M: Tensor
    S: Tensor
    P: Tensor


class MemoryOutput(NamedTuple):
    y: Tensor  # (B, L, D)
    state: MemoryState
    stats: dict[str, Tensor]


# ---------------------------------------------------------------------------------------------- checks

def validate_memory_inputs(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                           initial_state: tuple[Tensor, Tensor] | None, global_decay: float, fn: str,
                           chunk_size: int | None = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name, fn=fn)
        check_rank(t, name, 4, fn=fn, layout="(B, H, L, d_k) for q and k, (B, H, L, d_v) for v")
    if q.shape != k.shape:
        raise ShapeError(f"{fn}: q and k must have one shape (B, H, L, d_k), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"{fn}: v must have shape (B, H, L, d_v) with (B, H, L) = {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    for name, t in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        check_floating(t, name, fn=fn)
        if t.shape != k.shape[:3]:
            raise ShapeError(f"{fn}: {name} must have shape (B, H, L) = {tuple(k.shape[:3])}, got {tuple(t.shape)}")
    check_float64_mix(("q", q), ("k", k), ("v", v), ("alpha", alpha), ("eta", eta), ("theta", theta), fn=fn)
    check_same_device(("q", q), ("k", k), ("v", v), ("alpha", alpha), ("eta", eta), ("theta", theta), fn=fn)
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) < 2:
            raise ShapeError(f"{fn}: initial_state must be a pair (M, S), got {type(initial_state).__name__}")
        want = (k.shape[0], k.shape[1], k.shape[3], v.shape[3])
        for name, t in zip(("M", "S"), initial_state[:2], strict=True):
            check_floating(t, f"initial_state {name}", fn=fn)
            if tuple(t.shape) != want:
                raise ShapeError(f"{fn}: initial_state {name} must have shape (B, H, d_k, d_v) = {want}, "
                                 f"got {tuple(t.shape)}")
    if not (isinstance(global_decay, (int, float)) and math.isfinite(global_decay) and global_decay >= 0):
        raise MemarchError(f"{fn}: global_decay must be a finite number >= 0, got {global_decay!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise MemarchError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")


def validate_qk_projection(q: Tensor, k: Tensor, initial_gram: Tensor | None, eps: float, fn: str) -> None:
    for name, t in (("q", q), ("k", k)):
        check_floating(t, name, fn=fn)
        check_rank(t, name, 4, fn=fn, layout="(B, H, L, d_k)")
    if q.shape != k.shape:
        raise ShapeError(f"{fn}: q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if initial_gram is not None:
        check_floating(initial_gram, "initial_gram", fn=fn)
        B, H, _, dk = q.shape
        if tuple(initial_gram.shape) != (B, H, dk, dk):
            raise ShapeError(f"{fn}: initial_gram must have shape (B, H, d_k, d_k) = {(B, H, dk, dk)}, "
                             f"got {tuple(initial_gram.shape)}")
    check_float64_mix(("q", q), ("k", k), ("initial_gram", initial_gram), fn=fn)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise MemarchError(f"{fn}: eps must be a finite number > 0, got {eps!r}")


def validate_memory_read(q: Tensor, M: Tensor, fn: str) -> None:
    check_floating(q, "q", fn=fn)
    check_floating(M, "M", fn=fn)
    check_rank(q, "q", 4, fn=fn, layout="(B, H, L, d_k)")
    check_rank(M, "M", 4, fn=fn, layout="(B, H, d_k, d_v)")
    if M.shape[:2] != q.shape[:2] or M.shape[2] != q.shape[3]:
        raise ShapeError(f"{fn}: M must have shape (B, H, d_k, d_v) with (B, H, d_k) = "
                         f"{(q.shape[0], q.shape[1], q.shape[3])}, got {tuple(M.shape)}")
    check_float64_mix(("q", q), ("M", M), fn=fn)


def _zeros_state(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, H, _, dk = k.shape
    M = k.new_zeros(B, H, dk, v.shape[3])  # (B, H, d_k, d_v)
    return M, M.clone()


# ---------------------------------------------------------------------------------------------- math

def normalize_queries(x: Tensor, eps: float = 1e-6) -> Tensor:
    """[TITANS-1] L2-normalise the last dim: x / max(‖x‖, eps)."""
    norm = torch.sqrt((x * x).sum(dim=-1, keepdim=True))
    return x / torch.clamp(norm, min=eps)


def memory_gradient(M: Tensor, k_t: Tensor, v_t: Tensor, global_decay: float = 0.0) -> Tensor:
    """[TITANS-3] ∇_M of ℓ(M; k, v) = ‖kᵀM − vᵀ‖² + (λ/2)‖M‖_F², i.e. 2 k (kᵀM − vᵀ) + λ M.

    M (B, H, d_k, d_v), k_t (B, H, d_k), v_t (B, H, d_v) -> (B, H, d_k, d_v).
    """
    residual = torch.einsum("bhk,bhkv->bhv", k_t, M) - v_t  # kᵀM − vᵀ, (B, H, d_v)
    return 2 * k_t[..., :, None] * residual[..., None, :] + global_decay * M


def titans_memory_recurrent(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                            global_decay: float = 0.0,
                            initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """[TITANS-4] [TITANS-5] [TITANS-6] The per-token recurrence, gradient at the previous state M_{t−1}:

        S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t),   M_t = (1 − α_t) M_{t−1} + S_t,   y_t = q_tᵀ M_t.

    q, k (B, H, L, d_k), v (B, H, L, d_v), alpha/eta/theta (B, H, L) -> y (B, H, L, d_v), M_L, S_L (B, H, d_k, d_v).
    """
    fn = "titans_memory_recurrent"
    validate_memory_inputs(q, k, v, alpha, eta, theta, initial_state, global_decay, fn)
    M, S = initial_state if initial_state is not None else _zeros_state(k, v)
    outputs: list[Tensor] = []
    for t in range(q.shape[2]):
        G = memory_gradient(M, k[:, :, t], v[:, :, t], global_decay)  # ∇ℓ(M_{t−1}), (B, H, d_k, d_v)
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * G  # [TITANS-4]
        M = (1 - alpha[:, :, t, None, None]) * M + S  # [TITANS-5]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], M))  # [TITANS-6] reads M_t
    y = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)  # (B, H, L, d_v)
    return y, M, S


def titans_memory_chunked(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                          chunk_size: int, global_decay: float = 0.0,
                          initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """[TITANS-7] The chunked recurrence: every gradient inside a chunk is taken at the chunk's start state.

    Chunks are positions [nC, (n + 1)C); the last one is shorter when C does not divide L. With C = 1 this is
    [TITANS-4]–[TITANS-6] exactly. Same arguments and outputs as `titans_memory_recurrent`.
    """
    fn = "titans_memory_chunked"
    validate_memory_inputs(q, k, v, alpha, eta, theta, initial_state, global_decay, fn, chunk_size)
    M, S = initial_state if initial_state is not None else _zeros_state(k, v)
    anchor = M
    outputs: list[Tensor] = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            anchor = M  # the chunk's start state M_{nC − 1}
        G = memory_gradient(anchor, k[:, :, t], v[:, :, t], global_decay)  # (B, H, d_k, d_v)
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * G
        M = (1 - alpha[:, :, t, None, None]) * M + S
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], M))
    y = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return y, M, S


def titans_memory_read(q: Tensor, M: Tensor) -> Tensor:
    """[TITANS-9] Read-only retrieval from a frozen memory: y_t = q_tᵀ M for every t (no update).

    q (B, H, L, d_k), M (B, H, d_k, d_v) -> (B, H, L, d_v).
    """
    validate_memory_read(q, M, "titans_memory_read")
    outputs = [torch.einsum("bhk,bhkv->bhv", q[:, :, t], M) for t in range(q.shape[2])]
    return torch.stack(outputs, dim=2) if outputs else q.new_zeros(q.shape[:3] + M.shape[3:])


def qk_projection(q: Tensor, k: Tensor, initial_gram: Tensor | None = None, *, update: bool = True,
                  eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """[TITANS-8] Q-K projection (TNT): project each query onto the span of the keys written so far.

        P_t = P_{t−1} + k_t k_tᵀ (update=True; P frozen otherwise),   q̃_t = P_t q_t / max(‖P_t q_t‖, eps).

    q, k (B, H, L, d_k), initial_gram (B, H, d_k, d_k) or None (zeros) -> q̃ (B, H, L, d_k), P_L.
    """
    validate_qk_projection(q, k, initial_gram, eps, "qk_projection")
    B, H, L, dk = q.shape
    P = initial_gram if initial_gram is not None else q.new_zeros(B, H, dk, dk)  # (B, H, d_k, d_k)
    outputs: list[Tensor] = []
    for t in range(L):
        if update:
            P = P + k[:, :, t, :, None] * k[:, :, t, None, :]
        projected = torch.einsum("bhij,bhj->bhi", P, q[:, :, t])  # P_t q_t, (B, H, d_k)
        outputs.append(normalize_queries(projected, eps))
    q_tilde = torch.stack(outputs, dim=2) if outputs else q.new_zeros(q.shape)
    return q_tilde, P


def titans_learning_rate(theta_hat: Tensor, one_minus_eta: Tensor, chunk_size: int,
                         global_decay: float = 0.0) -> Tensor:
    """[TITANS-2] The step that enters [TITANS-4]/[TITANS-7]: θ = (1 − η) θ̂ / (C (2 + λ)), elementwise.

    θ̂ ∈ (0, 1) is the learnable rate. (1 − η) makes the surprise an exponential moving average of gradients,
    1/C makes a chunk's stale gradients a mean, and 2 + λ is the largest curvature of ℓ for a unit key, so a
    chunk of identical keys removes at most the fraction θ̂ of its error: the update never expands
    (specs/titans.md, "Why θ is normalised").
    """
    return one_minus_eta * theta_hat / (chunk_size * (2.0 + global_decay))


def memory_stats(M: Tensor, S: Tensor) -> dict[str, Tensor]:
    """[TITANS-10] Observability of a state (B, H, d_k, d_v): mean Frobenius norms, entry std and max |entry|."""
    return {
        "M_norm": torch.sqrt((M * M).sum(dim=(-2, -1))).mean().detach(),
        "M_std": M.std(unbiased=False).detach() if M.numel() > 0 else M.new_zeros(()),
        "M_max": M.abs().max().detach() if M.numel() > 0 else M.new_zeros(()),
        "S_norm": torch.sqrt((S * S).sum(dim=(-2, -1))).mean().detach(),
    }


# ---------------------------------------------------------------------------------------------- module

def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class TitansMemory(nn.Module):
    """[TITANS-1] [TITANS-2] [TITANS-11] The memory layer: projections, gates, memory recurrence, read-out.

    forward(x (B, L, D), state=None, *, update=True) -> MemoryOutput(y (B, L, D), final state, stats). With
    `update=False` the memory is read only ([TITANS-9]): the state is returned unchanged. The optimized subclass
    overrides `_recurrence`, `_project` and `_read` only, so both share the gates: `theta_init` is the initial
    learnable rate θ̂, and the step is θ = (1 − η) θ̂ / (C (2 + λ)) (`titans_learning_rate`).
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int, *, chunk_size: int = 16,
                 momentum: float = 0.9, alpha_init: float = 0.01, theta_init: float = 0.1,
                 global_decay: float = 0.0, qk_projection: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        fn = "TitansMemory"
        for name, value in (("dim", dim), ("num_heads", num_heads), ("key_dim", key_dim),
                            ("value_dim", value_dim), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemarchError(f"{fn}: {name} must be an int >= 1, got {value!r}")
        for name, p in (("momentum", momentum), ("alpha_init", alpha_init), ("theta_init", theta_init)):
            if not 0 < p < 1:
                raise MemarchError(f"{fn}: {name} must lie in (0, 1) (a sigmoid gate's initial value), got {p!r}")
        if not (math.isfinite(global_decay) and global_decay >= 0):
            raise MemarchError(f"{fn}: global_decay must be a finite number >= 0, got {global_decay!r}")
        self.dim, self.num_heads, self.key_dim, self.value_dim = dim, num_heads, key_dim, value_dim
        self.chunk_size = chunk_size
        self.global_decay = float(global_decay)
        self.use_qk_projection = qk_projection
        self.eps = eps
        self.q_proj = nn.Linear(dim, num_heads * key_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * key_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_heads * value_dim, bias=False)
        self.alpha_proj = nn.Linear(dim, num_heads)
        self.eta_proj = nn.Linear(dim, num_heads)
        self.theta_proj = nn.Linear(dim, num_heads)
        for proj, p in ((self.alpha_proj, alpha_init), (self.eta_proj, momentum), (self.theta_proj, theta_init)):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.constant_(proj.bias, _logit(p))
        self.out_norm = RMSNorm(value_dim)
        self.o_proj = nn.Linear(num_heads * value_dim, dim, bias=False)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> MemoryState:
        """The empty memory: M = S = 0 (B, H, d_k, d_v), P = 0 (B, H, d_k, d_k)."""
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        M = torch.zeros(batch_size, self.num_heads, self.key_dim, self.value_dim, dtype=dtype, device=device)
        P = torch.zeros(batch_size, self.num_heads, self.key_dim, self.key_dim, dtype=dtype, device=device)
        return MemoryState(M, M.clone(), P)

    def _heads(self, y: Tensor, width: int) -> Tensor:
        """(B, L, H·width) -> (B, H, L, width)."""
        return y.view(y.shape[0], y.shape[1], self.num_heads, width).transpose(1, 2)

    def _recurrence(self, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                    M: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.chunk_size == 1:
            return titans_memory_recurrent(q, k, v, alpha, eta, theta, global_decay=self.global_decay,
                                           initial_state=(M, S))
        return titans_memory_chunked(q, k, v, alpha, eta, theta, chunk_size=self.chunk_size,
                                     global_decay=self.global_decay, initial_state=(M, S))

    def _project(self, q: Tensor, k: Tensor, P: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        return qk_projection(q, k, P, update=update, eps=self.eps)

    def _read(self, q: Tensor, M: Tensor) -> Tensor:
        return titans_memory_read(q, M)

    def forward(self, x: Tensor, state: MemoryState | None = None, *, update: bool = True) -> MemoryOutput:
        fn = "TitansMemory"
        check_floating(x, "x", fn=fn)
        check_rank(x, "x", 3, fn=fn, layout="(B, L, D)")
        if x.shape[2] != self.dim:
            raise ShapeError(f"{fn}: x.shape[2] must be dim={self.dim}, got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        if state is None:
            state = self.init_state(B, dtype=x.dtype, device=x.device)
        elif not isinstance(state, MemoryState):
            raise ShapeError(f"{fn}: state must be a MemoryState (M, S, P) from init_state or a previous forward, "
                             f"got {type(state).__name__}")
        q = normalize_queries(self._heads(self.q_proj(x), self.key_dim), self.eps)  # (B, H, L, d_k)
        k = normalize_queries(self._heads(self.k_proj(x), self.key_dim), self.eps)  # (B, H, L, d_k)
        v = self._heads(self.v_proj(x), self.value_dim)  # (B, H, L, d_v)
        P = state.P
        if self.use_qk_projection:
            q, P = self._project(q, k, P, update)
        if update:
            alpha = torch.sigmoid(self.alpha_proj(x)).transpose(1, 2)  # [TITANS-2] (B, H, L)
            eta_logits = self.eta_proj(x)  # (B, L, H)
            eta = torch.sigmoid(eta_logits).transpose(1, 2)
            theta = titans_learning_rate(torch.sigmoid(self.theta_proj(x)), torch.sigmoid(-eta_logits),  # 1 − η
                                         self.chunk_size, self.global_decay).transpose(1, 2)
            y, M, S = self._recurrence(q, k, v, alpha, eta, theta, state.M, state.S)
            new_state = MemoryState(M, S, P)
        else:
            y = self._read(q, state.M)
            new_state = state
        y = self.out_norm(y).transpose(1, 2).reshape(B, L, self.num_heads * self.value_dim)  # (B, L, H·d_v)
        return MemoryOutput(self.o_proj(y), new_state, memory_stats(new_state.M, new_state.S))
