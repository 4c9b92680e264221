"""Holographic / VSA memory, fast: the API of `reference/vsa.py` through the convolution theorem.

Binding is `irfft(rfft(a)·rfft(b))` (O(D log D) instead of the literal O(D²) sum), unbinding multiplies by the
conjugate spectrum, inverses and unitary projection act on the rfft spectrum, and the slot memory runs a whole
sequence at once: one rfft of all keys, values and queries, the decayed cumulative sum of the bound spectra in
chunks (a masked (C, C) product-of-decays matrix per chunk, one state carried across chunks), one irfft of all
reads. Spectra are computed from the operands' own shapes before broadcasting, so binding many keys against
many values (e.g. `bind(keys[:, None], values[None])`) transforms each operand once. On CUDA, float32 operands of
one shape with D a power of two from 512 to 8192 take a fused kernel instead (`optimized/kernels/hrr_bind.cu`:
one read of each operand, one write; specs/vsa.md).

`identity`, `involution`, `cosine`, `decay`, `rms_normalize`, the generators and the capacity bounds are
re-exported from the reference unchanged (already vectorised, no loop). `bind_dispatch` names the path taken.

Tolerances against the float64 reference (tests/tolerances.py): float64 1e-10, float32 1e-5 relative, bfloat16
1e-2. Under float16/bfloat16 inputs the transforms and scans run in float32 and results are cast back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from optimized.kernels.hrr_bind import fused_bind, fused_bind_supported
from reference import vsa as ref
from reference.validation import ShapeError, check_finite_all, check_floating, check_positive
from reference.vsa import (
    BindMode,
    Cleanup,
    as_slot_vectors,
    cosine,
    decay,
    hrr_cosine_stats,
    hrr_recall_accuracy_bound,
    hrr_recall_bound,
    identity,
    involution,
    random_bipolar,
    random_hrr,
    rms_normalize,
    validate_bind,
    validate_cleanup,
    validate_decay_products,
    validate_decayed_cumsum,
    validate_unbind,
    validate_vector,
)

__all__ = [
    "BindMode", "Cleanup", "SlotMemory", "bind", "bind_dispatch", "bundle", "cleanup", "cosine", "decay",
    "decay_products", "decayed_cumsum", "exact_inverse", "hrr_cosine_stats", "hrr_recall_accuracy_bound",
    "hrr_recall_bound", "identity", "involution", "make_unitary", "random_bipolar", "random_hrr", "random_unitary",
    "rms_normalize", "unbind",
]

_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (torch.fft has no bf16, and we accumulate in fp32), the input dtype otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def bind_dispatch(a: Tensor, b: Tensor, mode: str = "circular") -> str:
    """The code path `bind`/`unbind` take for these operands: "elementwise", "cuda-fused" (CUDA float32 operands
    of one shape with D a power of two from 512 to 8192, where the kernel builds: `optimized.kernels.hrr_bind`)
    or "torch.fft"."""
    if mode == "elementwise":
        return "elementwise"
    return "cuda-fused" if a.is_cuda and fused_bind_supported(a, b) else "torch.fft"


def fft_bind(a: Tensor, b: Tensor, *, conjugate_a: bool = False) -> Tensor:
    """a ⊛ b (or a† ⊛ b with `conjugate_a`), broadcasting the leading dims: the fused CUDA kernel where it takes
    the operands, else rfft/irfft."""
    if a.is_cuda and fused_bind_supported(a, b):
        return fused_bind(a, b, conjugate_a)
    return torch_fft_bind(a, b, conjugate_a=conjugate_a)


def torch_fft_bind(a: Tensor, b: Tensor, *, conjugate_a: bool = False) -> Tensor:
    """`fft_bind` through torch.fft on every device (rfft, product, irfft), broadcasting the leading dims."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)  # dtypes, not torch.result_type: a graph break under compile
    work = _work_dtype(out_dtype)
    dim = a.shape[-1]
    spectrum_a = torch.fft.rfft(a.to(work), dim=-1)  # (..., D//2 + 1) complex
    spectrum_b = torch.fft.rfft(b.to(work), dim=-1)
    if conjugate_a:
        spectrum_a = spectrum_a.conj()
    return torch.fft.irfft(spectrum_a * spectrum_b, n=dim, dim=-1).to(out_dtype)


