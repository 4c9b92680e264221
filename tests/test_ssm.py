"""Selective scan: optimized (chunked / Triton / mamba-ssm) vs the literal reference, step form, causality, state
carry-over, agreement with mamba-ssm's own reference, bad input."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import optimized.ssm as opt
import reference.ssm as ref
from optimized.kernels import cpu_scan, triton_available, triton_interpreting
from reference.validation import DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_close_scaled, assert_equivalent
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance
from tests.triton_compile import assert_compiles

LAYOUTS = ("shared", "per_step", "grouped")
# L = 1, odd, squares and their neighbours: the chunk length is about √L, so the last chunk is full or part-padded
LENGTHS = st.sampled_from([1, 2, 5, 7, 8, 9, 15, 16, 17, 23])


@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    n_state: int
    length: int
    b_layout: str
    c_layout: str
    groups: int
    has_D: bool
    has_z: bool
    has_bias: bool
    softplus: bool
    last_state: bool
    has_h0: bool
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    groups = draw(st.sampled_from([1, 2]))
    return Case(batch=draw(st.integers(1, 2)), dim=groups * draw(st.integers(1, 2)), n_state=draw(st.integers(1, 4)),
                length=draw(LENGTHS), b_layout=draw(st.sampled_from(LAYOUTS)),
                c_layout=draw(st.sampled_from(LAYOUTS)), groups=groups, has_D=draw(st.booleans()),
                has_z=draw(st.booleans()), has_bias=draw(st.booleans()), softplus=draw(st.booleans()),
                last_state=draw(st.booleans()), has_h0=draw(st.booleans()), seed=draw(seeds))


def _matrix(case: Case, layout: str, seed: int) -> torch.Tensor:
    shape = {"shared": (case.dim, case.n_state), "per_step": (case.batch, case.n_state, case.length),
             "grouped": (case.batch, case.groups, case.n_state, case.length)}[layout]
    return make_tensor(shape, seed)


def _inputs(case: Case) -> tuple[torch.Tensor | None, ...]:
    s, b, d, n, L = case.seed, case.batch, case.dim, case.n_state, case.length
    u = make_tensor((b, d, L), s)
    # raw delta goes through softplus; without it keep Δ >= 0 so that the recurrence decays
    delta = make_tensor((b, d, L), s + 1) if case.softplus else make_tensor((b, d, L), s + 1).abs()
    A = -(make_tensor((d, n), s + 2, distribution="uniform").abs() * 3 + 0.1)
    return (u, delta, A, _matrix(case, case.b_layout, s + 3), _matrix(case, case.c_layout, s + 4),
            make_tensor((d,), s + 5) if case.has_D else None, make_tensor((b, d, L), s + 6) if case.has_z else None,
            make_tensor((d,), s + 7) * 0.5 if case.has_bias else None,
            make_tensor((b, d, n), s + 8) if case.has_h0 else None)


def _as_fn(impl: Any, case: Case) -> Callable[..., Any]:
    def fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: torch.Tensor | None, z: torch.Tensor | None, bias: torch.Tensor | None,
           h0: torch.Tensor | None) -> Any:
        return impl.selective_scan(u, delta, A, B, C, D, z, bias, case.softplus, case.last_state, initial_state=h0)
    return fn


# ---------------------------------------------------------------------------------------------- equivalence

@given(case=cases())
def test_optimized_scan_matches_reference_in_float64(case: Case) -> None:
    assert_equivalent(_as_fn(ref, case), _as_fn(opt, case), _inputs(case), dtype=torch.float64)


@given(case=cases())
def test_optimized_scan_in_float32_matches_float64_reference(case: Case) -> None:
    # a scan is a long chain of ops: the MODEL tolerance (tests/tolerances.py) applies
    assert_equivalent(_as_fn(ref, case), _as_fn(opt, case), _inputs(case), dtype=torch.float32, model=True)


def _chunked_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                  delta_softplus: bool = False, return_last_state: bool = False, *,
                  initial_state: torch.Tensor | None = None) -> Any:
    """`chunked_scan` behind `selective_scan`'s signature (on a CPU with a compiler the dispatch takes the compiled
    scan instead, so the torch path is called directly)."""
    out, last = opt.chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last) if return_last_state else out


SCAN_PATHS = pytest.mark.parametrize("scan", [opt.selective_scan, _chunked_scan], ids=["dispatch", "chunked"])


@SCAN_PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scan_is_stable_for_long_sequences_and_large_decays(dtype: torch.dtype, scan: Callable[..., Any]) -> None:
    L = 4096
    u = make_tensor((1, 2, L), 0)
    delta = make_tensor((1, 2, L), 1, distribution="uniform").abs() * 40  # |Δ A| up to 1e3 per step
    A = -(make_tensor((2, 3), 2, distribution="uniform").abs() * 25 + 0.01)
    inputs = (u, delta, A, make_tensor((1, 3, L), 3), make_tensor((1, 3, L), 4))
    # outputs and every input's gradient finite and equal to the reference's
    assert_equivalent(ref.selective_scan, scan, inputs, dtype=dtype, model=True)


@st.composite
def large_decay_inputs(draw: st.DrawFn) -> tuple[torch.Tensor | None, ...]:
    """A = −exp(A_log) with A_log up to 8 and Δ up to 5 (|Δ A| up to ~1.5e4 per step), as once A_log has grown
    in training; chunk-sized and longer sequences; every B/C layout, D and z, sometimes an initial state."""
    seed, length = draw(seeds), draw(st.sampled_from([9, 40, 97]))
    case = Case(batch=1, dim=2, n_state=draw(st.integers(1, 4)), length=length, b_layout=draw(st.sampled_from(LAYOUTS)),
                c_layout=draw(st.sampled_from(LAYOUTS)), groups=2, has_D=True, has_z=True, has_bias=False,
                softplus=False, last_state=True, has_h0=draw(st.booleans()), seed=seed)
    u, _, _, B, C, D, z, _, h0 = _inputs(case)
    a_log = make_tensor((2, case.n_state), seed + 9, distribution="uniform").abs() * draw(st.floats(3.0, 8.0))
    delta = make_tensor((1, 2, length), seed + 10, distribution="uniform").abs() * draw(st.floats(0.5, 5.0))
    return u, delta, -torch.exp(a_log), B, C, D, z, None, h0


@SCAN_PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(inputs=large_decay_inputs())
def test_scan_gradients_stay_finite_and_exact_for_large_decays(dtype: torch.dtype, scan: Callable[..., Any],
                                                               inputs: tuple[torch.Tensor | None, ...]) -> None:
    # regression: a closed form over log-cumulative decays (e^{α_t−α_s} split as e^{α_t−α_m}·e^{α_m−α_s}) gave
    # NaN gradients for delta and A here in float32 while its forward pass stayed finite
    def fn(selective_scan: Callable[..., Any]) -> Callable[..., Any]:
        def call(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, bias: torch.Tensor | None,
                 h0: torch.Tensor | None) -> Any:
            return selective_scan(u, delta, A, B, C, D, z, bias, False, True, initial_state=h0)
        return call

    assert_equivalent(fn(ref.selective_scan), fn(scan), inputs, dtype=dtype, model=dtype != torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=cases(), chunk=st.integers(1, 23))
def test_chunked_scan_matches_reference_for_any_chunk_length(dtype: torch.dtype, case: Case, chunk: int) -> None:
    def chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, z: torch.Tensor | None, bias: torch.Tensor | None,
                h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return opt.chunked_scan(u, delta, A, B, C, D, z, bias, case.softplus, h0, chunk=min(chunk, case.length))

    def reference(*args: torch.Tensor | None) -> Any:
        return _as_fn(ref, replace(case, last_state=True))(*args)

    assert_equivalent(reference, chunked, _inputs(case), dtype=dtype, model=dtype != torch.float64)


@given(length=st.integers(1, 10_000), per_step=st.integers(1, 1 << 22))
def test_chunk_length_covers_the_sequence_with_little_padding(length: int, per_step: int) -> None:
    chunk = opt.chunk_length(length, per_step)
    n_chunks = -(-length // chunk)
    assert 1 <= chunk <= length and n_chunks * chunk - length < n_chunks
    # one in-chunk step's tensors (per_step per chunk) stay within the budget, unless one chunk is all there is
    assert n_chunks == 1 or per_step * (n_chunks - 1) < opt.STEP_ELEMENTS
    if per_step * length <= opt.STEP_ELEMENTS * math.isqrt(length):  # small steps: O(√L) Python-level steps
        assert chunk + n_chunks <= 2 * math.isqrt(length) + 3


@SCAN_PATHS
def test_scan_keeps_slow_decay_over_many_chunks(scan: Callable[..., Any]) -> None:
    # Δ A ≈ −1e-3: the state must survive hundreds of chunk (or tile) boundaries (a dropped carry fails here)
    L = 400
    u = torch.zeros(1, 1, L, dtype=torch.float64)
    u[0, 0, 0] = 1.0
    delta = torch.full((1, 1, L), 1e-2, dtype=torch.float64)
    A = torch.full((1, 1), -0.1, dtype=torch.float64)
    B = C = torch.ones(1, 1, dtype=torch.float64)
    out = scan(u, delta, A, B, C)
    assert isinstance(out, torch.Tensor)
    expected = 1e-2 * torch.exp(-1e-3 * torch.arange(L, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- step, state, causality

@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(case=cases())
def test_stepping_equals_the_full_scan(impl: Any, case: Case) -> None:
    u, delta, A, B, C, D, z, bias, h0 = _inputs(case)
    assert u is not None and delta is not None and A is not None and B is not None and C is not None
    out, last = ref.selective_scan(u, delta, A, B, C, D, z, bias, case.softplus, True, initial_state=h0)
    state = torch.zeros(case.batch, case.dim, case.n_state, dtype=torch.float64) if h0 is None else h0
    # per-step matrices as (B, G, N) so that a square (B, N) is never read as the shared (D, N) layout
    for t in range(case.length):
        B_t = B if B.ndim == 2 else (B[:, None, :, t] if B.ndim == 3 else B[..., t])
        C_t = C if C.ndim == 2 else (C[:, None, :, t] if C.ndim == 3 else C[..., t])
        y_t, state = impl.selective_scan_step(state, u[:, :, t], delta[:, :, t], A, B_t, C_t, D,
                                              None if z is None else z[:, :, t], bias, case.softplus)
        torch.testing.assert_close(y_t, out[:, :, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(case=cases(), split=st.integers(1, 22))
def test_scanning_in_two_pieces_equals_one_scan(impl: Any, case: Case, split: int) -> None:
    assume(case.length >= 2)
    u, delta, A, B, C, D, z, bias, h0 = _inputs(case)
    assert u is not None and delta is not None and A is not None and B is not None and C is not None
    cut = 1 + split % (case.length - 1)

    def piece(x: torch.Tensor | None, lo: int, hi: int | None) -> torch.Tensor | None:
        return None if x is None or x.ndim == 2 else x[..., lo:hi]

    def matrix(x: torch.Tensor, lo: int, hi: int | None) -> torch.Tensor:
        return x if x.ndim == 2 else x[..., lo:hi]

    out, last = impl.selective_scan(u, delta, A, B, C, D, z, bias, case.softplus, True, initial_state=h0)
    out1, last1 = impl.selective_scan(piece(u, 0, cut), piece(delta, 0, cut), A, matrix(B, 0, cut),
                                      matrix(C, 0, cut), D, piece(z, 0, cut), bias, case.softplus, True,
                                      initial_state=h0)
    out2, last2 = impl.selective_scan(piece(u, cut, None), piece(delta, cut, None), A, matrix(B, cut, None),
                                      matrix(C, cut, None), D, piece(z, cut, None), bias, case.softplus, True,
                                      initial_state=last1)
    torch.testing.assert_close(torch.cat([out1, out2], dim=2), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last2, last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_is_causal(impl: Any, layout: str) -> None:
    case = Case(batch=2, dim=2, n_state=3, length=19, b_layout=layout, c_layout=layout, groups=2, has_D=True,
                has_z=True, has_bias=True, softplus=True, last_state=False, has_h0=False, seed=3)
    _, _, A, B, C, D, _, bias, _ = _inputs(case)
    stacked = make_tensor((3, 2, 2, 19), 9)  # u, delta, z stacked: (3, B, D, L)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return impl.selective_scan(x[0], x[1], A, B, C, D, x[2], bias, True)

    # exactly: the two-level scan reads nothing after t to compute out_t (chunk lengths depend only on L)
    for t in (1, 8, 11, 16):
        assert_causal(fn, stacked, t, time_dim=3, out_time_dim=2)


# ---------------------------------------------------------------------------------------------- dispatch, kernels

def test_scan_dispatch_on_cpu() -> None:
    x = torch.zeros(1, 1, 1)
    reason = cpu_scan.unavailable_reason()
    if reason:
        print(f"compiled CPU scan unavailable: {reason}")
    expected = "torch-chunked" if reason else "cpu-compiled"
    assert opt.scan_dispatch(x) == expected
    assert opt.scan_dispatch(x.double(), torch.zeros(1, 1, requires_grad=True)) == expected  # with autograd too


def test_the_compiled_cpu_scan_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", "cpu_scan")
    assert opt.scan_dispatch(torch.zeros(1, 1, 1)) == "torch-chunked"
    assert "MEMARCH_DISABLE_KERNELS" in cpu_scan.unavailable_reason()


needs_compiled = pytest.mark.skipif(cpu_scan.unavailable_reason() != "",
                                    reason=f"compiled CPU scan unavailable: {cpu_scan.unavailable_reason()}")


def _compiled(case: Case) -> Callable[..., Any]:
    def fn(*args: torch.Tensor | None) -> Any:
        assert opt.scan_dispatch(*[a for a in args if a is not None]) == "cpu-compiled"
        return _as_fn(opt, case)(*args)
    return fn


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=cases())
def test_compiled_cpu_scan_matches_reference(dtype: torch.dtype, case: Case) -> None:
    # forward and gradients, and the forward alone (no autograd graph, no checkpoints)
    assert_equivalent(_as_fn(ref, case), _compiled(case), _inputs(case), dtype=dtype, model=dtype != torch.float64)
    assert_equivalent(_as_fn(ref, case), _compiled(case), _inputs(case), dtype=dtype, grad=False,
                      model=dtype != torch.float64)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "dim", "groups", "n_state", "length", "workers"),
                         [(2, 64, 1, 16, 150, 3), (1, 12, 2, 3, 130, 2), (3, 5, 1, 2, 65, 4), (2, 96, 3, 4, 257, 5),
                          (1, 40, 1, 5, 64, 1)])
def test_compiled_cpu_scan_over_time_tiles_channel_blocks_and_threads(dtype: torch.dtype, batch: int, dim: int,
                                                                     groups: int, n_state: int, length: int,
                                                                     workers: int) -> None:
    # L beyond one 64-step tile (not a multiple of it), channel blocks of 32, 8, 2 and 1 (5 channels), groups of
    # B/C rows across blocks, and the jobs split over several threads; forward and gradients
    for b_layout, c_layout in (("grouped", "per_step"), ("shared", "grouped"), ("per_step", "shared")):
        case = Case(batch=batch, dim=dim, n_state=n_state, length=length, b_layout=b_layout, c_layout=c_layout,
                    groups=groups, has_D=True, has_z=True, has_bias=True, softplus=True, last_state=True,
                    has_h0=True, seed=length)

        def compiled(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None, z: torch.Tensor | None, bias: torch.Tensor | None,
                     h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return cpu_scan.selective_scan_cpu(u, delta, A, B, C, D, z, bias, True, h0, u.dtype, workers=workers)

        assert_equivalent(_as_fn(ref, case), compiled, _inputs(case), dtype=dtype, model=dtype != torch.float64)


@needs_compiled
@pytest.mark.parametrize(("dtype", "ulps"), [(torch.float32, 2), (torch.float64, 4)])
def test_compiled_scan_exp_and_softplus_are_accurate(dtype: torch.dtype, ulps: int) -> None:
    # one step from h0 = 1 with u = 0 and C = 1 reads out exp(Δ·A); with A = 1 the product is exact, so the
    # output is the kernel's own exp of Δ, compared with float64 exp; likewise Δ = softplus(delta) via u = B = C = 1
    # the whole range where exp is a normal number, up to the largest finite one (k = 128 in float needs care)
    eps = torch.finfo(dtype).eps
    low, high = (-86.8, 88.72) if dtype == torch.float32 else (-707.9, 709.78)
    x = torch.linspace(low, high, 4001, dtype=torch.float64).to(dtype)
    dim = x.numel()
    ones = torch.ones(1, dim, 1, dtype=dtype)
    out, _ = cpu_scan.selective_scan_cpu(torch.zeros(1, dim, 1, dtype=dtype), x.view(1, dim, 1),
                                         torch.ones(dim, 1, dtype=dtype), torch.zeros(1, 1, 1, dtype=dtype),
                                         torch.ones(1, 1, 1, dtype=dtype), None, None, None, False,
                                         torch.ones(1, dim, 1, dtype=dtype), dtype)
    exact = x.double().exp()
    assert ((out.view(-1).double() - exact).abs() / exact).max() <= ulps * eps
    s = torch.linspace(-30.0, 30.0, 4001, dtype=torch.float64).to(dtype)
    out, _ = cpu_scan.selective_scan_cpu(ones, s.view(1, dim, 1), torch.zeros(dim, 1, dtype=dtype),
                                         torch.ones(1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, dtype=dtype), None,
                                         None, None, True, None, dtype)
    exact = torch.nn.functional.softplus(s.double())
    assert ((out.view(-1).double() - exact).abs() / exact).max() <= 2 * ulps * eps


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_scan_overflow_underflow_and_nan_follow_the_reference(dtype: torch.dtype) -> None:
    # channel 0: exp(Δ A) overflows to inf; channel 1: underflows (≈ 0); channel 2: u is NaN from step 3 on
    length = 6
    big = 100.0 if dtype == torch.float32 else 800.0
    u = torch.ones(1, 3, length, dtype=dtype)
    u[0, 2, 3:] = float("nan")
    delta = torch.tensor([big, big, 0.5], dtype=dtype)[None, :, None].expand(1, 3, length).contiguous()
    A = torch.tensor([[1.0], [-1.0], [-1.0]], dtype=dtype)
    B = C = torch.ones(1, 1, length, dtype=dtype)
    h0 = torch.ones(1, 3, 1, dtype=dtype)
    with torch.no_grad():
        out, last = opt.selective_scan(u, delta, A, B, C, None, None, None, False, True, initial_state=h0)
    expected, expected_last = ref.selective_scan(u, delta, A, B, C, None, None, None, False, True, initial_state=h0)
    assert torch.isposinf(out[0, 0]).all() and torch.isposinf(expected[0, 0]).all()
    torch.testing.assert_close(out[0, 1], expected[0, 1], rtol=1e-6, atol=0)  # Δ u B after the decay to ~0
    assert torch.isnan(out[0, 2, 3:]).all() and not torch.isnan(out[0, 2, :3]).any()
    torch.testing.assert_close(out[0, 2, :3], expected[0, 2, :3])
    assert torch.isnan(last[0, 2]).all() and torch.isnan(expected_last[0, 2]).all()


needs_interpreter = pytest.mark.skipif(not (triton_available() and triton_interpreting()),
                                       reason="Triton kernel test on CPU needs triton and TRITON_INTERPRET=1 "
                                              "(tox sets it)")


@needs_interpreter
@pytest.mark.parametrize(("b_layout", "c_layout"), [*((x, x) for x in LAYOUTS), ("shared", "grouped"),
                                                    ("per_step", "shared")])
@pytest.mark.parametrize(("length", "dim", "block_d", "options"), [(1, 2, 2, True), (6, 4, 2, False), (9, 6, 4, True)])
def test_triton_kernel_matches_reference_in_the_interpreter(b_layout: str, c_layout: str, length: int, dim: int,
                                                            block_d: int, options: bool) -> None:
    # several programs along D, the last one part-masked (D = 6, BLOCK_D = 4) with groups of 3 channels straddling
    # blocks; N = 3 padded to 4; L not a multiple of BLOCK_L = 4; with and without D, z, bias, softplus, h0
    from optimized.kernels.selective_scan import selective_scan_triton

    case = Case(batch=2, dim=dim, n_state=3, length=length, b_layout=b_layout, c_layout=c_layout, groups=2,
                has_D=options, has_z=options, has_bias=options, softplus=options, last_state=True, has_h0=options,
                seed=length)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, h0 = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, case.softplus, h0, block_d=block_d, block_l=4)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=torch.float32, model=True, grad=False)


@dataclass(frozen=True)
class KernelCase:
    dim: int
    n_state: int
    length: int
    layout: str
    groups: int
    block_d: int | None
    block_l: int | None
    has_D: bool
    has_z: bool
    has_bias: bool
    has_h0: bool


KERNEL_CASES = [
    # L = 1; L shorter than one tile; L not a multiple of BLOCK_L nor of the two tiles an iteration scans
    KernelCase(8, 16, 1, "per_step", 1, None, None, True, True, True, True),
    KernelCase(8, 16, 3, "shared", 1, None, None, False, True, False, True),
    KernelCase(8, 16, 11, "grouped", 1, None, None, True, False, True, False),
    KernelCase(16, 16, 21, "per_step", 1, None, None, False, False, False, False),
    # N not a power of two (5 -> 8, 13 -> 16, 1 -> 2); several programs along D, the last part-masked
    KernelCase(12, 5, 9, "per_step", 1, 8, 2, True, False, False, True),
    KernelCase(10, 13, 7, "shared", 1, 8, 4, False, True, True, False),
    KernelCase(8, 1, 6, "grouped", 2, 4, 1, True, True, False, True),
    # grouped: groups of 4 channels with BLOCK_D = 4 (one group per program) and with BLOCK_D = 8 (per channel)
    KernelCase(8, 3, 10, "grouped", 2, 4, 4, True, True, True, True),
    KernelCase(8, 3, 10, "grouped", 2, 8, 4, True, True, True, True),
    KernelCase(12, 4, 13, "grouped", 4, 8, 2, False, True, False, True),
]


def assert_kernel_case_matches_reference(kc: KernelCase, stages: int | None, seed: int) -> None:
    """`selective_scan_triton` with `stages` on one kernel case (values, float32 tolerance) against the reference."""
    from optimized.kernels.selective_scan import selective_scan_triton

    case = Case(batch=2, dim=kc.dim, n_state=kc.n_state, length=kc.length, b_layout=kc.layout, c_layout=kc.layout,
                groups=kc.groups, has_D=kc.has_D, has_z=kc.has_z, has_bias=kc.has_bias, softplus=kc.has_bias,
                last_state=True, has_h0=kc.has_h0, seed=seed)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, h0 = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, case.softplus, h0, block_d=kc.block_d,
                                     block_l=kc.block_l, stages=stages)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=torch.float32, model=True, grad=False)


@needs_interpreter
@pytest.mark.parametrize("kc", KERNEL_CASES, ids=lambda kc: f"D{kc.dim}-N{kc.n_state}-L{kc.length}-{kc.layout}"
                         f"{kc.groups}-bd{kc.block_d}-bl{kc.block_l}")
def test_triton_kernel_covers_lengths_states_layouts_and_options(kc: KernelCase) -> None:
    # the double-buffered kernel (`stages=None`): L = 1, L not a multiple of the tile nor of the two tiles an
    # iteration scans, N padded, all three B/C layouts (grouped read both as one group per program and gathered per
    # channel), D, z, delta_bias, softplus and h0 each on and off in some case; its default blocks where
    # block_d/block_l are None
    assert_kernel_case_matches_reference(kc, None, seed=kc.length + kc.dim)


@needs_interpreter
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("kc", [KERNEL_CASES[i] for i in (0, 2, 4, 6, 8)],
                         ids=lambda kc: f"D{kc.dim}-N{kc.n_state}-L{kc.length}-{kc.layout}{kc.groups}")
def test_pipelined_triton_kernel_matches_reference_in_the_interpreter(kc: KernelCase, stages: int) -> None:
    """`selective_scan_triton(..., stages=S)` (the software-pipelined kernel, the default with S = 3): the same
    cases as the double-buffered kernel's — L = 1, ragged lengths, padded N, the three layouts, options on and off;
    its own default blocks (16 channels, 8 steps at N = 16) where block_d/block_l are None."""
    assert_kernel_case_matches_reference(kc, stages, seed=kc.length + kc.dim + stages)


@pytest.mark.parametrize("stages", [0, -1, 2.0, True])
def test_pipelined_triton_kernel_rejects_a_bad_stage_count(stages: object) -> None:
    from optimized.kernels.selective_scan import selective_scan_triton

    u = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="stages must be an int >= 1"):
        selective_scan_triton(u, u, torch.zeros(4, 4), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8),
                              stages=stages)  # type: ignore[arg-type]


@needs_interpreter
@pytest.mark.parametrize("stages", [None, 3])
def test_triton_kernel_carries_the_state_across_many_tiles(stages: int | None) -> None:
    # Δ A ≈ −1e-3 over 203 steps (51 tiles of 4, 26 loop iterations): a dropped or doubled carry between tiles, or
    # a tile scanned from zero, changes out far beyond the tolerance
    from optimized.kernels.selective_scan import selective_scan_triton

    L = 203
    u = torch.zeros(1, 8, L)
    u[:, :, 0] = 1.0
    delta = torch.full((1, 8, L), 1e-2)
    A = torch.full((8, 16), -0.1)
    B = C = torch.ones(1, 16, L)
    out, last = selective_scan_triton(u, delta, A, B, C, stages=stages)
    expected = 16 * 1e-2 * torch.exp(-1e-3 * torch.arange(L, dtype=torch.float64))
    torch.testing.assert_close(out[0].double(), expected.expand(8, L), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(last.double(), torch.full((1, 8, 16), 1e-2 * math.exp(-1e-3 * (L - 1)),
                                                         dtype=torch.float64), rtol=1e-5, atol=1e-8)


@needs_interpreter
def test_triton_kernel_accumulates_half_inputs_in_float32() -> None:
    from optimized.kernels.selective_scan import selective_scan_triton

    case = Case(batch=1, dim=4, n_state=4, length=40, b_layout="per_step", c_layout="per_step", groups=1, has_D=True,
                has_z=True, has_bias=True, softplus=True, last_state=True, has_h0=False, seed=5)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, _ = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, True)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=torch.float16, model=True, grad=False)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernel_compiles_for_h100_without_a_gpu() -> None:
    # the interpreter runs the kernel's Python, not Triton's compiler, so a kernel that fails to compile (as an
    # earlier one did on Triton 3.6: its scan's combine function carried `Any` annotations) passes every interpreter
    # test: compile it for sm_90 here, in a process without TRITON_INTERPRET (which changes how Triton builds
    # kernels), with every option on and off and each way of reading B and C
    script = ("from optimized.kernels.selective_scan import compile_for_gpu\n"
              "for dtype, options, mode in (('bf16', True, 1), ('fp32', False, 0), ('fp16', True, 2)):\n"
              "    assert 'cubin' in compile_for_gpu(90, dtype, options=options, matrix_mode=mode).asm\n"
              "    if mode != 2:  # the backward kernel: SHARED and ONE_GROUP\n"
              "        kernel = compile_for_gpu(90, dtype, options=options, matrix_mode=mode, backward=True,\n"
              "                                 maxnreg=None)\n"
              "        assert 'cubin' in kernel.asm\n"
              "# the pipelined kernel: tile loads become asynchronous copies to shared memory (LDGSTS), no spills\n"
              "# at 8 channels (half inputs: with 4-step tiles Triton 3.9 keeps them synchronous, with 8-step not)\n"
              "for dtype, block_l in (('fp32', 4), ('bf16', 8)):\n"
              "    sass = compile_for_gpu(90, dtype, stages=3, block_l=block_l).asm['sass']\n"
              "    assert 'LDGSTS' in sass and 'STL' not in sass, dtype\n"
              "# its default launch (16 channels, 8 steps) compiles and copies asynchronously (it spills under the\n"
              "# 128-register cap, and was still the fastest launch measured)\n"
              "for dtype in ('fp32', 'bf16'):\n"
              "    assert 'LDGSTS' in compile_for_gpu(90, dtype, stages=3, block_d=16, block_l=8).asm['sass']\n")
    assert_compiles(script)


@needs_interpreter
def test_triton_autograd_wrapper_gradients_match_reference() -> None:
    from optimized.kernels.selective_scan import selective_scan_triton_autograd

    case = Case(batch=1, dim=2, n_state=2, length=5, b_layout="per_step", c_layout="grouped", groups=2,
                has_D=True, has_z=True, has_bias=True, softplus=True, last_state=True, has_h0=True, seed=4)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, h0 = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton_autograd(u, delta, A, B, C, D, z, bias, True, h0)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=torch.float32, model=True)


def _backward_kernel_check(case: Case, device: str = "cpu", dtype: torch.dtype = torch.float32,
                           block_d: int | None = None, block_l: int | None = None) -> None:
    """`selective_scan_triton_backward` against autograd of the float64 reference, every gradient (the last state's
    cotangent included), at the long-scan tolerance of `dtype`."""
    from optimized.kernels.selective_scan import selective_scan_triton_backward

    inputs = _inputs(case)
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    u, delta, A, B, C, D, z, bias, h0 = leaves
    assert u is not None and delta is not None and A is not None and B is not None and C is not None
    out, last = ref.selective_scan(u, delta, A, B, C, D, z, bias, case.softplus, True, initial_state=h0)
    g_out = make_tensor(tuple(out.shape), case.seed + 20)
    g_last = make_tensor(tuple(last.shape), case.seed + 21)
    present = [x for x in leaves if x is not None]
    expected = iter(torch.autograd.grad((out, last), present, (g_out, g_last), allow_unused=True))
    moved = [x.to(device, dtype) if x is not None else None for x in inputs]
    mu, mdelta, mA, mB, mC, mD, mz, mbias, mh0 = moved
    assert mu is not None and mdelta is not None and mA is not None and mB is not None and mC is not None
    got = selective_scan_triton_backward(mu, mdelta, mA.float(), mB, mC, mD, mz, mbias, case.softplus, mh0,
                                         g_out.to(device, dtype), g_last.to(device), block_d=block_d,
                                         block_l=block_l)
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0"]
    for name, x, grad in zip(names, inputs, got, strict=True):
        if x is None:
            assert grad is None, name
            continue
        want = next(expected)
        assert grad is not None and grad.shape == x.shape, name
        assert_close_scaled(grad.cpu().double(), torch.zeros_like(x) if want is None else want,
                            tolerance(dtype, model=True), name)


BACKWARD_CASES = [
    # every option on, several tiles with L not a multiple of BLOCK_L, two programs along D
    (Case(2, 8, 3, 9, "per_step", "per_step", 1, True, True, True, True, True, True, 1), 4, 4),
    # (D, N) B and C (sums over time), no options; six channels over two programs of four (the last part-masked)
    (Case(1, 6, 4, 6, "shared", "shared", 1, False, False, False, False, True, False, 2), 4, 2),
    # B grouped in two groups of 8 channels = BLOCK_D (one group per program), C per step; bias without softplus
    (Case(2, 16, 5, 13, "grouped", "per_step", 2, True, False, True, False, True, True, 3), None, None),
    # L = 1; N = 16 (the default blocks); C shared
    (Case(1, 8, 16, 1, "per_step", "shared", 1, True, True, True, True, True, True, 4), None, None),
    # 51 tiles: the adjoint carried across many tiles
    (Case(1, 4, 2, 203, "per_step", "grouped", 1, True, True, False, True, True, False, 5), 4, 4),
]


@needs_interpreter
@pytest.mark.parametrize(("case", "block_d", "block_l"), BACKWARD_CASES,
                         ids=lambda x: f"{x.b_layout}-{x.c_layout}-L{x.length}" if isinstance(x, Case) else None)
def test_triton_backward_kernel_matches_reference_gradients(case: Case, block_d: int | None,
                                                            block_l: int | None) -> None:
    _backward_kernel_check(case, block_d=block_d, block_l=block_l)


@needs_interpreter
@given(case=cases(), block_d=st.sampled_from([1, 2]), block_l=st.sampled_from([1, 2, 4]))
def test_triton_backward_kernel_matches_reference_gradients_for_drawn_cases(case: Case, block_d: int,
                                                                          block_l: int) -> None:
    from optimized.kernels.selective_scan import triton_backward_supported

    u, _, _, B, C, *_ = _inputs(case)
    assert u is not None and B is not None and C is not None
    assume(triton_backward_supported(u, B, C, block_d))
    _backward_kernel_check(case, block_d=block_d, block_l=block_l)


@needs_interpreter
def test_triton_backward_kernel_refuses_per_channel_groups_and_autograd_falls_back() -> None:
    from optimized.kernels.selective_scan import (
        selective_scan_triton_backward,
        triton_backward_supported,
        use_triton_backward,
    )

    # groups of 3 channels with BLOCK_D = 8: read per channel, which the backward kernel does not take
    case = Case(1, 6, 2, 5, "grouped", "per_step", 2, False, False, False, False, True, False, 6)
    u, delta, A, B, C, *_ = (x.float() for x in _inputs(case) if x is not None)
    assert not triton_backward_supported(u, B, C)
    with pytest.raises(ValueError, match="per-channel"):
        selective_scan_triton_backward(u, delta, A, B, C, None, None, None, False, None, torch.ones_like(u), None)
    assert not use_triton_backward(u, B, C)


def test_scan_backward_switch_names_its_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimized.kernels.selective_scan import use_triton_backward

    u, B = torch.zeros(1, 4, 3), torch.zeros(4, 2)
    monkeypatch.setenv("MEMARCH_SCAN_BACKWARD", "torch")
    assert not use_triton_backward(u, B, B)
    monkeypatch.setenv("MEMARCH_SCAN_BACKWARD", "cuda")
    with pytest.raises(ValueError, match="'triton' or 'torch'"):
        use_triton_backward(u, B, B)


@needs_interpreter
def test_triton_autograd_wrapper_uses_the_backward_kernel_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimized.kernels.selective_scan import selective_scan_triton_autograd

    case = Case(batch=2, dim=8, n_state=3, length=7, b_layout="per_step", c_layout="shared", groups=1, has_D=True,
                has_z=True, has_bias=True, softplus=True, last_state=True, has_h0=True, seed=8)
    monkeypatch.delenv("MEMARCH_SCAN_BACKWARD", raising=False)

    def no_torch_backward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the torch chunked backward ran: the kernel was not used")

    monkeypatch.setattr(opt, "chunked_scan", no_torch_backward)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, h0 = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton_autograd(u, delta, A, B, C, D, z, bias, True, h0)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=torch.float32, model=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("case", "block_d", "block_l"), [
    *BACKWARD_CASES[:3], (Case(2, 64, 16, 300, "per_step", "per_step", 1, True, True, True, True, True, True, 9), None,
                          None)])
def test_cuda_triton_backward_kernel_matches_reference_gradients(dtype: torch.dtype, case: Case,
                                                                 block_d: int | None, block_l: int | None) -> None:
    _backward_kernel_check(case, "cuda", dtype, block_d, block_l)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels_off", [False, True])
def test_cuda_scan_matches_reference(dtype: torch.dtype, kernels_off: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default CUDA branch (our Triton kernel) and, with it switched off, mamba-ssm's kernel where it loads
    (else the torch chunked scan), forward and gradients."""
    if kernels_off:
        monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", "scan")
    case = Case(batch=2, dim=8, n_state=16, length=300, b_layout="per_step", c_layout="per_step", groups=1,
                has_D=True, has_z=True, has_bias=True, softplus=True, last_state=False, has_h0=False, seed=0)
    branch = opt.scan_dispatch(torch.zeros(1, device="cuda"))
    assert branch == ("triton" if not kernels_off else
                      "mamba_ssm.cuda" if opt.mamba_ssm_unavailable_reason() == "" else "torch-chunked")
    print(f"dispatch: {branch}")
    assert_equivalent(_as_fn(ref, case), _as_fn(opt, case), _inputs(case), dtype=dtype, model=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout", "groups"), [("shared", 1), ("per_step", 1), ("grouped", 4), ("grouped", 6)])
def test_cuda_triton_kernel_matches_reference_for_every_layout(dtype: torch.dtype, layout: str, groups: int) -> None:
    # the compiled kernel (not the interpreter): several programs, L = 1001 not a multiple of the tile, N = 16;
    # grouped with D/G = 12 channels (not a multiple of BLOCK_D = 8: gathered per channel) and D/G = 8 (one group
    # per program)
    from optimized.kernels.selective_scan import selective_scan_triton

    case = Case(batch=2, dim=48, n_state=16, length=1001, b_layout=layout, c_layout=layout, groups=groups,
                has_D=True, has_z=True, has_bias=True, softplus=True, last_state=True, has_h0=True, seed=1)

    def kernel(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta, A, B, C, D, z, bias, h0 = args
        assert u is not None and delta is not None and A is not None and B is not None and C is not None
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, True, h0)

    assert_equivalent(_as_fn(ref, case), kernel, _inputs(case), dtype=dtype, model=True, grad=False, device="cuda")


def _mamba_selective_scan_ref() -> Callable[..., Any]:
    if importlib.util.find_spec("selective_scan_cuda") is None:
        pytest.skip("mamba-ssm not importable here: its CUDA extension selective_scan_cuda is missing "
                    "(see ENVIRONMENT.md); our reference cannot be compared with its selective_scan_ref")
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mamba_ssm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "selective_scan_interface.py"
    file_spec = importlib.util.spec_from_file_location("_test_mamba_selective_scan", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.selective_scan_ref


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_agrees_with_mamba_ssm_selective_scan_ref(layout: str) -> None:
    mamba_ref = _mamba_selective_scan_ref()
    case = Case(batch=2, dim=4, n_state=3, length=13, b_layout=layout, c_layout=layout, groups=2, has_D=True,
                has_z=True, has_bias=True, softplus=True, last_state=True, has_h0=False, seed=11)
    u, delta, A, B, C, D, z, bias = (x.float() for x in _inputs(case)[:8] if x is not None)
    theirs = mamba_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    ours = ref.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_bad_scan_inputs_raise_errors_naming_the_argument(impl: Any) -> None:
    u, delta, A = torch.zeros(2, 4, 5), torch.zeros(2, 4, 5), -torch.ones(4, 3)
    B = C = torch.zeros(2, 3, 5)
    with pytest.raises(ShapeError, match=r"selective_scan: u must have 3 dimensions \(B, D, L\)"):
        impl.selective_scan(u[0], delta, A, B, C)
    with pytest.raises(ShapeError, match=r"delta must have the shape of u"):
        impl.selective_scan(u, delta[:, :, :4], A, B, C)
    with pytest.raises(ShapeError, match=r"A.shape\[0\] must be 4"):
        impl.selective_scan(u, delta, -torch.ones(3, 3), B, C)
    with pytest.raises(ShapeError, match=r"B must have shape .*got \(2, 3, 3, 5\)"):
        impl.selective_scan(u, delta, A, torch.zeros(2, 3, 3, 5), C)
    with pytest.raises(ShapeError, match=r"C must have shape .*got \(2, 4, 5\)"):
        impl.selective_scan(u, delta, A, B, torch.zeros(2, 4, 5))
    with pytest.raises(ShapeError, match=r"initial_state must have shape \(B, D, N\) = \(2, 4, 3\)"):
        impl.selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 4, 2))
    with pytest.raises(ShapeError, match=r"at least one time step"):
        impl.selective_scan(u[..., :0], delta[..., :0], A, B[..., :0], C[..., :0])
    with pytest.raises(DTypeError, match="u must be a floating-point tensor"):
        impl.selective_scan(u.long(), delta, A, B, C)
    with pytest.raises(ShapeError, match=r"delta_bias.shape\[0\] must be 4"):
        impl.selective_scan(u, delta, A, B, C, delta_bias=torch.zeros(3))
    with pytest.raises(ShapeError, match=r"selective_scan_step: state must have shape \(B, D, N\)"):
        impl.selective_scan_step(torch.zeros(2, 4, 2), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0])


