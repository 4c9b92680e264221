"""Titans matrix memory, fast: the chunked recurrence in parallel (matmul) form.

Implements `reference.titans.titans_memory_chunked` (and `titans_memory_recurrent` as its chunk = 1 case) and
`reference.titans.qk_projection` / `titans_memory_read`. Method (`specs/titans.md`, "The parallel chunk form"):
inside a chunk every gradient is taken at the chunk's start state (M₀, S₀), so with a_i = 1 − α_i,
A_i = Π_{j≤i} a_j, E_i = Π_{j≤i} η_j (log-space cumulative sums) and the lower-triangular decay matrices
Lα[i, m] = A_i / A_m, Lη[m, j] = E_m / E_j (every entry ≤ 1, formed as exp of differences, so nothing overflows):

    W = Lα Lη diag(θ)            s = Lα E            R = K M₀ − V   (C, d_v)
    M_i = (A_i − λ Σ_j W_ij) M₀ + s_i S₀ − 2 Σ_j W_ij k_j R_j
    S_C = E_C S₀ − λ (Σ_j u_j) M₀ − 2 Σ_j u_j k_j R_j,    u_j = (E_C / E_j) θ_j
    y = diag(A − λ W1) Q M₀ + diag(s) Q S₀ − 2 (W ⊙ Q Kᵀ) R.

Everything that does not depend on the state is computed for all chunks at once (`chunk_coefficients`). The
chunk-to-chunk state passing is sequential; `titans_dispatch` names the branch that runs it:

- ``triton`` (CUDA tensors in float32/float16/bfloat16, Triton importable, d_k ≤ 256, C ≤ 128):
  `optimized/kernels/titans.py`, one program per (batch·head, block of value columns) holding its columns of
  M and S in registers over a loop over chunks, writing y as it goes; the state-independent part of
  y = (diag(m) Q − 2 (W ⊙ QKᵀ) K) M₀ + diag(s) Q S₀ + 2 (W ⊙ QKᵀ) V is precomputed in batched matmuls.
  Gradients: a Triton kernel walks the chunks in reverse (`optimized.kernels.titans`); the batched parts through
  torch autograd.
- ``torch-chunked`` (CPU, float64, anything else): `torch_chunked`, a Python loop over chunks (two small
  matmuls each, never a loop over tokens); outputs are then formed for all chunks at once.

A length that C does not divide ends with one shorter chunk (on the Triton branch, by the torch form from the
kernel's final state).

Tolerance against the float64 reference: float64 1e-10; float32 1e-5 relative on short sequences (model
tolerances over long scans), on both branches (the kernel's float32 dots are exact float32, no TF32);
bfloat16 inputs: the torch form computes in float32, the kernel multiplies in bfloat16 with float32
accumulation and a float32 state (5e-2 at model level); under `torch.autocast` the matmuls follow autocast
(bfloat16) while the state stays float32. The gates, including the normalised step
θ = (1 − η) θ̂ / (C (2 + λ)) ([TITANS-2]), come from the shared `TitansMemory.forward`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from optimized.kernels import kernel_available
from optimized.primitives import RMSNorm
from reference import titans as ref
from reference.titans import (
    MemoryOutput,
    MemoryState,
    memory_gradient,
    memory_stats,
    normalize_queries,
    titans_learning_rate,
    validate_memory_inputs,
    validate_memory_read,
    validate_qk_projection,
)
from reference.validation import MemarchError

__all__ = [
    "MemoryOutput",
    "MemoryState",
    "TitansMemory",
    "memory_gradient",
    "memory_stats",
    "normalize_queries",
    "qk_projection",
    "titans_dispatch",
    "titans_learning_rate",
    "titans_memory_chunked",
    "titans_memory_read",
    "titans_memory_recurrent",
]

LOG_FLOOR = -60.0  # log(1 − α) and log η are clamped here: gates of exactly 0 (η) or 1 (α) stay finite
KERNEL_MAX_DK = 256  # the Triton kernel holds (d_k × BLOCK_V) states and (C × d_k) key tiles in registers
KERNEL_MAX_CHUNK = 128
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _decay_matrix(cum: Tensor) -> Tensor:
    """exp(cum_i − cum_j) for j ≤ i, else 0: (..., C) -> (..., C, C); entries ≤ 1 for non-increasing cum."""
    C = cum.shape[-1]
    mask = torch.ones(C, C, dtype=torch.bool, device=cum.device).tril()
    diff = cum[..., :, None] - cum[..., None, :]
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def chunk_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, C: int,
                       lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The state-independent coefficients of the parallel form over L = N·C positions (C divides L), gates
    (B, H, L) -> W (B, H, N, C, C), the M₀ coefficient A − λ W1, s = Lα E, u = (E_C / E_j) θ_j (each
    (B, H, N, C)) and E_C (B, H, N). Shared by the torch loop below and the Triton kernel."""
    B, H, L = theta.shape
    N = L // C
    th = theta.reshape(B, H, N, C)
    cum_a = torch.cumsum(torch.log1p(-alpha).clamp_min(LOG_FLOOR).reshape(B, H, N, C), dim=-1)  # log A_i
    cum_e = torch.cumsum(torch.log(eta).clamp_min(LOG_FLOOR).reshape(B, H, N, C), dim=-1)  # log E_i
    L_a = _decay_matrix(cum_a)  # (B, H, N, C, C)
    L_e = _decay_matrix(cum_e)
    W = (L_a @ L_e) * th[..., None, :]  # (B, H, N, C, C)
    A = torch.exp(cum_a)  # (B, H, N, C)
    s = (L_a @ torch.exp(cum_e)[..., None])[..., 0]  # (B, H, N, C)
    m_coef = A - lam * W.sum(dim=-1)  # coefficient of M₀ in M_i
    u = L_e[..., -1, :] * th  # (B, H, N, C)
    e_last = torch.exp(cum_e[..., -1])  # (B, H, N)
    return W, m_coef, s, u, e_last