def bind(a: Tensor, b: Tensor, mode: BindMode = "circular", *, strict: bool = False) -> Tensor:
    """Implements `reference.vsa.bind`: circular mode by the convolution theorem (rfft·rfft → irfft),
    elementwise mode as a ⊙ b. Tolerances: float64 1e-10, float32 1e-5, bf16 1e-2."""
    validate_bind(a, b, mode, strict, "bind")
    if mode == "elementwise":
        return a * b
    return fft_bind(a, b)


def unbind(c: Tensor, a: Tensor, mode: BindMode = "circular", *, strict: bool = False) -> Tensor:
    """Implements `reference.vsa.unbind`: circular correlation as irfft(conj(rfft(a))·rfft(c)), elementwise as
    c ⊙ a. Tolerances as `bind`."""
    validate_unbind(c, a, mode, strict, "unbind")
    if mode == "elementwise":
        return c * a
    return fft_bind(a, c, conjugate_a=True)


def exact_inverse(a: Tensor, eps: float = 1e-12) -> Tensor:
    """Implements `reference.vsa.exact_inverse` on the rfft spectrum: irfft(conj(A)/(|A|² + eps)).
    Tolerances: float64 1e-10, float32 1e-5 (for well-conditioned spectra)."""
    validate_vector(a, "a", "exact_inverse")
    check_positive(eps, "eps", fn="exact_inverse", allow_zero=True)
    work = _work_dtype(a.dtype)
    spectrum = torch.fft.rfft(a.to(work), dim=-1)
    power = spectrum.real**2 + spectrum.imag**2
    return torch.fft.irfft(spectrum.conj() / (power + eps), n=a.shape[-1], dim=-1).to(a.dtype)


def make_unitary(a: Tensor) -> Tensor:
    """Implements `reference.vsa.make_unitary` on the rfft spectrum: irfft(A/|A|), 1 where A = 0.
    Tolerances as `bind`."""
    validate_vector(a, "a", "make_unitary")
    work = _work_dtype(a.dtype)
    spectrum = torch.fft.rfft(a.to(work), dim=-1)
    magnitude = spectrum.abs()
    nonzero = magnitude > 0
    safe = torch.where(nonzero, magnitude, torch.ones_like(magnitude))
    phase = torch.where(nonzero, spectrum / safe, torch.ones_like(spectrum))
    return torch.fft.irfft(phase, n=a.shape[-1], dim=-1).to(a.dtype)


