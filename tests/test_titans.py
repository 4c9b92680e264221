"""Titans memory: the per-token and chunked recurrences, their parallel form, the Q-K projection, the module."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optimized import titans as opt
from optimized.kernels import triton_available, triton_interpreting
from reference import titans as ref
from reference.validation import MemarchError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_close_scaled, assert_equivalent, assert_modules_equivalent
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance
from tests.triton_compile import assert_compiles

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


# ---------------------------------------------------------------------------------------------- Triton kernel

needs_interpreter = pytest.mark.skipif(not (triton_available() and triton_interpreting()),
                                       reason="Triton kernel test on CPU needs triton and TRITON_INTERPRET=1 "
                                              "(tox sets it)")


def kernel_fn(C: int, lam: float, *, with_state: bool = True, autograd: bool = False,  # type: ignore[no-untyped-def]
              operands: str = "triton", composed: bool = False):
    """The Triton entry (forward only, or the autograd wrapper; `composed`: its compile-time form) with `chunked`'s
    argument list."""
    from optimized.kernels.titans import titans_memory_triton, titans_memory_triton_autograd

    def fn(q, k, v, a, e, th, M0, S0):  # type: ignore[no-untyped-def]
        state = (M0, S0) if with_state else None
        if autograd:
            return titans_memory_triton_autograd(q, k, v, a, e, th, chunk_size=C, global_decay=lam,
                                                 initial_state=state, operands=operands, composed=composed)
        return titans_memory_triton(q, k, v, a, e, th, chunk_size=C, global_decay=lam, initial_state=state,
                                    operands=operands)
    return fn


def reference_fn(C: int, lam: float, *, with_state: bool = True):  # type: ignore[no-untyped-def]
    def fn(q, k, v, a, e, th, M0, S0):  # type: ignore[no-untyped-def]
        return ref.titans_memory_chunked(q, k, v, a, e, th, chunk_size=C, global_decay=lam,
                                         initial_state=(M0, S0) if with_state else None)
    return fn


def test_titans_dispatch_on_cpu_is_the_torch_chunked_form() -> None:
    assert opt.titans_dispatch(torch.zeros(1, 1, 4, 4), chunk_size=4) == "torch-chunked"


# (L, C, d_k, d_v, λ, initial state): C | L; a last shorter chunk; C not a power of two and d_v not a multiple of
# the value block; L < C (one short chunk, no kernel part); C = 1 (the per-token recurrence)
KERNEL_CASES = [(32, 8, 16, 16, 0.0, True), (27, 8, 16, 32, 0.25, True), (20, 5, 32, 20, 0.1, False),
                (3, 8, 16, 16, 0.0, True), (12, 1, 8, 8, 0.1, True), (40, 16, 32, 32, 0.01, True)]


@needs_interpreter
@pytest.mark.parametrize(("L", "C", "dk", "dv", "lam", "with_state"), KERNEL_CASES)
def test_triton_kernel_matches_reference_in_the_interpreter(L: int, C: int, dk: int, dv: int, lam: float,
                                                            with_state: bool) -> None:
    inputs = memory_inputs(L + C, 1, 2, L, dk, dv)
    assert_equivalent(reference_fn(C, lam, with_state=with_state), kernel_fn(C, lam, with_state=with_state),
                      inputs, dtype=torch.float32, grad=False)


Six = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def operand_inputs(seed: int, B: int, H: int, L: int, dk: int, dv: int) -> Six:
    """q, k, v, α, η, θ in float64, with one α of exactly 1 and one η of exactly 0 (the log-floor clamp)."""
    q, k, v, alpha, eta, theta = memory_inputs(seed, B, H, L, dk, dv)[:6]
    alpha, eta = alpha.clone(), eta.clone()
    alpha[0, 0, min(3, L - 1)] = 1.0
    eta[0, -1, L // 2] = 0.0
    return q, k, v, alpha, eta, theta


def cast_six(inputs: Six, io: torch.dtype, device: str = "cpu", length: int | None = None) -> Six:
    """q, k, v in `io` and the gates in float32 (float64 for float64), on `device`, the first `length`
    positions."""
    q, k, v, alpha, eta, theta = (t[:, :, :length].to(device) for t in inputs)
    gates = torch.promote_types(io, torch.float32)
    return q.to(io), k.to(io), v.to(io), alpha.to(gates), eta.to(gates), theta.to(gates)


@needs_interpreter
@pytest.mark.parametrize(("L", "C", "dk", "dv", "lam"), [(32, 8, 16, 16, 0.0), (20, 5, 32, 20, 0.1),
                                                         (48, 16, 20, 40, 0.25), (12, 1, 8, 8, 0.1)])
def test_operands_kernel_equals_the_torch_operands(L: int, C: int, dk: int, dv: int, lam: float) -> None:
    """`_operands_triton` (one launch) against `_kernel_operands` run in float64 (the math of
    `chunk_coefficients` and the parallel form's P, Z, y_c), every output, at the float32 tolerance; padded C
    and d_k, C = 1, and gates at the clamp."""
    from optimized.kernels.titans import _kernel_operands, _operands_triton

    q, k, v, alpha, eta, theta = inputs = operand_inputs(L, 1, 2, L, dk, dv)
    expected = _kernel_operands(q, k, v, alpha, eta, theta, C, lam, F64)
    got = _operands_triton(*cast_six(inputs, torch.float32), C, lam, torch.float32)
    names = ["k", "v", "P", "Z", "y_c", "vecs", "scalars"]
    for name, e, g in zip(names, expected, got, strict=True):
        assert g.dtype == torch.float32
        assert_close_scaled(g, e, tolerance(torch.float32), name)


@needs_interpreter
@given(seed=seeds, L=st.integers(1, 40), C=st.integers(1, 16), dk=st.integers(1, 20), dv=st.integers(1, 20),
       lam=st.sampled_from([0.0, 0.05]))
def test_operands_kernel_equals_the_torch_operands_for_drawn_sizes(seed: int, L: int, C: int, dk: int, dv: int,
                                                                   lam: float) -> None:
    from optimized.kernels.titans import _kernel_operands, _operands_triton

    main = (L // C) * C
    inputs = operand_inputs(seed, 1, 2, L, dk, dv)
    expected = _kernel_operands(*cast_six(inputs, F64, length=main), C, lam, F64)
    got = _operands_triton(*cast_six(inputs, torch.float32, length=main), C, lam, torch.float32)
    for name, e, g in zip(["k", "v", "P", "Z", "y_c", "vecs", "scalars"], expected, got, strict=True):
        assert_close_scaled(g, e, tolerance(torch.float32), name)


@needs_interpreter
def test_operands_kernel_in_float16_keeps_float32_coefficients() -> None:
    from optimized.kernels.titans import _kernel_operands, _operands_triton

    q, k, v, alpha, eta, theta = inputs = operand_inputs(7, 1, 1, 32, 16, 16)
    expected = _kernel_operands(q, k, v, alpha, eta, theta, 16, 0.1, F64)
    got = _operands_triton(*cast_six(inputs, torch.float16), 16, 0.1, torch.float16)
    for name, e, g, dtype in zip(["k", "v", "P", "Z", "y_c", "vecs", "scalars"], expected, got,
                                 [torch.float16] * 4 + [torch.float32] * 3, strict=True):
        assert g.dtype == dtype, name
        assert_close_scaled(g, e, tolerance(torch.float16, model=True), name)


@needs_interpreter
@pytest.mark.parametrize(("L", "C", "dk", "dv", "lam", "with_state"), [KERNEL_CASES[1], KERNEL_CASES[2],
                                                                       KERNEL_CASES[5]])
def test_triton_kernel_with_torch_operands_matches_reference_with_gradients(L: int, C: int, dk: int, dv: int,
                                                                            lam: float, with_state: bool) -> None:
    inputs = memory_inputs(L + C + 1, 1, 2, L, dk, dv)
    assert_equivalent(reference_fn(C, lam, with_state=with_state),
                      kernel_fn(C, lam, with_state=with_state, autograd=True, operands="torch"), inputs,
                      dtype=torch.float32)


def test_triton_kernel_rejects_an_unknown_operands_mode() -> None:
    from optimized.kernels.titans import titans_memory_triton

    q, k, v, alpha, eta, theta = (t.float() for t in memory_inputs(3, 1, 2, 16, 16, 16)[:6])
    with pytest.raises(ValueError, match="operands must be 'torch' or 'triton'"):
        titans_memory_triton(q, k, v, alpha, eta, theta, chunk_size=8, operands="cuda")


@needs_interpreter
def test_triton_kernel_takes_half_inputs_with_float32_state() -> None:
    # float16, not bfloat16: the interpreter's tl.dot on bfloat16 operands is wrong (Triton 3.9: |error| ~ 1e10 on a
    # 16 × 16 product that is right on float16 and on the same operands upcast), so bfloat16 is checked on the GPU
    inputs = memory_inputs(3, 1, 2, 24, 16, 16)
    assert_equivalent(reference_fn(8, 0.1), kernel_fn(8, 0.1), inputs, dtype=torch.float16, model=True, grad=False)


@pytest.mark.parametrize("backward", [False, True])
def test_triton_kernels_refuse_one_pipeline_stage_before_launching(backward: bool) -> None:
    """num_stages=1 faulted on an H200 (see `_check_stages`): both launchers refuse it with a ValueError that names
    the fix, before any launch (so this runs without a GPU or the interpreter)."""
    from optimized.kernels import titans as kernels

    q, k, v, alpha, eta, theta = (t.float() for t in memory_inputs(3, 1, 2, 16, 16, 16)[:6])
    with pytest.raises(ValueError, match="num_stages must be >= 2"):
        if backward:
            operands = kernels._kernel_operands(q, k, v, alpha, eta, theta, 8, 0.0, torch.float32)
            zeros = torch.zeros(1, 2, 16, 16)
            kernels._backward_kernel(operands, zeros, zeros, torch.zeros(1, 2, 16, 16), zeros, zeros, num_stages=1)
        else:
            kernels.titans_memory_triton(q, k, v, alpha, eta, theta, chunk_size=8, num_stages=1)


# the backward kernel's cases: KERNEL_CASES plus two value blocks (d_k = 64: 64 value columns a program), the second
# one partly masked, with C dividing L and not
BACKWARD_CASES = [*KERNEL_CASES, (40, 16, 64, 80, 0.1, True), (19, 8, 64, 40, 0.1, False)]


@needs_interpreter
@pytest.mark.parametrize(("L", "C", "dk", "dv", "lam", "with_state"), BACKWARD_CASES)
def test_triton_backward_kernel_gradients_match_reference(L: int, C: int, dk: int, dv: int, lam: float,
                                                          with_state: bool) -> None:
    inputs = memory_inputs(L + C, 1, 2, L, dk, dv)
    assert_equivalent(reference_fn(C, lam, with_state=with_state),
                      kernel_fn(C, lam, with_state=with_state, autograd=True), inputs, dtype=torch.float32)


@needs_interpreter
@pytest.mark.parametrize(("L", "C", "dk", "dv", "lam", "with_state"),
                         [*KERNEL_CASES[:4], BACKWARD_CASES[-2]])
def test_composed_kernel_path_gradients_match_reference(L: int, C: int, dk: int, dv: int, lam: float,
                                                        with_state: bool) -> None:
    """The form `torch.compile` traces (torch-formed operands, the state-passing kernels as their own autograd
    function, no autograd call inside a backward): same values and gradients as the reference."""
    inputs = memory_inputs(L + C + 2, 1, 2, L, dk, dv)
    assert_equivalent(reference_fn(C, lam, with_state=with_state),
                      kernel_fn(C, lam, with_state=with_state, autograd=True, composed=True), inputs,
                      dtype=torch.float32)


def test_composed_kernel_path_is_taken_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """`composed=None` follows `torch.compiler.is_compiling()` (checked without launching: both forms stubbed)."""
    from optimized.kernels import titans as kernels

    taken: list[str] = []

    def stub(name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        def record(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            taken.append(name)
            return args[:3]
        return record

    monkeypatch.setattr(kernels, "_composed", stub("composed"))
    monkeypatch.setattr(kernels._TritonTitans, "apply", stub("recomputing"))
    q, k, v, alpha, eta, theta = (t.float().requires_grad_(True) for t in memory_inputs(3, 1, 2, 16, 16, 16)[:6])
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        kernels.titans_memory_triton_autograd(q, k, v, alpha, eta, theta, chunk_size=8)
    assert taken == ["recomputing", "composed"]


@needs_interpreter
def test_triton_backward_kernel_takes_half_inputs() -> None:
    inputs = memory_inputs(3, 1, 2, 24, 16, 16)
    assert_equivalent(reference_fn(8, 0.1), kernel_fn(8, 0.1, autograd=True), inputs, dtype=torch.float16,
                      model=True)


@needs_interpreter
@pytest.mark.parametrize("composed", [False, True], ids=["recomputing", "composed"])
@pytest.mark.parametrize("wanted", [(2,), (6, 7), (0, 4)], ids=["v", "initial-state", "q-eta"])
def test_triton_backward_kernel_with_some_inputs_not_requiring_grad(wanted: tuple[int, ...], composed: bool) -> None:
    """Only the inputs that require grad get gradients, and they equal the reference's (both autograd forms)."""
    inputs = [t.float() for t in memory_inputs(5, 1, 2, 21, 16, 16)]
    ref_in = [t.double().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    opt_in = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    cotangents = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
                  for i, t in enumerate(reference_fn(8, 0.1)(*ref_in))]
    for fn, args in ((reference_fn(8, 0.1), ref_in), (kernel_fn(8, 0.1, autograd=True, composed=composed), opt_in)):
        sum((out.double() * c).sum() for out, c in zip(fn(*args), cotangents, strict=True)).backward()
    for i, (r, o) in enumerate(zip(ref_in, opt_in, strict=True)):
        assert (o.grad is not None) == (i in wanted)
        if r.grad is not None and o.grad is not None:
            assert_close_scaled(o.grad, r.grad, tolerance(torch.float32), f"grad of input[{i}]")


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernel_compiles_for_h100_without_a_gpu() -> None:
    # the interpreter runs the kernel's Python, not Triton's compiler: compile it for sm_90 here, in a process
    # without TRITON_INTERPRET (which changes how Triton builds kernels), at the benchmark's sizes and a small one
    script = ("from optimized.kernels.titans import compile_for_gpu\n"
              "for dtype, chunk, d_k in (('bf16', 64, 128), ('fp32', 4, 16)):\n"
              "    for backward in (False, True):\n"
              "        assert 'cubin' in compile_for_gpu(90, dtype, chunk=chunk, d_k=d_k, backward=backward).asm\n"
              "    kernel = compile_for_gpu(90, dtype, chunk=chunk, d_k=d_k, operands=True, num_warps=8)\n"
              "    assert 'cubin' in kernel.asm and kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared\n")
    assert_compiles(script)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("L", "C", "dk", "dv", "with_state"), [(256, 64, 128, 128, True), (200, 64, 64, 96, False),
                                                                (45, 16, 32, 32, True)])