def _chunks(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, M: Tensor, S: Tensor,
            C: int, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """The parallel form over L = N·C positions (C divides L); returns y (B, H, L, d_v) and the final M, S."""
    B, H, L, dk = k.shape
    dv = v.shape[-1]
    N = L // C
    Q = q.reshape(B, H, N, C, dk)
    K = k.reshape(B, H, N, C, dk)
    V = v.reshape(B, H, N, C, dv)
    W, m_coef, s, u, e_last = chunk_coefficients(alpha, eta, theta, C, lam)
    w_last = W[..., -1, :]
    m_last, s_last, u_sum = m_coef[..., -1], s[..., -1], u.sum(dim=-1)
    starts_M: list[Tensor] = []
    starts_S: list[Tensor] = []
    residuals: list[Tensor] = []
    # Per-chunk views by one `unbind` each: indexing [:, :, n] inside the loop would make autograd zero-fill a
    # full-size gradient per chunk (N² work in backward); unbind's backward stacks once.
    per_chunk = zip(K.unbind(2), V.unbind(2), w_last.unbind(2), u.unbind(2), m_last.unbind(2), s_last.unbind(2),
                    e_last.unbind(2), u_sum.unbind(2), strict=True)
    for K_n, V_n, w_n, u_n, m_n, s_n, e_n, us_n in per_chunk:  # state passing: a loop over chunks
        starts_M.append(M)
        starts_S.append(S)
        R = K_n @ M - V_n  # (B, H, C, d_v)
        residuals.append(R)
        weighted = torch.cat([w_n[..., None] * R, u_n[..., None] * R], dim=-1)  # (B, H, C, 2d_v)
        update = K_n.transpose(-1, -2) @ weighted  # (B, H, d_k, 2d_v)
        M_next = m_n[..., None, None] * M + s_n[..., None, None] * S - 2 * update[..., :dv]
        S = e_n[..., None, None] * S - (lam * us_n[..., None, None]) * M - 2 * update[..., dv:]
        M = M_next
    M0 = torch.stack(starts_M, dim=2)  # (B, H, N, d_k, d_v)
    S0 = torch.stack(starts_S, dim=2)
    Rs = torch.stack(residuals, dim=2)  # (B, H, N, C, d_v)
    scores = W * (Q @ K.transpose(-1, -2))  # (B, H, N, C, C)
    y = m_coef[..., None] * (Q @ M0) + s[..., None] * (Q @ S0) - 2 * (scores @ Rs)  # (B, H, N, C, d_v)
    return y.reshape(B, H, L, dv), M, S


def titans_dispatch(k: Tensor, *, chunk_size: int) -> str:
    """The branch `titans_memory_chunked` takes for keys like `k` (B, H, L, d_k): "triton" (CUDA, Triton
    importable, float32/float16/bfloat16, d_k ≤ KERNEL_MAX_DK, chunk ≤ KERNEL_MAX_CHUNK) or "torch-chunked"."""
    if (kernel_available(k, "titans") and k.dtype in _KERNEL_DTYPES and k.shape[-1] <= KERNEL_MAX_DK
            and chunk_size <= KERNEL_MAX_CHUNK):
        return "triton"
    return "torch-chunked"


def torch_chunked(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                  chunk_size: int, global_decay: float = 0.0,
                  initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The torch method of `titans_memory_chunked` (inputs already validated); the Triton branch's backward
    differentiates it."""
    out_dtype = v.dtype
    work = _compute_dtype(out_dtype)
    B, H, L, dk = k.shape
    dv = v.shape[-1]
    if initial_state is None:
        M = torch.zeros(B, H, dk, dv, dtype=work, device=k.device)
        S = torch.zeros_like(M)
    else:
        M, S = initial_state[0].to(work), initial_state[1].to(work)
    q, k, v, alpha, eta, theta = (t.to(work) for t in (q, k, v, alpha, eta, theta))
    C = min(chunk_size, max(L, 1))
    main = (L // C) * C
    pieces: list[Tensor] = []
    lam = float(global_decay)
    if main > 0:
        y, M, S = _chunks(q[:, :, :main], k[:, :, :main], v[:, :, :main], alpha[:, :, :main], eta[:, :, :main],
                          theta[:, :, :main], M, S, C, lam)
        pieces.append(y)
    if main < L:  # the last, shorter chunk
        y, M, S = _chunks(q[:, :, main:], k[:, :, main:], v[:, :, main:], alpha[:, :, main:], eta[:, :, main:],
                          theta[:, :, main:], M, S, L - main, lam)
        pieces.append(y)
    y = torch.cat(pieces, dim=2) if pieces else v.new_zeros(B, H, 0, dv, dtype=work)
    return y.to(out_dtype), M.to(out_dtype), S.to(out_dtype)


def titans_memory_chunked(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                          chunk_size: int, global_decay: float = 0.0,
                          initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`reference.titans.titans_memory_chunked` in parallel chunk form, dispatched by `titans_dispatch` (see the
    module docstring)."""
    validate_memory_inputs(q, k, v, alpha, eta, theta, initial_state, global_decay, "titans_memory_chunked",
                           chunk_size)
    if titans_dispatch(k, chunk_size=chunk_size) == "triton":
        from optimized.kernels.titans import titans_memory_triton_autograd

        return titans_memory_triton_autograd(q, k, v, alpha, eta, theta, chunk_size=chunk_size,
                                             global_decay=global_decay, initial_state=initial_state)
    return torch_chunked(q, k, v, alpha, eta, theta, chunk_size=chunk_size, global_decay=global_decay,
                         initial_state=initial_state)


def titans_memory_recurrent(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                            global_decay: float = 0.0,
                            initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`reference.titans.titans_memory_recurrent`: the chunked parallel form with chunk 1, which is exact."""
    return titans_memory_chunked(q, k, v, alpha, eta, theta, chunk_size=1, global_decay=global_decay,
                                 initial_state=initial_state)


def titans_memory_read(q: Tensor, M: Tensor) -> Tensor:
    """`reference.titans.titans_memory_read` as one batched matmul."""
    validate_memory_read(q, M, "titans_memory_read")
    return q @ M


def qk_projection(q: Tensor, k: Tensor, initial_gram: Tensor | None = None, *, update: bool = True,
                  eps: float = 1e-6, block: int = 64) -> tuple[Tensor, Tensor]:
    """`reference.titans.qk_projection` as chunked causal linear attention with values = keys.

    P_t q_t = P₀ q_t + Σ_{i≤t} (q_t·k_i) k_i: within a block a masked (QKᵀ) K product, across blocks the
    exclusive cumulative sum of the blocks' key Grams. Same tolerances as the memory.
    """
    validate_qk_projection(q, k, initial_gram, eps, "qk_projection")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise MemarchError(f"qk_projection: block must be an int >= 1, got {block!r}")
    B, H, L, dk = q.shape
    P0 = initial_gram if initial_gram is not None else q.new_zeros(B, H, dk, dk)
    if not update or L == 0:
        return normalize_queries(q @ P0.transpose(-1, -2), eps), P0  # rows (P₀ q_t)ᵀ
    C = min(block, L)
    pad = (-L) % C
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad))
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))  # zero keys add nothing to P
    N = (L + pad) // C
    Qb = qp.reshape(B, H, N, C, dk)
    Kb = kp.reshape(B, H, N, C, dk)
    grams = Kb.transpose(-1, -2) @ Kb  # (B, H, N, d_k, d_k)
    inclusive = torch.cumsum(grams, dim=2)
    before = P0[:, :, None] + inclusive - grams  # the Gram of everything before block n
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    intra = ((Qb @ Kb.transpose(-1, -2)) * mask) @ Kb  # (B, H, N, C, d_k)
    projected = (Qb @ before.transpose(-1, -2) + intra).reshape(B, H, N * C, dk)[:, :, :L]
    return normalize_queries(projected, eps), P0 + inclusive[:, :, -1]


class TitansMemory(ref.TitansMemory):
    """`reference.titans.TitansMemory` with the parallel chunk form, chunked Q-K projection and matmul reads."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int, *, chunk_size: int = 16,
                 momentum: float = 0.9, alpha_init: float = 0.01, theta_init: float = 0.1,
                 global_decay: float = 0.0, qk_projection: bool = True, eps: float = 1e-6) -> None:
        super().__init__(dim, num_heads, key_dim, value_dim, chunk_size=chunk_size, momentum=momentum,
                         alpha_init=alpha_init, theta_init=theta_init, global_decay=global_decay,
                         qk_projection=qk_projection, eps=eps)
        self.out_norm = RMSNorm(value_dim, eps=self.out_norm.eps)  # same parameter, fast kernel

    def _recurrence(self, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                    M: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return titans_memory_chunked(q, k, v, alpha, eta, theta, chunk_size=self.chunk_size,
                                     global_decay=self.global_decay, initial_state=(M, S))

    def _project(self, q: Tensor, k: Tensor, P: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        return qk_projection(q, k, P, update=update, eps=self.eps)

    def _read(self, q: Tensor, M: Tensor) -> Tensor:
        return titans_memory_read(q, M)
