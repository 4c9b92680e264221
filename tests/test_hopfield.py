"""Modern Hopfield memory ([HOP-1] … [HOP-4]): optimized ≡ reference (fused and chunked, float64/float32, values
and gradients), the update never raises the energy (CCCP), the energy is non-negative, Ramsauer's retrieval bound
holds and a corrupted query is retrieved once β is as large as the bound asks, written patterns, bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.hopfield as opt
import reference.hopfield as ref
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.equivalence import assert_equivalent, assert_modules_equivalent
from tests.strategies import make_tensor, seeds

CHUNKS = pytest.mark.parametrize("chunk", [None, 1, 3, 64], ids=["fused", "chunk1", "chunk3", "chunk64"])


@CHUNKS
@given(seed=seeds, n=st.integers(1, 6), m=st.integers(1, 9), d=st.integers(1, 8),
       beta=st.sampled_from([0.5, 2.0, 8.0]))
def test_optimized_retrieve_matches_reference_float64(chunk: int | None, seed: int, n: int, m: int, d: int,
                                                      beta: float) -> None:
    xi, X = make_tensor((2, n, d), seed), make_tensor((m, d), seed + 1)
    assert_equivalent(partial(ref.hopfield_retrieve, beta=beta),
                      partial(opt.hopfield_retrieve, beta=beta, chunk_size=chunk), [xi, X])


@CHUNKS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_optimized_retrieve_and_energy_match_reference_per_dtype(chunk: int | None, dtype: torch.dtype) -> None:
    xi, X = make_tensor((5, 7), 1), make_tensor((11, 7), 2)
    assert_equivalent(partial(ref.hopfield_retrieve, beta=2.0),
                      partial(opt.hopfield_retrieve, beta=2.0, chunk_size=chunk), [xi, X], dtype=dtype)
    assert_equivalent(partial(ref.hopfield_energy, beta=2.0),
                      partial(opt.hopfield_energy, beta=2.0, chunk_size=chunk or 4), [xi, X], dtype=dtype)


@given(seed=seeds, beta=st.sampled_from([0.25, 1.0, 4.0]))
def test_optimized_memory_module_matches_reference(seed: int, beta: float) -> None:
    torch.manual_seed(seed)
    r = ref.HopfieldMemory(9, 6, beta)
    o = opt.HopfieldMemory(9, 6, beta)
    o.chunk_size = 4
    xi = make_tensor((3, 2, 6), seed)
    assert_modules_equivalent(r, o, [xi], model=False)
    o.twice_differentiable = True  # the chunked form
    assert_modules_equivalent(r, o, [xi], model=False)


def test_chunked_retrieval_is_twice_differentiable() -> None:
    X = make_tensor((10, 4), 0).requires_grad_(True)
    xi = make_tensor((3, 4), 1).requires_grad_(True)
    for fn in (ref.hopfield_retrieve, partial(opt.hopfield_retrieve, chunk_size=3)):
        (g,) = torch.autograd.grad(fn(xi, X, 2.0).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), X)
        assert torch.isfinite(gg).all() and gg.abs().sum() > 0


@given(seed=seeds, m=st.integers(1, 12), d=st.integers(1, 8), beta=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
       scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_update_never_raises_the_energy(seed: int, m: int, d: int, beta: float, scale: float) -> None:
    """[HOP-2] CCCP: E(ξ_new) ≤ E(ξ) for every query (Ramsauer Theorem 1); [HOP-1] E ≥ 0."""
    X, xi = make_tensor((m, d), seed, scale=scale), make_tensor((16, d), seed + 1, scale=2 * scale)
    E0 = ref.hopfield_energy(xi, X, beta)
    E1 = ref.hopfield_energy(ref.hopfield_retrieve(xi, X, beta), X, beta)
    assert (E1 <= E0 + 1e-12 * (1 + E0.abs())).all()
    assert (E0 >= -1e-12).all() and (E1 >= -1e-12).all()


@given(seed=seeds, m=st.integers(2, 16), d=st.integers(8, 32), noise=st.sampled_from([0.0, 0.02, 0.05]),
       beta=st.sampled_from([1.0, 4.0, 16.0, 64.0]))
def test_retrieval_error_respects_ramsauer_bound(seed: int, m: int, d: int, noise: float, beta: float) -> None:
    """[HOP-3] ‖ξ_new − x_i‖ ≤ 2m(M−1)exp(−β(Δ_i − 2m‖ξ − x_i‖)) for every query and β."""
    X = torch.nn.functional.normalize(make_tensor((m, d), seed), dim=-1)
    i = seed % m
    xi = X[i] + noise * make_tensor((d,), seed + 1)
    err = torch.linalg.vector_norm(ref.hopfield_retrieve(xi, X, beta) - X[i])
    assert err <= ref.retrieval_error_bound(X, i, xi, beta) * (1 + 1e-9) + 1e-12


@given(seed=seeds, m=st.integers(2, 32), d=st.integers(16, 64), noise=st.sampled_from([0.02, 0.05, 0.1]))
def test_corrupted_query_is_retrieved_when_beta_meets_the_bound(seed: int, m: int, d: int, noise: float) -> None:
    """[HOP-3] With Δ_i > 2m‖ξ − x_i‖ and β ≥ log(2m(M−1)/δ)/(Δ_i − 2m‖ξ − x_i‖), one update lands within δ of x_i
    and x_i is the nearest stored pattern; at β → 0 the update returns the mean instead (not x_i)."""
    X = torch.nn.functional.normalize(make_tensor((m, d), seed), dim=-1)
    i = seed % m
    corruption = make_tensor((d,), seed + 1)
    xi = X[i] + noise * corruption / torch.linalg.vector_norm(corruption)
    m_norm = float(torch.linalg.vector_norm(X, dim=-1).max())
    gap = float(ref.separation(X, i)) - 2 * m_norm * noise
    if gap <= 0:
        return  # the bound promises nothing for this draw
    delta = 1e-3
    beta = math.log(2 * m_norm * (m - 1) / delta) / gap
    for impl in (ref.hopfield_retrieve, opt.hopfield_retrieve):
        out = impl(xi, X, beta)
        assert float(torch.linalg.vector_norm(out - X[i])) <= delta * (1 + 1e-9)
        assert int(torch.argmin(torch.linalg.vector_norm(X - out, dim=-1))) == i


def test_written_patterns_are_stored_and_retrieved() -> None:
    mem = ref.HopfieldMemory(8, 16, beta=50.0, learnable=False)
    assert "patterns" in dict(mem.named_buffers()) and not list(mem.parameters())
    P = torch.nn.functional.normalize(make_tensor((3, 16), 0, dtype=torch.float32), dim=-1)
    mem.write(P, start=2)
    assert torch.equal(mem.patterns[2:5], P)
    assert torch.allclose(mem.retrieve(P + 0.01), P, atol=1e-3)
    learn = opt.HopfieldMemory(8, 16)
    assert list(learn.state_dict()) == list(mem.state_dict()) == ["patterns"]


def test_bad_input_raises_named_errors() -> None:
    X = make_tensor((4, 3), 0)
    with pytest.raises(ShapeError, match="xi must be"):
        ref.hopfield_retrieve(make_tensor((2, 5), 1), X, 1.0)
    with pytest.raises(ShapeError, match="xi must be"):
        opt.hopfield_energy(make_tensor((2, 5), 1), X, 1.0)
    with pytest.raises(ConfigError, match="beta must be"):
        opt.hopfield_retrieve(make_tensor((2, 3), 1), X, 0.0)
    with pytest.raises(DTypeError):
        ref.hopfield_retrieve(torch.ones(2, 3, dtype=torch.long), X, 1.0)
    with pytest.raises(ShapeError, match="stored patterns"):
        ref.hopfield_energy(make_tensor((2, 3), 1), make_tensor((3,), 0), 1.0)
    with pytest.raises(ConfigError, match="memory_size must be"):
        ref.HopfieldMemory(0, 4)
    with pytest.raises(ShapeError, match="slots"):
        ref.HopfieldMemory(2, 3).write(make_tensor((3, 3), 0, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 512])
def test_cuda_retrieval_and_energy_match_reference(dtype: torch.dtype, chunk: int | None) -> None:
    """Entries N(0, 1/8), so ‖ξ‖, ‖x‖ ≈ 2.8 and β·xᵀξ spans about ±20. The softmax's sensitivity to a score
    error grows like β‖x‖‖ξ‖: with N(0, 1) entries (β·xᵀξ up to ≈ ±60) a float32 rounding of the scores alone
    moves the input gradient by ~1e-4 and bf16 by ~0.4 in any implementation (measured on CPU), which no
    per-dtype tolerance for a well-conditioned op covers."""
    xi, X = make_tensor((4096, 64), 0) * 8 ** -0.5, make_tensor((5000, 64), 1) * 8 ** -0.5
    assert_equivalent(partial(ref.hopfield_retrieve, beta=2.0),
                      partial(opt.hopfield_retrieve, beta=2.0, chunk_size=chunk), [xi, X], dtype=dtype,
                      device="cuda")
    assert_equivalent(partial(ref.hopfield_energy, beta=2.0),
                      partial(opt.hopfield_energy, beta=2.0, chunk_size=chunk or 1024), [xi, X], dtype=dtype,
                      device="cuda")
