"""Titans memory: the per-token and chunked recurrences, their parallel form, the Q-K projection, the module."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optimized import titans as opt
from reference import titans as ref
from reference.validation import MemarchError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_close_scaled, assert_equivalent, assert_modules_equivalent
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance

F64 = torch.float64


def memory_inputs(seed: int, B: int, H: int, L: int, dk: int, dv: int, *,
                  dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    """q, k (unit keys as in the model), v, gates in (0, 1), and an initial state (M0, S0)."""
    q = make_tensor((B, H, L, dk), seed, dtype=dtype)
    k = ref.normalize_queries(make_tensor((B, H, L, dk), seed + 1, dtype=dtype))
    v = make_tensor((B, H, L, dv), seed + 2, dtype=dtype)
    gates = [make_tensor((B, H, L), seed + 3 + i, dtype=dtype, distribution="uniform").abs() * 0.98 + 0.01
             for i in range(3)]
    M0 = make_tensor((B, H, dk, dv), seed + 6, dtype=dtype, scale=0.3)
    S0 = make_tensor((B, H, dk, dv), seed + 7, dtype=dtype, scale=0.3)
    return (q, k, v, *gates, M0, S0)


sizes = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 13), st.integers(1, 5), st.integers(1, 5))


def chunked(module: object, C: int, lam: float):  # type: ignore[no-untyped-def]
    def fn(q, k, v, a, e, th, M0, S0):  # type: ignore[no-untyped-def]
        return module.titans_memory_chunked(q, k, v, a, e, th, chunk_size=C, global_decay=lam,  # type: ignore[attr-defined]
                                            initial_state=(M0, S0))
    return fn


@given(seed=seeds, size=sizes, lam=st.sampled_from([0.0, 0.25]))
def test_chunk_one_equals_the_per_token_recurrence(seed: int, size: tuple[int, ...], lam: float) -> None:
    q, k, v, a, e, th, M0, S0 = memory_inputs(seed, *size)
    per_token = ref.titans_memory_recurrent(q, k, v, a, e, th, global_decay=lam, initial_state=(M0, S0))
    chunk_one = ref.titans_memory_chunked(q, k, v, a, e, th, chunk_size=1, global_decay=lam, initial_state=(M0, S0))
    for x, y in zip(per_token, chunk_one, strict=True):
        assert torch.equal(x, y)
    fast = opt.titans_memory_chunked(q, k, v, a, e, th, chunk_size=1, global_decay=lam, initial_state=(M0, S0))
    for i, (x, y) in enumerate(zip(fast, per_token, strict=True)):
        assert_close_scaled(x, y, tolerance(F64), f"optimized chunk=1 output[{i}]")


@given(seed=seeds, size=sizes, chunk=st.integers(1, 15), lam=st.sampled_from([0.0, 0.25]))
def test_optimized_chunked_equals_reference_chunked_in_float64_with_gradients(
        seed: int, size: tuple[int, ...], chunk: int, lam: float) -> None:
    inputs = memory_inputs(seed, *size)  # chunk is drawn independently of L: it may not divide L, or exceed it
    assert_equivalent(chunked(ref, chunk, lam), chunked(opt, chunk, lam), inputs, dtype=F64, seed=seed)


@given(seed=seeds, chunk=st.sampled_from([1, 3, 4]))
def test_optimized_chunked_in_float32_matches_float64_reference(seed: int, chunk: int) -> None:
    inputs = memory_inputs(seed, 2, 2, 10, 4, 3)
    assert_equivalent(chunked(ref, chunk, 0.1), chunked(opt, chunk, 0.1), inputs, dtype=torch.float32,
                      model=True, seed=seed)


def test_chunking_changes_the_algorithm() -> None:
    """Chunk 1 and chunk 4 differ (gradients at the chunk start), so the equivalence tests are not vacuous."""
    q, k, v, a, e, th, _, _ = memory_inputs(0, 1, 1, 8, 3, 3)
    y1, _, _ = ref.titans_memory_chunked(q, k, v, a, e, th, chunk_size=1)
    y4, _, _ = ref.titans_memory_chunked(q, k, v, a, e, th, chunk_size=4)
    assert torch.equal(y1[:, :, 0], y4[:, :, 0])  # the first token's gradient is at M0 either way
    assert float((y1 - y4).abs().max()) > 1e-3


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_no_retention_and_no_momentum_is_plain_online_gradient_descent(impl: object) -> None:
    """α = 0, η = 0: M_t = M_{t−1} − θ_t ∇_M ‖kᵀM − v‖², the gradient taken by autograd in a hand-rolled loop."""
    q, k, v, _, _, th, M0, _ = memory_inputs(5, 2, 2, 9, 4, 3)
    zeros = torch.zeros_like(th)
    y, M_L, _ = impl.titans_memory_recurrent(q, k, v, zeros, zeros, th,  # type: ignore[attr-defined]
                                             initial_state=(M0, torch.zeros_like(M0)))
    M = M0.clone()
    expected = []
    for t in range(q.shape[2]):
        Mg = M.detach().requires_grad_(True)
        loss = ((torch.einsum("bhk,bhkv->bhv", k[:, :, t], Mg) - v[:, :, t]) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, Mg)  # per (b, h) the loss terms are independent
        M = M - th[:, :, t, None, None] * grad
        expected.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], M))
    assert_close_scaled(y, torch.stack(expected, dim=2), tolerance(F64), "outputs")
    assert_close_scaled(M_L, M, tolerance(F64), "final memory")


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_memory_is_causal(impl: object, chunk: int) -> None:
    q, k, v, a, e, th, _, _ = memory_inputs(11, 1, 2, 10, 3, 3)
    stacked = torch.cat([q, k, v, a[..., None], e[..., None], th[..., None]], dim=-1)  # (B, H, L, ·)

    def fn(x: torch.Tensor) -> torch.Tensor:
        qq, kk, vv, rest = x[..., :3], x[..., 3:6], x[..., 6:9], torch.sigmoid(x[..., 9:])
        return impl.titans_memory_chunked(qq, kk, vv, rest[..., 0], rest[..., 1], rest[..., 2],  # type: ignore[attr-defined]
                                          chunk_size=chunk)[0]

    for t in (1, 4, 9):
        assert_causal(fn, stacked, t, time_dim=2, atol=1e-12)


@given(seed=seeds, size=sizes, update=st.booleans())
def test_qk_projection_optimized_equals_reference(seed: int, size: tuple[int, ...], update: bool) -> None:
    B, H, L, dk, _ = size
    q = make_tensor((B, H, L, dk), seed)
    k = make_tensor((B, H, L, dk), seed + 1)
    g = make_tensor((B, H, dk, dk), seed + 2)
    gram = g @ g.transpose(-1, -2)  # a Gram matrix is symmetric positive semi-definite

    def run(module: object):  # type: ignore[no-untyped-def]
        return lambda q, k, gram: module.qk_projection(q, k, gram, update=update)  # type: ignore[attr-defined]

    assert_equivalent(run(ref), run(opt), (q, k, gram), dtype=F64, seed=seed)
    assert_equivalent(lambda q, k, g: ref.qk_projection(q, k, g, update=update),
                      lambda q, k, g: opt.qk_projection(q, k, g, update=update, block=3), (q, k, gram), dtype=F64)


def test_qk_projection_lies_in_the_span_of_the_written_keys() -> None:
    q = make_tensor((1, 1, 3, 4), 0)
    k = make_tensor((1, 1, 3, 4), 1)
    q_tilde, P = ref.qk_projection(q, k)
    unit_k0 = k[0, 0, 0] / k[0, 0, 0].norm()
    assert abs(abs(float(q_tilde[0, 0, 0] @ unit_k0)) - 1.0) < 1e-12  # one key written: q̃_0 = ±k_0 / ‖k_0‖
    assert torch.allclose(P, k[0, 0].T @ k[0, 0])


@pytest.mark.parametrize("chunk", [1, 4])
def test_module_optimized_equals_reference_with_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    kwargs = dict(chunk_size=chunk, global_decay=0.05, qk_projection=True)
    r = ref.TitansMemory(8, 2, 4, 3, **kwargs)  # type: ignore[arg-type]
    o = opt.TitansMemory(8, 2, 4, 3, **kwargs)  # type: ignore[arg-type]
    x = make_tensor((2, 9, 8), 3)
    assert_modules_equivalent(r, o, (x,), dtype=F64, output=lambda out: (out.y, tuple(out.state)))
    assert_modules_equivalent(r, o, (x,), dtype=torch.float32, output=lambda out: (out.y, tuple(out.state)))


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_module_state_carries_across_calls_at_chunk_boundaries(impl: object) -> None:
    torch.manual_seed(1)
    mem = impl.TitansMemory(8, 2, 4, 4, chunk_size=3).double()  # type: ignore[attr-defined]
    x = make_tensor((2, 12, 8), 4)
    whole = mem(x)
    first = mem(x[:, :6])
    second = mem(x[:, 6:], first.state)
    assert_close_scaled(torch.cat([first.y, second.y], dim=1), whole.y, tolerance(F64), "split outputs")
    for a, b in zip(second.state, whole.state, strict=True):
        assert_close_scaled(a, b, tolerance(F64), "split state")


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_read_mode_leaves_the_memory_unchanged_and_reads_the_stored_matrix(impl: object) -> None:
    torch.manual_seed(2)
    mem = impl.TitansMemory(8, 2, 4, 4, chunk_size=2, qk_projection=False).double()  # type: ignore[attr-defined]
    stored = mem(make_tensor((1, 6, 8), 5)).state
    x = make_tensor((1, 5, 8), 6)
    out = mem(x, stored, update=False)
    assert all(torch.equal(a, b) for a, b in zip(out.state, stored, strict=True))
    q = ref.normalize_queries(mem._heads(mem.q_proj(x), 4))
    y = mem.o_proj(mem.out_norm(q @ stored.M).transpose(1, 2).reshape(1, 5, 8))
    assert_close_scaled(out.y, y, tolerance(F64), "read output")


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_module_is_causal(impl: object) -> None:
    torch.manual_seed(3)
    mem = impl.TitansMemory(8, 2, 4, 4, chunk_size=4).double()  # type: ignore[attr-defined]
    x = make_tensor((2, 11, 8), 7)
    for t in (2, 5, 10):
        assert_causal(lambda z: mem(z).y, x, t, atol=1e-12)


def test_memory_stats_are_the_stated_norms() -> None:
    M = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]], dtype=F64)  # (1, 1, 2, 2), ‖M‖_F = 5
    S = torch.ones(1, 1, 2, 2, dtype=F64)
    stats = ref.memory_stats(M, S)
    assert float(stats["M_norm"]) == 5.0 and float(stats["M_max"]) == 4.0 and float(stats["S_norm"]) == 2.0
    assert abs(float(stats["M_std"]) - float(M.std(unbiased=False))) < 1e-15


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_bad_inputs_are_rejected_with_clear_messages(impl: object) -> None:
    q, k, v, a, e, th, M0, S0 = memory_inputs(0, 1, 2, 5, 3, 3)
    fn = impl.titans_memory_chunked  # type: ignore[attr-defined]
    with pytest.raises(ShapeError, match=r"q and k must have one shape"):
        fn(q[..., :2], k, v, a, e, th, chunk_size=2)
    with pytest.raises(ShapeError, match=r"alpha must have shape \(B, H, L\) = \(1, 2, 5\), got \(1, 2, 4\)"):
        fn(q, k, v, a[..., :4], e, th, chunk_size=2)
    with pytest.raises(MemarchError, match=r"chunk_size must be an int >= 1, got 0"):
        fn(q, k, v, a, e, th, chunk_size=0)
    with pytest.raises(MemarchError, match=r"global_decay must be a finite number >= 0, got -1"):
        fn(q, k, v, a, e, th, chunk_size=2, global_decay=-1.0)
    with pytest.raises(ShapeError, match=r"initial_state M must have shape \(B, H, d_k, d_v\)"):
        fn(q, k, v, a, e, th, chunk_size=2, initial_state=(M0[..., :2], S0))
    with pytest.raises(MemarchError, match=r"momentum must lie in \(0, 1\)"):
        impl.TitansMemory(8, 2, 4, 4, momentum=1.0)  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunked_memory_matches_float64_reference(dtype: torch.dtype) -> None:
    inputs = memory_inputs(0, 2, 2, 40, 16, 16)
    assert_equivalent(chunked(ref, 8, 0.01), chunked(opt, 8, 0.01), inputs, dtype=dtype, model=True,
                      device="cuda")
