"""Holographic reduced representations and MAP binding, literally: bind/unbind, inverses, keys, bundling,
RMS normalisation, decay, cleanup and the multi-slot memory (HAMT's HCM, EMMA's VSAMemory).

The math lives in `specs/vsa.md`; each function names its equation IDs. Circular convolution and correlation
are the literal index sums (a loop over the output index), the DFT is the literal sum against its matrix, and the
slot memory loops over time. Everything works in float64. The argument checks (`validate_*`) and the key
generators are shared with `optimized/vsa.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from reference.validation import (
    ConfigError,
    MemarchError,
    ShapeError,
    check_finite,
    check_finite_all,
    check_floating,
    check_in_range,
    check_positive,
    check_same_device,
)

__all__ = [
    "BindMode", "Cleanup", "SlotMemory", "bind", "bundle", "cleanup", "cosine", "decay", "decay_products",
    "decayed_cumsum", "exact_inverse", "hrr_cosine_stats", "hrr_recall_accuracy_bound", "hrr_recall_bound", "identity",
    "involution", "make_unitary", "random_bipolar", "random_hrr", "random_unitary", "rms_normalize", "unbind",
]

BindMode = Literal["circular", "elementwise"]
MODES: tuple[str, ...] = ("circular", "elementwise")
_HALF = (torch.float16, torch.bfloat16)


class Cleanup(NamedTuple):
    """Top-k cleanup result: the k nearest codebook rows (..., k, D), their cosines (..., k), indices (..., k)."""

    vectors: Tensor
    scores: Tensor
    indices: Tensor


# ---------------------------------------------------------------------------------------------- checks

def validate_mode(mode: str, fn: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"{fn}: mode must be one of {MODES}, got {mode!r}")


def validate_vector(x: Tensor, name: str, fn: str) -> None:
    """x must be a floating tensor (..., D) with D >= 1."""
    check_floating(x, name, fn=fn)
    if x.ndim < 1:
        raise ShapeError(f"{fn}: {name} must have at least 1 dimension (..., D), got a 0-dim tensor")
    if x.shape[-1] < 1:
        raise ShapeError(f"{fn}: {name} has D = 0 (shape {tuple(x.shape)}); vectors need D >= 1")


def validate_pair(a: Tensor, b: Tensor, names: tuple[str, str], fn: str) -> None:
    """Two vectors with one last dim D >= 1 and broadcastable leading dims, on one device."""
    validate_vector(a, names[0], fn)
    validate_vector(b, names[1], fn)
    if a.shape[-1] != b.shape[-1]:
        raise ShapeError(f"{fn}: {names[0]} and {names[1]} must have the same last dimension D, got "
                         f"{names[0]}.shape={tuple(a.shape)} and {names[1]}.shape={tuple(b.shape)}")
    try:
        if a.shape[:-1] != b.shape[:-1]:  # broadcast_shapes costs ~20 µs; equal shapes need no call
            torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except RuntimeError:
        raise ShapeError(f"{fn}: the leading dims of {names[0]} {tuple(a.shape)} and {names[1]} "
                         f"{tuple(b.shape)} do not broadcast") from None
    check_same_device((names[0], a), (names[1], b), fn=fn)


def validate_bipolar(key: Tensor, name: str, fn: str) -> None:
    """strict elementwise mode: every entry of the key must be exactly -1 or +1 (one host sync)."""
    bad = ~((key == 1) | (key == -1))
    if bool(bad.any()):
        raise MemarchError(f"{fn}: strict elementwise mode needs a bipolar key {name} with entries in {{-1, +1}}, "
                           f"got {int(bad.sum())} other value(s), e.g. {float(key[bad][0])!r}; use "
                           f"random_bipolar(), torch.sign(), or strict=False")


def validate_bind(a: Tensor, b: Tensor, mode: str, strict: bool, fn: str) -> None:
    """bind(a, b): a is the key (checked bipolar under `strict` in elementwise mode)."""
    validate_mode(mode, fn)
    validate_pair(a, b, ("a", "b"), fn)
    if strict and mode == "elementwise":
        validate_bipolar(a, "a", fn)


def validate_unbind(c: Tensor, a: Tensor, mode: str, strict: bool, fn: str) -> None:
    """unbind(c, a): a is the key (checked bipolar under `strict` in elementwise mode)."""
    validate_mode(mode, fn)
    validate_pair(c, a, ("c", "a"), fn)
    if strict and mode == "elementwise":
        validate_bipolar(a, "a", fn)


def validate_dim(dim: int, fn: str) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ShapeError(f"{fn}: dim (D) must be an int >= 1, got {dim!r}")


# ---------------------------------------------------------------------------------------------- keys

def random_hrr(dim: int, shape: Sequence[int] = (), *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """[VSA-1] HRR vectors (*shape, dim) with i.i.d. N(0, 1/D) entries, drawn from `generator`."""
    validate_dim(dim, "random_hrr")
    x = torch.randn((*shape, dim), generator=generator, dtype=torch.float64 if dtype in _HALF else dtype,
                    device=device)
    return (x / math.sqrt(dim)).to(dtype)


def random_bipolar(dim: int, shape: Sequence[int] = (), *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """[VSA-2] Bipolar (MAP) keys (*shape, dim), entries ±1 with probability 1/2 each."""
    validate_dim(dim, "random_bipolar")
    bits = torch.randint(0, 2, (*shape, dim), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def random_unitary(dim: int, shape: Sequence[int] = (), *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """[VSA-9] Unitary keys: an HRR draw [VSA-1] projected onto |DFT_f| = 1 by `make_unitary`."""
    return make_unitary(random_hrr(dim, shape, generator=generator, dtype=dtype, device=device))


def identity(dim: int, mode: BindMode = "circular", *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
    """[VSA-19] The identity of binding: δ = (1, 0, …, 0) for circular mode, (1, …, 1) for elementwise."""
    validate_dim(dim, "identity")
    validate_mode(mode, "identity")
    if mode == "elementwise":
        return torch.ones(dim, dtype=dtype, device=device)
    e = torch.zeros(dim, dtype=dtype, device=device)
    e[0] = 1
    return e


# ---------------------------------------------------------------------------------------------- binding

def circular_convolution(a: Tensor, b: Tensor) -> Tensor:
    """[VSA-3] c[k] = Σ_j a[j]·b[(k − j) mod D], the literal index sum, one output index per iteration."""
    dim = a.shape[-1]
    j = torch.arange(dim, device=a.device)  # (D,)
    outputs: list[Tensor] = []
    for k in range(dim):
        b_shifted = b[..., (k - j) % dim]  # b[(k − j) mod D] for every j, (..., D)
        outputs.append((a * b_shifted).sum(dim=-1))  # c[k], (...)
    return torch.stack(outputs, dim=-1)  # (..., D)


def circular_correlation(a: Tensor, c: Tensor) -> Tensor:
    """[VSA-6] r[k] = Σ_j a[j]·c[(k + j) mod D] = (a† ⊛ c)[k], the literal index sum."""
    dim = a.shape[-1]
    j = torch.arange(dim, device=a.device)  # (D,)
    outputs: list[Tensor] = []
    for k in range(dim):
        c_shifted = c[..., (k + j) % dim]  # c[(k + j) mod D], (..., D)
        outputs.append((a * c_shifted).sum(dim=-1))  # r[k], (...)
    return torch.stack(outputs, dim=-1)  # (..., D)


def bind(a: Tensor, b: Tensor, mode: BindMode = "circular", *, strict: bool = False) -> Tensor:
    """[VSA-3] circular convolution a ⊛ b, or [VSA-4] the elementwise (MAP) product a ⊙ b; over the last dim,
    broadcasting the leading dims. `a` is the key: with `strict` in elementwise mode it must be bipolar.
    Laws [VSA-19]: commutative, associative, distributes over bundling, identity(dim, mode) is neutral."""
    validate_bind(a, b, mode, strict, "bind")
    if mode == "elementwise":
        return a * b  # [VSA-4]
    return circular_convolution(a, b)


def unbind(c: Tensor, a: Tensor, mode: BindMode = "circular", *, strict: bool = False) -> Tensor:
    """[VSA-6] circular correlation a† ⊛ c (retrieves b from c = a ⊛ b; exact for unitary a), or [VSA-6a]
    c ⊙ a (exact for bipolar a). `a` is the key: with `strict` in elementwise mode it must be bipolar."""
    validate_unbind(c, a, mode, strict, "unbind")
    if mode == "elementwise":
        return c * a  # [VSA-6a]
    return circular_correlation(a, c)


def involution(a: Tensor) -> Tensor:
    """[VSA-5] The approximate inverse a†[k] = a[(−k) mod D]."""
    validate_vector(a, "a", "involution")
    dim = a.shape[-1]
    index = (-torch.arange(dim, device=a.device)) % dim  # (D,)
    return a[..., index]


# ---------------------------------------------------------------------------------------------- DFT, inverses

def dft(a: Tensor) -> Tensor:
    """[VSA-7] A_f = Σ_k a_k·exp(−2πi·f·k/D) for f = 0 … D − 1, as a sum against the DFT matrix (complex)."""
    dim = a.shape[-1]
    fk = torch.outer(torch.arange(dim), torch.arange(dim)) % dim  # f·k mod D, exact integers (D, D)
    angle = (2 * math.pi / dim) * fk.to(torch.float64)  # (D, D)
    cos, sin = torch.cos(angle).to(a.dtype).to(a.device), torch.sin(angle).to(a.dtype).to(a.device)
    real = (a[..., None, :] * cos).sum(dim=-1)  # Σ_k a_k cos(2πfk/D), (..., D)
    imag = -(a[..., None, :] * sin).sum(dim=-1)  # −Σ_k a_k sin(2πfk/D), (..., D)
    return torch.complex(real, imag)


def idft_real(spectrum: Tensor) -> Tensor:
    """[VSA-7] a_k = (1/D)·Re Σ_f A_f·exp(+2πi·f·k/D), the inverse DFT of a Hermitian spectrum."""
    dim = spectrum.shape[-1]
    fk = torch.outer(torch.arange(dim), torch.arange(dim)) % dim  # (D, D), rows k, columns f
    angle = (2 * math.pi / dim) * fk.to(torch.float64)
    real_dtype = spectrum.real.dtype
    cos, sin = torch.cos(angle).to(real_dtype).to(spectrum.device), torch.sin(angle).to(real_dtype).to(spectrum.device)
    return ((spectrum.real[..., None, :] * cos).sum(-1) - (spectrum.imag[..., None, :] * sin).sum(-1)) / dim


def exact_inverse(a: Tensor, eps: float = 1e-12) -> Tensor:
    """[VSA-8] a⁻¹ with DFT conj(A_f)/(|A_f|² + eps): bind(a⁻¹, a) = δ up to eps/|A_f|² per frequency."""
    validate_vector(a, "a", "exact_inverse")
    check_positive(eps, "eps", fn="exact_inverse", allow_zero=True)
    spectrum = dft(a)  # (..., D) complex
    power = spectrum.real**2 + spectrum.imag**2  # |A_f|²
    inverse = torch.conj(spectrum) / (power + eps)
    return idft_real(inverse)


def make_unitary(a: Tensor) -> Tensor:
    """[VSA-9] Project a onto the unitary vectors: DFT A_f/|A_f| (1 where A_f = 0), so a† = a⁻¹ exactly."""
    validate_vector(a, "a", "make_unitary")
    spectrum = dft(a)  # (..., D)
    magnitude = torch.sqrt(spectrum.real**2 + spectrum.imag**2)
    nonzero = magnitude > 0
    safe = torch.where(nonzero, magnitude, torch.ones_like(magnitude))
    phase = torch.where(nonzero, spectrum / safe, torch.ones_like(spectrum))
    return idft_real(phase)


# ---------------------------------------------------------------------------------------------- traces

def bundle(vectors: Tensor, weights: Tensor | None = None, *, dim: int = -2) -> Tensor:
    """[VSA-10] Superposition Σ_i w_i·x_i of the items along `dim` of vectors (..., N, D) (weights (N,) or 1)."""
    validate_vector(vectors, "vectors", "bundle")
    if vectors.ndim < 2:
        raise ShapeError(f"bundle: vectors must have at least 2 dims (..., N, D), got shape {tuple(vectors.shape)}")
    axis = dim % vectors.ndim
    if axis == vectors.ndim - 1:
        raise ShapeError(f"bundle: dim={dim} is the vector dim D; bundle along an item dim instead")
    count = vectors.shape[axis]
    if weights is not None:
        check_floating(weights, "weights", fn="bundle")
        if tuple(weights.shape) != (count,):
            raise ShapeError(f"bundle: weights must have shape ({count},) (one per item along dim {dim}), "
                             f"got {tuple(weights.shape)}")
    total = torch.zeros_like(vectors.select(axis, 0)) if count else vectors.sum(dim=axis)
    for i in range(count):
        item = vectors.select(axis, i)  # x_i, (..., D)
        total = total + (item if weights is None else weights[i] * item)
    return total


def rms_normalize(trace: Tensor, eps: float = 1e-6, *, check: bool = True) -> Tensor:
    """[VSA-11] trace / sqrt(mean_d trace_d² + eps): RMS 1 over the last dim (norm √D)."""
    validate_vector(trace, "trace", "rms_normalize")
    check_positive(eps, "eps", fn="rms_normalize", allow_zero=True)
    if check:
        check_finite(trace, "trace", fn="rms_normalize")
    mean_square = (trace * trace).mean(dim=-1, keepdim=True)  # (..., 1)
    return trace / torch.sqrt(mean_square + eps)


def decay(trace: Tensor, lam: float | Tensor, *, check: bool = True) -> Tensor:
    """[VSA-12] Passive decay trace ← λ·trace, λ in [0, 1] (a float, or a tensor over the leading dims)."""
    validate_vector(trace, "trace", "decay")
    if isinstance(lam, Tensor):
        check_floating(lam, "lam", fn="decay")
        try:
            torch.broadcast_shapes(lam.shape, trace.shape[:-1])
        except RuntimeError:
            raise ShapeError(f"decay: lam of shape {tuple(lam.shape)} must broadcast against the leading dims "
                             f"{tuple(trace.shape[:-1])} of trace {tuple(trace.shape)}") from None
        factor = lam[..., None]
    else:
        check_in_range(float(lam), "lam", 0.0, 1.0, fn="decay")
        factor = lam  # type: ignore[assignment]
    if check:
        check_finite(trace, "trace", fn="decay")
    return trace * factor


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """[VSA-13] cos(a, b) = ⟨a, b⟩ / max(‖a‖·‖b‖, eps) over the last dim, broadcasting."""
    validate_pair(a, b, ("a", "b"), "cosine")
    dot = (a * b).sum(dim=-1)
    norms = torch.sqrt((a * a).sum(dim=-1)) * torch.sqrt((b * b).sum(dim=-1))
    return dot / torch.clamp(norms, min=eps)


def validate_cleanup(query: Tensor, codebook: Tensor, k: int, fn: str) -> None:
    validate_vector(query, "query", fn)
    validate_vector(codebook, "codebook", fn)
    if codebook.ndim != 2:
        raise ShapeError(f"{fn}: codebook must have 2 dims (N, D), got shape {tuple(codebook.shape)}")
    if query.shape[-1] != codebook.shape[-1]:
        raise ShapeError(f"{fn}: query and codebook must have the same last dimension D, got "
                         f"query.shape={tuple(query.shape)} and codebook.shape={tuple(codebook.shape)}")
    check_same_device(("query", query), ("codebook", codebook), fn=fn)
    if not isinstance(k, int) or not 1 <= k <= codebook.shape[0]:
        raise ConfigError(f"{fn}: k must be an int in [1, N={codebook.shape[0]}] (codebook rows), got {k!r}")


def cleanup(query: Tensor, codebook: Tensor, k: int = 1, *, check: bool = True) -> Cleanup:
    """[VSA-13] Cleanup memory: the k codebook rows (N, D) nearest to query (..., D) by cosine, best first."""
    validate_cleanup(query, codebook, k, "cleanup")
    if check:
        check_finite_all(("query", query), ("codebook", codebook), fn="cleanup")
    scores = torch.stack([cosine(query, codebook[i]) for i in range(codebook.shape[0])], dim=-1)  # (..., N)
    top, indices = torch.topk(scores, k, dim=-1)  # (..., k) each
    return Cleanup(codebook[indices], top, indices)


# ---------------------------------------------------------------------------------------------- capacity

def hrr_cosine_stats(num_pairs: int, dim: int) -> tuple[float, float]:
    """[VSA-17] Mean 1/√(k+1) and standard deviation √(2·v(k)/D), v(k) = 1/2 − 1/(k+1) + 2/(k+1)³, of the
    retrieval cosine cos(a_i† ⊛ Σ_j a_j ⊛ b_j, b_i) for k HRR pairs (delta method)."""
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ConfigError(f"hrr_cosine_stats: num_pairs must be an int >= 1, got {num_pairs!r}")
    validate_dim(dim, "hrr_cosine_stats")
    q = num_pairs + 1
    variance = 0.5 - 1.0 / q + 2.0 / q**3
    return 1.0 / math.sqrt(q), math.sqrt(2.0 * variance / dim)


def hrr_recall_bound(num_pairs: int, dim: int, delta: float = 0.01) -> float:
    """[VSA-17] cos(a_i† ⊛ Σ_j a_j ⊛ b_j, b_i) ≥ μ − √((1 − δ)/δ)·σ with probability ≥ 1 − δ (Cantelli)."""
    check_in_range(delta, "delta", 0.0, 1.0, fn="hrr_recall_bound", low_inclusive=False, high_inclusive=False)
    mean, sd = hrr_cosine_stats(num_pairs, dim)
    return mean - math.sqrt((1.0 - delta) / delta) * sd


def hrr_recall_accuracy_bound(num_pairs: int, dim: int, num_candidates: int) -> float:
    """[VSA-18] Expected cleanup accuracy among N candidates ≥ 1 − min_t [1/(1+t²) + (N−1)/(1+t'²)],
    t' = (μ − t·σ)/σ_x, σ_x² = (k+2)/((k+1)·D); 0 when the bound is vacuous."""
    if not isinstance(num_candidates, int) or num_candidates < 1:
        raise ConfigError(f"hrr_recall_accuracy_bound: num_candidates must be an int >= 1, got {num_candidates!r}")
    mean, sd = hrr_cosine_stats(num_pairs, dim)
    sd_other = math.sqrt((num_pairs + 2) / ((num_pairs + 1) * dim))
    best = 1.0
    for i in range(1, 2000):  # grid over the split t·σ + t'·σ_x = μ
        t = (mean / sd) * i / 2000
        t_other = (mean - t * sd) / sd_other
        best = min(best, 1.0 / (1.0 + t * t) + (num_candidates - 1) / (1.0 + t_other * t_other))
    return max(0.0, 1.0 - best)


# ---------------------------------------------------------------------------------------------- slot memory

def as_slot_vectors(x: Tensor, name: str, lead: tuple[int, ...], num_slots: int, dim: int, fn: str) -> Tensor:
    """x (*lead, D) shared by all slots or (*lead, S, D) per slot -> (*lead, S or 1, D)."""
    check_floating(x, name, fn=fn)
    if tuple(x.shape) == (*lead, dim):
        return x.unsqueeze(-2)
    if tuple(x.shape) != (*lead, num_slots, dim):
        raise ShapeError(f"{fn}: {name} must have shape {(*lead, dim)} (shared by the slots) or "
                         f"{(*lead, num_slots, dim)} (one per slot), got {tuple(x.shape)}")
    return x


def as_slot_scalars(x: Tensor, name: str, lead: tuple[int, ...], num_slots: int, fn: str) -> Tensor:
    """x (*lead,) shared by all slots or (*lead, S) per slot -> (*lead, S or 1)."""
    check_floating(x, name, fn=fn)
    if tuple(x.shape) == lead:
        return x.unsqueeze(-1)
    if tuple(x.shape) != (*lead, num_slots):
        raise ShapeError(f"{fn}: {name} must have shape {lead} (shared by the slots) or {(*lead, num_slots)} "
                         f"(one per slot), got {tuple(x.shape)}")
    return x


def validate_decayed_cumsum(u: Tensor, lam: Tensor, state: Tensor | None, chunk_size: int, fn: str) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")
    check_floating(u, "u", fn=fn)
    if u.ndim != 4:
        raise ShapeError(f"{fn}: u must have 4 dims (B, L, S, X), got shape {tuple(u.shape)}")
    check_floating(lam, "lam", fn=fn)
    if tuple(lam.shape) != tuple(u.shape[:3]):
        raise ShapeError(f"{fn}: lam must have shape (B, L, S) = {tuple(u.shape[:3])}, got {tuple(lam.shape)}")
    if state is not None:
        check_floating(state, "state", fn=fn)
        want = (u.shape[0], u.shape[2], u.shape[3])
        if tuple(state.shape) != want:
            raise ShapeError(f"{fn}: state must have shape (B, S, X) = {want}, got {tuple(state.shape)}")


def validate_decay_products(lam: Tensor, fn: str) -> None:
    check_floating(lam, "lam", fn=fn)
    if lam.ndim < 1 or lam.shape[-1] < 1:
        raise ShapeError(f"{fn}: lam must have a last dim of C >= 1 steps (..., C), got shape {tuple(lam.shape)}")


def decay_products(lam: Tensor) -> tuple[Tensor, Tensor]:
    """[VSA-16a] The products of [VSA-16] over one chunk of C decays λ (..., C): W (..., C, C) with
    W_tr = Π_{j=r+1..t} λ_j for t ≥ r (1 on the diagonal, 0 above) and P (..., C) with P_t = Π_{j≤t} λ_j, as
    literal products."""
    validate_decay_products(lam, "decay_products")
    steps = lam.shape[-1]
    zero = torch.zeros_like(lam[..., 0])
    W = torch.stack([torch.stack([torch.prod(lam[..., r + 1:t + 1], dim=-1) if r <= t else zero
                                  for r in range(steps)], dim=-1) for t in range(steps)], dim=-2)
    P = torch.stack([torch.prod(lam[..., :t + 1], dim=-1) for t in range(steps)], dim=-1)
    return W, P


def decayed_cumsum(u: Tensor, lam: Tensor, state: Tensor | None = None, *, chunk_size: int = 64) -> Tensor:
    """[VSA-16] Every state of M_t = λ_t·M_{t−1} + u_t, t = 1 … L (M_0 = state or 0): u (B, L, S, X),
    λ (B, L, S) -> (B, L, S, X). The loop is the recurrence [VSA-14]; its closed form is [VSA-16].
    `chunk_size` is the optimized form's chunk length (its two chunk schedules: [VSA-16b]); the literal loop
    ignores it."""
    validate_decayed_cumsum(u, lam, state, chunk_size, "decayed_cumsum")
    M = u.new_zeros((u.shape[0], u.shape[2], u.shape[3])) if state is None else state  # (B, S, X)
    states: list[Tensor] = []
    for t in range(u.shape[1]):
        M = lam[:, t, :, None] * M + u[:, t]
        states.append(M)
    if not states:
        return u.new_zeros(u.shape)
    return torch.stack(states, dim=1)


class SlotMemory(nn.Module):
    """[VSA-14] [VSA-15] Multi-slot holographic memory: S traces of dimension D per sequence, written with
    gated bound pairs and passive decay, read by unbinding (HAMT's HCM; EMMA's VSAMemory is S = 1).

    No parameters: keys, values, queries, gates and data-dependent decays come from the model. Decay is the
    constant `decay` unless a tensor is passed per call. `normalize_read` RMS-normalises each read [VSA-11].
    `check_state` checks a passed-in state for NaN/inf (one host sync per call). `chunk_size` is the chunk length
    of the optimized parallel form (it does not change the result).
    """

    def __init__(self, dim: int, num_slots: int = 1, *, mode: BindMode = "circular", decay: float = 1.0,
                 normalize_read: bool = False, eps: float = 1e-6, strict: bool = False, check_state: bool = True,
                 chunk_size: int = 64) -> None:
        super().__init__()
        validate_dim(dim, "SlotMemory")
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ConfigError(f"SlotMemory: num_slots must be an int >= 1, got {num_slots!r}")
        validate_mode(mode, "SlotMemory")
        check_in_range(decay, "decay", 0.0, 1.0, fn="SlotMemory")
        check_positive(eps, "eps", fn="SlotMemory", allow_zero=True)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"SlotMemory: chunk_size must be an int >= 1, got {chunk_size!r}")
        self.dim, self.num_slots, self.mode, self.decay = dim, num_slots, mode, float(decay)
        self.normalize_read, self.eps, self.strict = normalize_read, eps, strict
        self.check_state, self.chunk_size = check_state, chunk_size

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_slots={self.num_slots}, mode={self.mode!r}, decay={self.decay}, "
                f"normalize_read={self.normalize_read}")

    def init_state(self, batch_size: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
        """The empty memory M_0 = 0, (B, S, D)."""
        return torch.zeros(batch_size, self.num_slots, self.dim, dtype=dtype, device=device)

    # -- checks shared with optimized.vsa.SlotMemory

    def check_memory(self, state: Tensor, fn: str, batch: int | None = None) -> None:
        check_floating(state, "state", fn=fn)
        if state.ndim != 3 or state.shape[1:] != (self.num_slots, self.dim) or (
                batch is not None and state.shape[0] != batch):
            b = "B" if batch is None else batch
            raise ShapeError(f"{fn}: state must have shape ({b}, S={self.num_slots}, D={self.dim}), "
                             f"got {tuple(state.shape)}")
        if self.check_state:
            check_finite(state, "state", fn=fn)

    def slot_inputs(self, lead: tuple[int, ...], fn: str, key: Tensor, value: Tensor, gate: Tensor | None,
                    decay: Tensor | None, names: tuple[str, str] = ("key", "value")
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Shapes checked and slots made explicit: key, value (*lead, S|1, D); gate, decay (*lead, S|1)."""
        k = as_slot_vectors(key, names[0], lead, self.num_slots, self.dim, fn)
        v = as_slot_vectors(value, names[1], lead, self.num_slots, self.dim, fn)
        if self.strict and self.mode == "elementwise":
            validate_bipolar(k, names[0], fn)
        g = None if gate is None else as_slot_scalars(gate, "gate", lead, self.num_slots, fn)
        lam = None if decay is None else as_slot_scalars(decay, "decay", lead, self.num_slots, fn)
        return k, v, g, lam

    def sequence_inputs(self, keys: Tensor, values: Tensor, queries: Tensor, gate: Tensor | None,
                        decay: Tensor | None, state: Tensor | None, fn: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        check_floating(keys, "keys", fn=fn)
        if keys.ndim not in (3, 4):
            raise ShapeError(f"{fn}: keys must have shape (B, L, D) or (B, L, S, D), got {tuple(keys.shape)}")
        lead = (keys.shape[0], keys.shape[1])
        k, v, g, lam = self.slot_inputs(lead, fn, keys, values, gate, decay, ("keys", "values"))
        q = as_slot_vectors(queries, "queries", lead, self.num_slots, self.dim, fn)
        if state is not None:
            self.check_memory(state, fn, batch=lead[0])
        return k, v, q, g, lam, state

    # -- the recurrence, one step at a time

    def bind_pairs(self, k: Tensor, v: Tensor) -> Tensor:
        """[VSA-3] / [VSA-4] bind(k, v) in this memory's mode (the hot path the optimized class replaces)."""
        return bind(k, v, self.mode)

    def unbind_pairs(self, state: Tensor, q: Tensor) -> Tensor:
        """[VSA-6] / [VSA-6a] unbind(M, q) in this memory's mode (the hot path the optimized class replaces)."""
        return unbind(state, q, self.mode)

    def write(self, state: Tensor, key: Tensor, value: Tensor, gate: Tensor | None = None,
              decay: Tensor | None = None) -> Tensor:
        """[VSA-14] M_t = λ_t·M_{t−1} + g_t·bind(k_t, v_t) per slot. state (B, S, D); key, value (B, D) or
        (B, S, D); gate, decay (B,) or (B, S) (default 1 and the module's `decay`). Returns the new state."""
        self.check_memory(state, "SlotMemory.write")
        k, v, g, lam = self.slot_inputs((state.shape[0],), "SlotMemory.write", key, value, gate, decay)
        bound = self.bind_pairs(k, v)  # (B, S|1, D)
        written = bound if g is None else g[..., None] * bound  # (B, S, D)
        kept = self.decay * state if lam is None else lam[..., None] * state  # (B, S, D)
        return kept + written

    def read(self, state: Tensor, query: Tensor) -> Tensor:
        """[VSA-15] r_t = unbind(M_t, q_t) per slot (RMS-normalised with `normalize_read`): (B, S, D)."""
        self.check_memory(state, "SlotMemory.read")
        q = as_slot_vectors(query, "query", (state.shape[0],), self.num_slots, self.dim, "SlotMemory.read")
        r = self.unbind_pairs(state, q)  # (B, S, D)
        return rms_normalize(r, self.eps, check=False) if self.normalize_read else r

    def forward(self, keys: Tensor, values: Tensor, queries: Tensor, gate: Tensor | None = None,
                decay: Tensor | None = None, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[VSA-14] [VSA-15] Write then read at every step t = 1 … L: keys, values, queries (B, L, D) or
        (B, L, S, D); gate, decay (B, L) or (B, L, S). Returns reads (B, L, S, D) and the last state (B, S, D).
        The read at t sees the writes up to and including t (causal); equals the closed form [VSA-16]."""
        reads, M = self.forward_many(keys, values, (queries,), gate, decay, state)
        return reads[0], M

    def forward_many(self, keys: Tensor, values: Tensor, queries: Sequence[Tensor], gate: Tensor | None = None,
                     decay: Tensor | None = None, state: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """`forward` with several query sequences read from the same writes (HAMT's read and its reconstruction
        read [HAMT-10]): one reads tensor (B, L, S, D) per query sequence, and the last state."""
        if not queries:
            raise ShapeError("SlotMemory.forward_many: queries must hold at least one query sequence")
        self.sequence_inputs(keys, values, queries[0], gate, decay, state, "SlotMemory.forward")
        batch, length = keys.shape[0], keys.shape[1]
        for q in queries[1:]:
            as_slot_vectors(q, "queries", (batch, length), self.num_slots, self.dim, "SlotMemory.forward")
        M = self.init_state(batch, dtype=keys.dtype, device=keys.device) if state is None else state
        reads: list[list[Tensor]] = [[] for _ in queries]
        for t in range(length):
            M = self.write(M, keys[:, t], values[:, t], None if gate is None else gate[:, t],
                           None if decay is None else decay[:, t])
            for out, q in zip(reads, queries, strict=True):
                out.append(self.read(M, q[:, t]))
        if length == 0:
            return [keys.new_zeros(batch, 0, self.num_slots, self.dim) for _ in queries], M
        return [torch.stack(r, dim=1) for r in reads], M