def test_cuda_triton_kernel_matches_float64_reference(dtype: torch.dtype, L: int, C: int, dk: int, dv: int,
                                                      with_state: bool) -> None:
    inputs = memory_inputs(1, 2, 2, L, dk, dv)
    assert opt.titans_dispatch(inputs[1].to("cuda", dtype), chunk_size=C) == "triton"

    def opt_fn(q, k, v, a, e, th, M0, S0):  # type: ignore[no-untyped-def]
        return opt.titans_memory_chunked(q, k, v, a, e, th, chunk_size=C, global_decay=0.01,
                                         initial_state=(M0, S0) if with_state else None)

    assert_equivalent(reference_fn(C, 0.01, with_state=with_state), opt_fn, inputs, dtype=dtype, model=True,
                      device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("L", "C", "dk", "dv"), [(512, 64, 128, 128), (200, 64, 64, 96), (45, 16, 32, 20)])
def test_cuda_operands_kernel_matches_float64_operands_and_forward(dtype: torch.dtype, L: int, C: int, dk: int,
                                                                   dv: int) -> None:
    """On the GPU: `_operands_triton` against the float64 torch operands (the kernel's input-dtype dots), and
    the whole forward and backward with `operands="triton"` against the float64 reference."""
    from optimized.kernels.titans import _kernel_operands, _operands_triton

    inputs = operand_inputs(L, 2, 2, L, dk, dv)
    main = (L // C) * C
    expected = _kernel_operands(*cast_six(inputs, F64, length=main), C, 0.01, F64)
    got = _operands_triton(*cast_six(inputs, dtype, "cuda", main), C, 0.01, dtype)
    for name, e, g in zip(["k", "v", "P", "Z", "y_c", "vecs", "scalars"], expected, got, strict=True):
        assert_close_scaled(g.cpu(), e, tolerance(dtype, model=dtype != torch.float32), name)
    assert_equivalent(reference_fn(C, 0.01), kernel_fn(C, 0.01, autograd=True, operands="triton"),
                      memory_inputs(1, 2, 2, L, dk, dv), dtype=dtype, model=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("L", "with_state"), [(512, True), (300, False)])
def test_cuda_triton_backward_kernel_matches_the_torch_chunked_gradients(dtype: torch.dtype, L: int,
                                                                          with_state: bool) -> None:
    """The backward kernel against differentiating the torch form, same inputs and dtype, at the benchmark's
    d_k = d_v = 128 and chunk 64 (two value blocks of 32 … four programs per head)."""
    from optimized.kernels.titans import titans_memory_triton_autograd

    inputs = [t.to("cuda", dtype) for t in memory_inputs(4, 2, 2, L, 128, 128)]
    cotangents = None
    grads = []
    for fn in (opt.torch_chunked, titans_memory_triton_autograd):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        start = (leaves[6], leaves[7]) if with_state else None
        outputs = fn(*leaves[:6], chunk_size=64, global_decay=0.01, initial_state=start)
        if cotangents is None:
            g = torch.Generator(device="cuda").manual_seed(0)
            cotangents = [torch.randn(o.shape, generator=g, device="cuda", dtype=o.dtype) for o in outputs]
        torch.autograd.backward(outputs, cotangents)
        grads.append([t.grad for t in leaves[:8 if with_state else 6]])
    for i, (expected, actual) in enumerate(zip(*grads, strict=True)):
        assert_close_scaled(actual, expected, tolerance(dtype, model=True), f"grad of input[{i}] ({dtype})")


@pytest.mark.gpu
def test_cuda_triton_kernel_under_autocast_keeps_a_float32_state() -> None:
    inputs = memory_inputs(2, 2, 2, 130, 64, 64)

    def under_autocast(*args: torch.Tensor):  # type: ignore[no-untyped-def]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return chunked(opt, 32, 0.01)(*args)

    assert_equivalent(chunked(ref, 32, 0.01), under_autocast, inputs, dtype=torch.float32, device="cuda",
                      tol=tolerance(torch.bfloat16, model=True))


# ---------------------------------------------------------------------------------------------- stability ([TITANS-2])

def _chunk_map_radius(theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, C: int, lam: float) -> torch.Tensor:
    """Spectral radius of one chunk's linear map (M₀, S₀) -> (M_C, S_C) for C identical unit keys and zero values
    (the worst case for one direction), gates constant per batch element (N,) -> (N,); via the literal recurrence."""
    N = theta.shape[0]
    k = torch.ones(N, 1, C, 1, dtype=F64)  # d_k = d_v = 1: one key direction, curvature 2 + λ
    v = torch.zeros(N, 1, C, 1, dtype=F64)

    def gate(g: torch.Tensor) -> torch.Tensor:
        return g[:, None, None].expand(N, 1, C).contiguous()

    one, zero = torch.ones(N, 1, 1, 1, dtype=F64), torch.zeros(N, 1, 1, 1, dtype=F64)
    columns = []
    for M0, S0 in ((one, zero), (zero, one)):
        _, M, S = ref.titans_memory_chunked(k, k, v, gate(alpha), gate(eta), gate(theta), chunk_size=C,
                                            global_decay=lam, initial_state=(M0, S0))
        columns.append(torch.stack([M.reshape(N), S.reshape(N)], dim=-1))
    T = torch.stack(columns, dim=-1)  # (N, 2, 2)
    return torch.linalg.eigvals(T).abs().amax(dim=-1)


@pytest.mark.parametrize("chunk", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_normalised_step_never_expands_a_chunk_of_identical_keys(chunk: int, lam: float) -> None:
    """θ = (1 − η) θ̂ / (C (2 + λ)): for every gate value the chunk map's spectral radius is ≤ 1."""
    grid = torch.cartesian_prod(torch.tensor([0.0, 0.5, 0.9, 0.99, 0.999], dtype=F64),  # η
                                torch.tensor([0.01, 0.5, 0.999], dtype=F64),  # θ̂
                                torch.tensor([0.0, 0.01, 0.5, 0.99], dtype=F64))  # α
    eta, theta_hat, alpha = grid.unbind(-1)
    theta = ref.titans_learning_rate(theta_hat, 1 - eta, chunk, lam)
    assert float(_chunk_map_radius(theta, eta, alpha, chunk, lam).max()) <= 1 + 1e-12


def test_unnormalised_step_expands_at_the_default_gates() -> None:
    """The literal Titans step θ = θ̂ = 0.1 with η = 0.9, α = 0.01 (the defaults) is stable per token but expands
    every chunk of repeated keys (radius 1.25 at C = 4, 14.8 at C = 16): why the step is normalised."""
    def g(x: float) -> torch.Tensor:
        return torch.tensor([x], dtype=F64)

    radius = {C: float(_chunk_map_radius(g(0.1), g(0.9), g(0.01), C, 0.0)[0]) for C in (1, 4, 16)}
    assert radius[1] < 1 < radius[4] < radius[16]
    assert radius[16] == pytest.approx(14.81, abs=0.01)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_module_step_is_the_normalised_learning_rate(impl: object) -> None:
    torch.manual_seed(4)
    mem = impl.TitansMemory(8, 2, 4, 4, chunk_size=3, global_decay=0.05).double()  # type: ignore[attr-defined]
    x = make_tensor((2, 7, 8), 8)
    seen: dict[str, torch.Tensor] = {}
    inner = mem._recurrence

    def spy(q, k, v, alpha, eta, theta, M, S):  # type: ignore[no-untyped-def]
        seen.update(eta=eta, theta=theta)
        return inner(q, k, v, alpha, eta, theta, M, S)

    mem._recurrence = spy
    mem(x)
    eta = torch.sigmoid(mem.eta_proj(x)).transpose(1, 2)
    theta_hat = torch.sigmoid(mem.theta_proj(x)).transpose(1, 2)
    assert_close_scaled(seen["eta"], eta, tolerance(F64), "eta")
    assert_close_scaled(seen["theta"], (1 - eta) * theta_hat / (3 * 2.05), tolerance(F64), "theta")


def test_memory_stays_bounded_on_a_long_stream_of_repeated_tokens() -> None:
    """1024 tokens of a 3-token vocabulary, chunk 16 (the presets' chunk): the state stays at the scale of the
    stored values. With the unnormalised step θ = θ̂ this stream drives ‖M‖ to ~1e50 (1e15 and then inf for the
    10M preset on Shakespeare in float32)."""
    torch.manual_seed(0)
    mem = opt.TitansMemory(32, 2, 16, 16, chunk_size=16, global_decay=0.01).double()
    table = torch.randn(3, 32, dtype=F64)
    state = None
    with torch.no_grad():
        for _ in range(8):
            x = table[torch.randint(0, 3, (2, 128))]
            out = mem(x, state)
            state = out.state
            v_max = float(mem.v_proj(x).view(2, 128, 2, 16).norm(dim=-1).max())
            assert float(out.stats["M_norm"]) < 3 * v_max


@pytest.mark.gpu
def test_titans_sweep_benchmark_on_cuda_times_the_operands_and_every_launch() -> None:
    from training.benchmarks import BenchArgs, discover

    rows = discover()["titans_sweep"](BenchArgs(device=torch.device("cuda"), quick=True, repeat=1))
    impls = [row.impl for row in rows]
    assert impls[:4] == ["optimized: torch operands", "optimized: forward (operands=torch)",
                         "optimized: Triton operands", "optimized: forward (default launch)"]
    assert all(row.ms > 0 for row in rows[:4]) and "max |Δ|" in rows[1].note
    launches = rows[4:]
    failed = [(row.params, row.note) for row in launches if not (row.ms > 0 and "max |Δ|" in row.note)]
    assert len(launches) == 10 and not failed, failed