def test_kernels_can_be_switched_off_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEMARCH_DISABLE_KERNELS sends the named kernels (or all) to their torch path; others keep theirs."""
    from types import SimpleNamespace
    from typing import cast

    import optimized.kernels as kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    fake_cuda = cast(torch.Tensor, SimpleNamespace(is_cuda=True))
    monkeypatch.delenv("MEMARCH_DISABLE_KERNELS", raising=False)
    assert kernels.kernel_available(fake_cuda, "omega") and kernels.kernel_available(fake_cuda, "scan")
    monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", " omega , titans")
    assert kernels.kernels_disabled() == {"omega", "titans"}
    assert not kernels.kernel_available(fake_cuda, "omega")
    assert kernels.kernel_available(fake_cuda, "scan")
    monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", "all")
    assert not kernels.kernel_available(fake_cuda, "scan")
    assert not kernels.kernel_available(torch.zeros(1), "scan")  # CPU tensors never take a kernel by default


def test_scan_benchmark_reports_the_compiled_and_the_autograd_paths_on_cpu() -> None:
    from training.benchmarks import BenchArgs, discover

    registry = discover()
    rows = registry["scan"](BenchArgs(device=torch.device("cpu"), quick=True, repeat=1))
    compiled = cpu_scan.unavailable_reason() == ""
    first = [row.impl for row in rows[:3 if compiled else 2]]
    assert first == ["reference", "optimized", "optimized:torch-chunked"][:len(first)]
    assert rows[1].dispatch == ("cpu-compiled" if compiled else "torch-chunked")
    assert all(row.ms > 0 for row in rows) and "x reference" in rows[1].note
    training = [row for row in rows if row.impl.endswith("fwd+bwd")]
    assert [row.impl for row in training[:2]] == ["reference fwd+bwd", "optimized fwd+bwd"]
    assert "x reference" in training[1].note
    assert registry["scan_sweep"](BenchArgs(device=torch.device("cpu"), quick=True, repeat=1)) == []  # CUDA only


def test_torch_compile_runs_through_the_scan_and_matches_eager() -> None:
    # on a CPU with a compiler the compiled C scan runs eagerly inside the graph (a graph break), grads included
    case = Case(batch=1, dim=4, n_state=3, length=70, b_layout="per_step", c_layout="per_step", groups=1, has_D=True,
                has_z=True, has_bias=True, softplus=True, last_state=False, has_h0=False, seed=5)
    inputs = [x.requires_grad_(True) for x in _inputs(case)[:8] if x is not None]

    def loss(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = opt.selective_scan(u, delta, A, B, C, D, z, bias, True)
        assert isinstance(out, torch.Tensor)
        return (out * out).sum()

    eager = loss(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(loss, backend="eager")(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_compiled_cpu_scan_never_takes_a_call_with_a_tensor_off_the_cpu() -> None:
    # it reads raw pointers: one tensor elsewhere (here the meta device) must send the call to the torch path
    x = torch.zeros(1, 2, 3)
    assert opt.scan_dispatch(x, torch.zeros(2, 4, device="meta")) == "torch-chunked"
    assert opt.scan_dispatch(x, initial_state=torch.zeros(1, 2, 4, device="meta")) == "torch-chunked"


@pytest.mark.gpu
def test_scan_benchmark_on_cuda_reports_the_kernel_the_peer_and_training_rows() -> None:
    from training.benchmarks import BenchArgs, discover

    registry = discover()
    rows = registry["scan"](BenchArgs(device=torch.device("cuda"), quick=True, repeat=1))
    impls = [row.impl for row in rows]
    assert {"reference", "optimized", "optimized:triton", "optimized fwd+bwd"} <= set(impls)
    assert ("peer:mamba_ssm" in impls) == (opt.mamba_ssm_unavailable_reason() == "")
    # the floors divide by the copy bandwidth measured in the same run; the kernel without z has its own floor
    assert rows[0].impl == "peer:copy" and rows[0].floor_fraction == 1.0
    assert all(row.floor_fraction is not None and row.floor_fraction > 0 for row in rows if row.impl != "reference"
               and "fwd+bwd" not in row.impl)
    assert any(row.impl == "optimized:triton" and row.params.endswith(" no z") for row in rows)
    assert any(row.impl == "optimized:triton" and row.note.startswith("synchronised") for row in rows)
    # our Triton forward and backward kernels get their own row, whichever branch the default takes
    triton_rows = [row for row in rows if row.impl == "optimized:triton fwd+bwd (Triton backward)"]
    assert triton_rows and all(row.ms > 0 and "default fwd+bwd" in row.note for row in triton_rows)
    sweep = registry["scan_sweep"](BenchArgs(device=torch.device("cuda"), quick=True, repeat=1))
    assert sweep and all(row.ms > 0 and "max |Δ|" in row.note for row in sweep)


def test_a_failed_build_falls_back_to_the_torch_scan_and_says_why_once(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MEMARCH_CACHE_DIR", str(blocker / "cache"))  # cannot be created: a file is in the way
    cpu_scan._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU selective scan is unavailable .*slower torch path"):
            reason = cpu_scan.unavailable_reason()
        assert "failed" in reason and "not-a-directory" in reason
        assert opt.scan_dispatch(torch.zeros(1, 1, 1)) == "torch-chunked"
        u = make_tensor((1, 2, 5), 0)
        out = opt.selective_scan(u, u.abs(), -torch.ones(2, 3, dtype=u.dtype), make_tensor((1, 3, 5), 1),
                                 make_tensor((1, 3, 5), 2))
        expected = ref.selective_scan(u, u.abs(), -torch.ones(2, 3, dtype=u.dtype), make_tensor((1, 3, 5), 1),
                                      make_tensor((1, 3, 5), 2))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    finally:
        cpu_scan._build.cache_clear()  # the next call builds (or finds) the library in the real cache again