def random_unitary(dim: int, shape: tuple[int, ...] | list[int] = (), *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Implements `reference.vsa.random_unitary` (the same draws) with the rfft `make_unitary`."""
    return make_unitary(random_hrr(dim, shape, generator=generator, dtype=dtype, device=device))


def bundle(vectors: Tensor, weights: Tensor | None = None, *, dim: int = -2) -> Tensor:
    """Implements `reference.vsa.bundle` as one (weighted) reduction. Tolerances as `bind`."""
    validate_vector(vectors, "vectors", "bundle")
    if vectors.ndim < 2:
        raise ShapeError(f"bundle: vectors must have at least 2 dims (..., N, D), got shape {tuple(vectors.shape)}")
    axis = dim % vectors.ndim
    if axis == vectors.ndim - 1:
        raise ShapeError(f"bundle: dim={dim} is the vector dim D; bundle along an item dim instead")
    if weights is None:
        return vectors.sum(dim=axis)
    check_floating(weights, "weights", fn="bundle")
    if tuple(weights.shape) != (vectors.shape[axis],):
        raise ShapeError(f"bundle: weights must have shape ({vectors.shape[axis]},) (one per item along dim {dim}), "
                         f"got {tuple(weights.shape)}")
    view = [1] * vectors.ndim
    view[axis] = -1
    return (vectors * weights.view(view)).sum(dim=axis)


def cleanup(query: Tensor, codebook: Tensor, k: int = 1, *, check: bool = True) -> Cleanup:
    """Implements `reference.vsa.cleanup` with one matmul of the query against the codebook, then topk.
    Tolerances as `bind` (indices equal except at exact ties)."""
    validate_cleanup(query, codebook, k, "cleanup")
    if check:
        check_finite_all(("query", query), ("codebook", codebook), fn="cleanup")
    dots = query @ codebook.T  # (..., N)
    norms = torch.linalg.vector_norm(query, dim=-1, keepdim=True) * torch.linalg.vector_norm(codebook, dim=-1)
    scores = dots / torch.clamp(norms, min=1e-12)
    top, indices = torch.topk(scores, k, dim=-1)
    return Cleanup(codebook[indices], top, indices)


class _DecayProducts(torch.autograd.Function):
    """[VSA-16a] λ (..., C) -> (W (..., C, C), P (..., C)). The forward is two cumprods (W: down the rows of the
    (C, C) matrix holding λ_t strictly below the diagonal, masked to the lower triangle); the backward is the
    spec's division-free gradient, because torch's cumprod backward asks the device whether λ has a zero (a host
    sync per call: two per chunk of every memory pass)."""

    @staticmethod
    def forward(ctx: Any, lam: Tensor) -> tuple[Tensor, Tensor]:
        steps = lam.shape[-1]
        t = torch.arange(steps, device=lam.device)
        after = t[:, None] > t[None, :]  # (C, C): row t strictly after column r
        factors = torch.where(after, lam[..., :, None], torch.ones((), dtype=lam.dtype, device=lam.device))
        W = torch.cumprod(factors, dim=-2).tril()
        P = torch.cumprod(lam, dim=-1)
        ctx.save_for_backward(W, P)
        return W, P

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_W: Tensor, grad_P: Tensor) -> Tensor:
        W, P = ctx.saved_tensors
        X = grad_W @ W.transpose(-1, -2)  # X_{t,i} = Σ_r ḡ_W,tr W_ir
        grad = torch.zeros_like(P)
        grad[..., 1:] = (W[..., :, 1:] * X[..., :, :-1]).sum(dim=-2)
        P_before = torch.cat([torch.ones_like(P[..., :1]), P[..., :-1]], dim=-1)  # P_{j−1}
        return grad + P_before * (W * grad_P[..., :, None]).sum(dim=-2)


def decay_products(lam: Tensor) -> tuple[Tensor, Tensor]:
    """Implements `reference.vsa.decay_products` ([VSA-16a]) by `_DecayProducts`: no host sync in backward.
    Tolerances: float64 1e-10, float32 1e-5."""
    validate_decay_products(lam, "decay_products")
    return _decay_products(lam)


def _decay_products(lam: Tensor) -> tuple[Tensor, Tensor]:
    """`decay_products` on validated input (the chunk loop's hot path)."""
    apply = cast(Callable[[Tensor], tuple[Tensor, Tensor]], _DecayProducts.apply)
    return apply(lam)


_CUMSUM_METHODS = ("auto", "loop", "batched")


def _cumsum_method(device: torch.device) -> str:
    """How `decayed_cumsum` runs on `device`: `MEMARCH_DECAYED_CUMSUM` = loop | batched | auto (default: batched
    off the CPU, where the chunk loop's dozens of small launches per chunk bound a batch-1 step, and the loop on the
    CPU, where the batched form's full-size passes measured 1.3–1.7× slower than cache-resident chunks)."""
    choice = os.environ.get("MEMARCH_DECAYED_CUMSUM", "auto")
    if choice not in _CUMSUM_METHODS:
        raise ValueError(f"MEMARCH_DECAYED_CUMSUM must be one of {', '.join(_CUMSUM_METHODS)}, got {choice!r}")
    if choice == "auto":
        return "loop" if device.type == "cpu" else "batched"
    return choice


def decayed_cumsum(u: Tensor, lam: Tensor, state: Tensor | None = None, *, chunk_size: int = 64) -> Tensor:
    """Implements `reference.vsa.decayed_cumsum` in chunks of C steps: inside a chunk every state is
    P_t·M_0 + Σ_{r≤t} W_{tr}·u_r with W_{tr} = Π_{j=r+1..t} λ_j (a cumprod of a masked (C, C) matrix, exact for
    λ = 0) and P_t = Π_{j≤t} λ_j (`decay_products`, whose backward needs no host sync). Two schedules
    ([VSA-16b], `_cumsum_method`): the loop carries each chunk's last state to the next (L/C iterations); the
    batched form computes every chunk at once from a zero state, gets the chunks' entry states by the same sum over
    the L/C chunk ends (recursively, ⌈log_C L⌉ levels), and adds P_t times the entry state.
    Tolerances: float64 1e-10, float32 1e-5; fp32 under half inputs."""
    validate_decayed_cumsum(u, lam, state, chunk_size, "decayed_cumsum")
    out_dtype = u.dtype
    work = _work_dtype(out_dtype)
    batch, length, slots, width = u.shape
    M = u.new_zeros((batch, slots, width), dtype=work) if state is None else state.to(work)  # (B, S, X)
    if length == 0:
        return u.new_zeros(u.shape)
    if _cumsum_method(u.device) == "batched":
        return _batched_cumsum(u.to(work), lam.to(work), M, chunk_size).to(out_dtype)
    chunks: list[Tensor] = []
    # `split`, not slicing in the loop: a slice's backward zero-fills a gradient of u's full size per chunk
    # (L²/C work), split's backward concatenates once.
    for u_c, lam_c in zip(u.split(chunk_size, dim=1), lam.split(chunk_size, dim=1), strict=True):
        u_c = u_c.to(work)  # (B, C, S, X)
        lam_c = lam_c.to(work).transpose(1, 2)  # (B, S, C)
        W, P = _decay_products(lam_c)  # (B, S, C, C), (B, S, C)
        M_c = torch.einsum("bstr,brsx->btsx", W, u_c) + P.transpose(1, 2)[..., None] * M[:, None]
        chunks.append(M_c)
        M = M_c[:, -1].clone()  # a view would keep every chunk's M_c alive (saved for backward) past the cat
    return torch.cat(chunks, dim=1).to(out_dtype)


def _batched_cumsum(u: Tensor, lam: Tensor, M0: Tensor, chunk_size: int) -> Tensor:
    """[VSA-16b] every state of M_t = λ_t M_{t−1} + u_t with all chunks at once: u (B, L, S, X), λ (B, L, S),
    M0 (B, S, X), one dtype. A fixed number of launches per level instead of per chunk."""
    batch, length, slots, width = u.shape
    C = min(max(chunk_size, 2), length)  # 1-step chunks would leave as many chunk ends as steps: no progress
    n = -(-length // C)  # chunks
    pad = n * C - length
    if pad:  # padded steps (u = 0, λ = 1) come after every real one, so they change no real state
        u = torch.nn.functional.pad(u, (0, 0, 0, 0, 0, pad))
        lam = torch.nn.functional.pad(lam, (0, 0, 0, pad), value=1.0)
    W, P = _decay_products(lam.reshape(batch, n, C, slots).permute(0, 3, 1, 2))  # (B, S, n, C, C), (B, S, n, C)
    # slot-major (B, S, n, C, X): the batched product's own layout, so its output needs no permuting copy
    local = torch.einsum("bsntr,bnrsx->bsntx", W, u.reshape(batch, n, C, slots, width))  # zero entry state
    if n == 1:
        entry = M0[:, :, None]  # (B, S, 1, X)
    else:  # state after chunk m = P_m,last · (state after chunk m−1) + local_m,last: the same sum, n steps long
        ends = _batched_cumsum(local[:, :, :, -1].transpose(1, 2), P[..., -1].transpose(1, 2), M0, chunk_size)
        entry = torch.cat([M0[:, None], ends[:, :-1]], dim=1).transpose(1, 2)  # chunks' entry states, (B, S, n, X)
    states = local + P[..., None] * entry[:, :, :, None]  # (B, S, n, C, X)
    states = states.reshape(batch, slots, n * C, width).transpose(1, 2)  # (B, L, S, X) as a strided view
    return states[:, :length] if pad else states


class SlotMemory(ref.SlotMemory):
    """`reference.vsa.SlotMemory` with FFT binding per step and a parallel sequence form: one rfft of all keys,
    values and queries, `decayed_cumsum` over the bound spectra (real and imaginary parts stacked), one irfft of
    all reads. Tolerances: float64 1e-10, float32 1e-5 (MODEL tolerances for long sequences), bf16 5e-2."""

    def bind_pairs(self, k: Tensor, v: Tensor) -> Tensor:
        return bind(k, v, self.mode)

    def unbind_pairs(self, state: Tensor, q: Tensor) -> Tensor:
        return unbind(state, q, self.mode)

    def forward(self, keys: Tensor, values: Tensor, queries: Tensor, gate: Tensor | None = None,
                decay: Tensor | None = None, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        reads, final = self.forward_many(keys, values, (queries,), gate, decay, state)
        return reads[0], final

    def forward_many(self, keys: Tensor, values: Tensor, queries: Sequence[Tensor], gate: Tensor | None = None,
                     decay: Tensor | None = None, state: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Implements `reference.vsa.SlotMemory.forward_many`: the states (or spectra) once, then one read per
        query sequence."""
        if not queries:
            raise ShapeError("SlotMemory.forward_many: queries must hold at least one query sequence")
        k, v, q, g, lam, state = self.sequence_inputs(keys, values, queries[0], gate, decay, state,
                                                      "SlotMemory.forward")
        batch, length = keys.shape[0], keys.shape[1]
        qs = [q] + [as_slot_vectors(x, "queries", (batch, length), self.num_slots, self.dim, "SlotMemory.forward")
                    for x in queries[1:]]
        slots, dim = self.num_slots, self.dim
        out_dtype = torch.promote_types(keys.dtype, values.dtype)
        for query in queries:
            out_dtype = torch.promote_types(out_dtype, query.dtype)
        work = _work_dtype(out_dtype)
        M0 = self.init_state(batch, dtype=work, device=keys.device) if state is None else state.to(work)
        if length == 0:
            return [keys.new_zeros(batch, 0, slots, dim, dtype=out_dtype) for _ in qs], M0.to(out_dtype)
        lam_full = (torch.full((batch, length, slots), self.decay, dtype=work, device=keys.device) if lam is None
                    else lam.to(work).expand(batch, length, slots))  # (B, L, S)
        if self.mode == "elementwise":
            u = k.to(work) * v.to(work)  # (B, L, S|1, D)
            if g is not None:
                u = g.to(work)[..., None] * u
            states = decayed_cumsum(u.expand(batch, length, slots, dim), lam_full, M0,
                                    chunk_size=self.chunk_size)  # (B, L, S, D)
            reads = [states * q.to(work) for q in qs]
            final = states[:, -1]
        else:
            freqs = dim // 2 + 1
            U = torch.fft.rfft(k.to(work), dim=-1) * torch.fft.rfft(v.to(work), dim=-1)  # (B, L, S|1, F)
            if g is not None:
                U = g.to(work)[..., None] * U
            U = U.expand(batch, length, slots, freqs)
            spectrum0 = torch.fft.rfft(M0, dim=-1)  # (B, S, F)
            stacked = decayed_cumsum(torch.cat([U.real, U.imag], dim=-1), lam_full,
                                     torch.cat([spectrum0.real, spectrum0.imag], dim=-1),
                                     chunk_size=self.chunk_size)  # (B, L, S, 2F)
            spectra = torch.complex(stacked[..., :freqs], stacked[..., freqs:])  # M̂_t, (B, L, S, F)
            # conj(Q_t)·M̂_t per query sequence (B, L, S, D)
            reads = [torch.fft.irfft(torch.fft.rfft(q.to(work), dim=-1).conj() * spectra, n=dim, dim=-1) for q in qs]
            final = torch.fft.irfft(spectra[:, -1], n=dim, dim=-1)  # (B, S, D)
        if self.normalize_read:
            reads = [rms_normalize(r, self.eps, check=False) for r in reads]
        return [r.to(out_dtype) for r in reads], final.to(out_dtype)

