"""VSA binding ops: optimized ≡ reference (outputs and gradients), algebraic laws, inverses, key generators,
traces, cleanup, and bad input. The slot memory and the capacity bounds are in tests/test_vsa_memory.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import partial
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import optimized.vsa as opt
import reference.vsa as ref
from reference.validation import ConfigError, DTypeError, MemarchError, NonFiniteError, ShapeError
from tests.equivalence import assert_equivalent
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance

CPU_DTYPES = st.sampled_from([torch.float64, torch.float32])
MODES = st.sampled_from(["circular", "elementwise"])
# odd, even, 1 and primes
DIMS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 19, 23])
LEADS = st.lists(st.integers(1, 3), max_size=2).map(tuple)
IMPLS = pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
F64 = tolerance(torch.float64)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """MKL's threaded FFT spends ~10 ms per call in thread barriers on a loaded 2-core machine; the tiny test
    sizes run in microseconds on one thread (numbers are unchanged)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual, expected, rtol=F64.rtol, atol=F64.atol * scale)


# ---------------------------------------------------------------------------------------------- equivalence

@given(dim=DIMS, lead_a=LEADS, items=st.integers(1, 3), mode=MODES, dtype=CPU_DTYPES, seed=seeds)
def test_bind_and_unbind_optimized_match_reference_with_broadcasting(dim: int, lead_a: tuple[int, ...],
                                                                     items: int, mode: str,
                                                                     dtype: torch.dtype, seed: int) -> None:
    a = make_tensor((*lead_a, 1, dim), seed)  # the extra 1 broadcasts against b's items
    b = make_tensor((items, dim), seed + 1)
    assert_equivalent(ref.bind, opt.bind, (a, b), dtype=dtype, kwargs={"mode": mode})
    assert_equivalent(ref.unbind, opt.unbind, (b, a), dtype=dtype, kwargs={"mode": mode})


@given(dim=DIMS, dtype=CPU_DTYPES, seed=seeds)
def test_inverses_and_unitary_projection_optimized_match_reference(dim: int, dtype: torch.dtype, seed: int) -> None:
    a = make_tensor((3, dim), seed)
    # both maps amplify input round-off by 1/|A_f| (1/|A_f|² for the inverse): float32 is compared on
    # well-conditioned spectra only, as the optimized docstring states
    assume(dtype == torch.float64 or float(torch.fft.fft(a).abs().min()) > 0.5)
    assert_equivalent(ref.exact_inverse, opt.exact_inverse, (a,), dtype=dtype, kwargs={"eps": 1e-3})
    assert_equivalent(ref.make_unitary, opt.make_unitary, (a,), dtype=dtype)
    assert_equivalent(ref.involution, opt.involution, (a,), dtype=dtype)


@given(n=st.integers(1, 5), dim=DIMS, weighted=st.booleans(), k=st.integers(1, 5), dtype=CPU_DTYPES, seed=seeds)
def test_bundle_and_cleanup_optimized_match_reference(n: int, dim: int, weighted: bool, k: int, dtype: torch.dtype,
                                                      seed: int) -> None:
    items = make_tensor((2, n, dim), seed)
    weights = make_tensor((n,), seed + 1) if weighted else None
    assert_equivalent(ref.bundle, opt.bundle, (items, weights), dtype=dtype)
    assert_equivalent(ref.bundle, opt.bundle, (items.transpose(0, 1), weights), dtype=dtype, kwargs={"dim": 0})
    codebook = make_tensor((k + 2, dim), seed + 2)
    query = make_tensor((2, 3, dim), seed + 3)
    assert_equivalent(lambda q, c: ref.cleanup(q, c, k), lambda q, c: opt.cleanup(q, c, k), (query, codebook),
                      dtype=dtype)


@given(dim=st.integers(1, 12), seed=seeds)
def test_key_generators_are_seeded_and_identical_across_impls(dim: int, seed: int) -> None:
    for name in ("random_hrr", "random_bipolar", "random_unitary"):
        draw_ref = getattr(ref, name)(dim, (4,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        draw_opt = getattr(opt, name)(dim, (4,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        again = getattr(opt, name)(dim, (4,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert draw_ref.shape == (4, dim)
        close(draw_opt, draw_ref)
        assert torch.equal(draw_opt, again)


def test_key_generators_have_the_stated_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    dim = 512
    hrr = ref.random_hrr(dim, (64,), generator=g, dtype=torch.float64)
    assert abs(float(hrr.var()) * dim - 1.0) < 0.02  # N(0, 1/D): 32768 draws, sd of the estimate ≈ 0.008
    assert abs(float((hrr * hrr).sum(-1).mean()) - 1.0) < 0.02
    bip = ref.random_bipolar(dim, (64,), generator=g)
    assert set(bip.unique().tolist()) == {-1.0, 1.0} and abs(float(bip.mean())) < 0.03
    uni = opt.random_unitary(dim, (8,), generator=g, dtype=torch.float64)
    close(torch.fft.rfft(uni).abs(), torch.ones(8, dim // 2 + 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- literal sum

def brute_force_convolution(a: list[float], b: list[float]) -> list[float]:
    d = len(a)
    return [sum(a[j] * b[(k - j) % d] for j in range(d)) for k in range(d)]


@IMPLS
@given(dim=DIMS, seed=seeds)
def test_bind_equals_the_literal_circular_sum_for_odd_even_prime_and_unit_dims(impl: ModuleType, dim: int,
                                                                               seed: int) -> None:
    a, b = make_tensor((dim,), seed), make_tensor((dim,), seed + 1)
    expected = torch.tensor(brute_force_convolution(a.tolist(), b.tolist()), dtype=torch.float64)
    close(impl.bind(a, b), expected, scale=dim)
    correlation = [sum(a[j].item() * b[(k + j) % dim].item() for j in range(dim)) for k in range(dim)]
    close(impl.unbind(b, a), torch.tensor(correlation, dtype=torch.float64), scale=dim)


@IMPLS
def test_bind_with_dimension_one_is_the_product(impl: ModuleType) -> None:
    a, b = make_tensor((5, 1), 0), make_tensor((5, 1), 1)
    close(impl.bind(a, b), a * b)
    close(impl.unbind(a * b, a), a * a * b)


# ---------------------------------------------------------------------------------------------- algebra

@IMPLS
@given(dim=DIMS, mode=MODES, seed=seeds)
def test_binding_is_commutative_associative_distributive_with_identity(impl: ModuleType, dim: int, mode: str,
                                                                        seed: int) -> None:
    a, b, c = (make_tensor((2, dim), seed + i) for i in range(3))
    scale = float(dim)
    close(impl.bind(a, b, mode), impl.bind(b, a, mode), scale)
    close(impl.bind(impl.bind(a, b, mode), c, mode), impl.bind(a, impl.bind(b, c, mode), mode), scale * scale)
    items = torch.stack([b, c], dim=-2)  # (2, 2, D)
    close(impl.bind(a, impl.bundle(items), mode), impl.bundle(impl.bind(a[:, None], items, mode)), scale)
    e = impl.identity(dim, mode, dtype=torch.float64)
    close(impl.bind(e, a, mode), a, scale)
    assert not torch.allclose(impl.bind(a, b, mode), a * 0 + b) or dim == 1  # binding changes the vector


@IMPLS
@given(dim=st.integers(1, 24), seed=seeds)
def test_elementwise_unbind_recovers_exactly_with_bipolar_keys(impl: ModuleType, dim: int, seed: int) -> None:
    key = ref.random_bipolar(dim, (3,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    value = make_tensor((3, dim), seed)
    assert torch.equal(impl.unbind(impl.bind(key, value, "elementwise", strict=True), key, "elementwise",
                                   strict=True), value)


@IMPLS
@given(dim=DIMS, seed=seeds)
def test_unitary_keys_unbind_exactly_and_preserve_norms(impl: ModuleType, dim: int, seed: int) -> None:
    key = impl.random_unitary(dim, (3,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    value = make_tensor((3, dim), seed)
    bound = impl.bind(key, value)
    close(impl.unbind(bound, key), value, dim)
    close(torch.linalg.vector_norm(bound, dim=-1), torch.linalg.vector_norm(value, dim=-1), dim)
    close(impl.involution(key), impl.exact_inverse(key, 0.0), dim)  # a† = a⁻¹ for unitary a


@IMPLS
@given(dim=DIMS, seed=seeds)
def test_exact_inverse_inverts_and_involution_is_an_involution(impl: ModuleType, dim: int, seed: int) -> None:
    a = make_tensor((2, dim), seed) + 3.0  # a DC offset keeps every bin away from 0
    spectrum_min = float(torch.fft.fft(a).abs().min())
    if spectrum_min < 1e-3:
        return
    close(impl.bind(impl.exact_inverse(a, 0.0), a), impl.identity(dim, dtype=torch.float64).expand(2, dim),
          dim / spectrum_min**2)
    close(impl.involution(impl.involution(a)), a)
    c = make_tensor((2, dim), seed + 1)
    close(impl.unbind(c, a), impl.bind(impl.involution(a), c), dim)


@IMPLS
def test_exact_inverse_epsilon_guards_vanishing_frequencies(impl: ModuleType) -> None:
    a = torch.ones(8, dtype=torch.float64)  # DFT: 8 at f = 0, zero elsewhere
    inv = impl.exact_inverse(a, 1e-6)
    assert bool(torch.isfinite(inv).all())
    # (1/D)·A_0/(A_0² + eps); round-off in the empty bins is amplified by at most 1/eps
    torch.testing.assert_close(inv, torch.full((8,), 1 / (64 + 1e-6), dtype=torch.float64), rtol=0, atol=1e-8)
    unguarded = impl.exact_inverse(a, 0.0)  # empty bins hold round-off (or exact 0): huge or non-finite
    assert not bool(torch.isfinite(unguarded).all()) or float(unguarded.abs().max()) > 1e6


# ---------------------------------------------------------------------------------------------- traces

@IMPLS
@given(dim=st.integers(1, 16), lam=st.floats(0.0, 1.0), seed=seeds)
def test_decay_never_grows_the_trace_and_rms_normalize_gives_unit_rms(impl: ModuleType, dim: int, lam: float,
                                                                       seed: int) -> None:
    trace = make_tensor((3, dim), seed) + 0.1
    norm = torch.linalg.vector_norm(trace, dim=-1)
    decayed = impl.decay(trace, lam)
    close(torch.linalg.vector_norm(decayed, dim=-1), lam * norm)
    per_slot = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert bool((torch.linalg.vector_norm(impl.decay(trace, per_slot), dim=-1) <= norm).all())
    normalized = impl.rms_normalize(trace, 0.0)
    close(normalized.pow(2).mean(-1).sqrt(), torch.ones(3, dtype=torch.float64))


@IMPLS
def test_cleanup_returns_the_stored_item_with_best_scores_first(impl: ModuleType) -> None:
    g = torch.Generator().manual_seed(0)
    codebook = ref.random_hrr(256, (10,), generator=g, dtype=torch.float64)
    noisy = codebook[[3, 7]] + 0.5 * ref.random_hrr(256, (2,), generator=g, dtype=torch.float64)
    out = impl.cleanup(noisy, codebook, k=3)
    assert out.indices[:, 0].tolist() == [3, 7]
    assert bool((out.scores[:, :-1] >= out.scores[:, 1:]).all())
    close(out.vectors[:, 0], codebook[[3, 7]])
    close(out.scores, impl.cosine(noisy[:, None], out.vectors))


# ---------------------------------------------------------------------------------------------- bad input

@IMPLS
def test_binding_rejects_bad_shapes_dtypes_modes_and_nonbipolar_strict_keys(impl: ModuleType) -> None:
    a = torch.ones(2, 4)
    with pytest.raises(ShapeError, match=r"bind: a and b must have the same last dimension D.*\(2, 4\).*\(2, 5\)"):
        impl.bind(a, torch.ones(2, 5))
    with pytest.raises(ShapeError, match=r"unbind: c and a must have the same last dimension"):
        impl.unbind(torch.ones(3), a)
    with pytest.raises(ShapeError, match="do not broadcast"):
        impl.bind(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ShapeError, match=r"a has D = 0"):
        impl.bind(torch.ones(2, 0), torch.ones(2, 0))
    with pytest.raises(DTypeError, match=r"b must be a floating-point tensor.*torch.int64"):
        impl.bind(a, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(DTypeError, match="a must be a floating-point tensor"):
        impl.involution(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ConfigError, match=r"mode must be one of \('circular', 'elementwise'\), got 'holo'"):
        impl.bind(a, a, "holo")
    with pytest.raises(MemarchError, match=r"bipolar key a.*got 1 other value\(s\), e.g. 0.5"):
        impl.bind(torch.tensor([1.0, -1.0, 0.5]), torch.ones(3), "elementwise", strict=True)
    with pytest.raises(MemarchError, match="bipolar key a"):
        impl.unbind(torch.ones(3), torch.tensor([1.0, 2.0, -1.0]), "elementwise", strict=True)
    impl.bind(torch.tensor([1.0, 2.0]), torch.ones(2), "elementwise")  # not strict: allowed
    with pytest.raises(ShapeError, match=r"dim \(D\) must be an int >= 1, got 0"):
        impl.random_hrr(0)


@IMPLS
def test_traces_with_nan_and_bad_arguments_raise_clear_errors(impl: ModuleType) -> None:
    trace = torch.ones(2, 4)
    trace[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"decay: trace holds 1 non-finite value"):
        impl.decay(trace, 0.5)
    with pytest.raises(NonFiniteError, match=r"rms_normalize: trace holds 1 non-finite"):
        impl.rms_normalize(trace)
    with pytest.raises(NonFiniteError, match=r"cleanup: codebook holds 1 non-finite"):
        impl.cleanup(torch.ones(4), trace)
    with pytest.raises(MemarchError, match=r"decay: lam must lie in \[0.0, 1.0\], got 1.5"):
        impl.decay(torch.ones(4), 1.5)
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, N=2\]"):
        impl.cleanup(torch.ones(4), torch.ones(2, 4), k=3)
    with pytest.raises(ShapeError, match=r"weights must have shape \(3,\)"):
        impl.bundle(torch.ones(3, 4), torch.ones(2))
    with pytest.raises(MemarchError, match=r"eps must be >= 0"):
        impl.exact_inverse(torch.ones(4), -1.0)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["circular", "elementwise"])
def test_bind_unbind_on_cuda_match_reference(dtype: torch.dtype, mode: str) -> None:
    a, b = make_tensor((4, 1, 64), 0), make_tensor((3, 64), 1)
    assert_equivalent(ref.bind, opt.bind, (a, b), dtype=dtype, kwargs={"mode": mode}, device="cuda")
    assert_equivalent(ref.unbind, opt.unbind, (b, a), dtype=dtype, kwargs={"mode": mode}, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [512, 1024, 2048, 4096, 8192])
def test_fused_cuda_bind_and_unbind_match_reference(dim: int) -> None:
    """The fused kernel (`optimized/kernels/hrr_bind.cu`) at every D it takes, a batch of (2, 3) rows (an odd
    count: the last block has one row): outputs and gradients of bind and unbind against the float64 reference,
    float32 tolerance."""
    from optimized.kernels.hrr_bind import unavailable_reason

    assert unavailable_reason() == "", unavailable_reason()
    a, b = make_tensor((2, 3, dim), 0), make_tensor((2, 3, dim), 1)
    assert opt.bind_dispatch(a.cuda().float(), b.cuda().float()) == "cuda-fused"
    assert_equivalent(ref.bind, opt.bind, (a, b), dtype=torch.float32, device="cuda")
    assert_equivalent(ref.unbind, opt.unbind, (b, a), dtype=torch.float32, device="cuda")


@pytest.mark.gpu
def test_fused_cuda_bind_leaves_what_it_does_not_take_to_torch_fft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broadcast shapes, bf16, D outside 512..8192 or not a power of two, and `MEMARCH_DISABLE_KERNELS=bind` keep
    the torch.fft path; non-contiguous operands of one shape take the kernel (it copies them)."""
    x = torch.randn(4, 1024, device="cuda")
    assert opt.bind_dispatch(x, x[:1]) == "torch.fft"
    assert opt.bind_dispatch(x.bfloat16(), x.bfloat16()) == "torch.fft"
    assert opt.bind_dispatch(x[:, :256], x[:, :256]) == "torch.fft"
    assert opt.bind_dispatch(x[:, :1000], x[:, :1000]) == "torch.fft"
    long = torch.randn(2, 16384, device="cuda")
    assert opt.bind_dispatch(long, long) == "torch.fft"
    strided = torch.randn(1024, 4, device="cuda").t()  # (4, 1024), not contiguous
    assert opt.bind_dispatch(strided, x) == "cuda-fused"
    expect = ref.bind(strided.double(), x.double())
    assert (opt.bind(strided, x).double() - expect).abs().max() <= 1e-5 * expect.abs().max()
    monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", "bind")
    assert opt.bind_dispatch(x, x) == "torch.fft"


@pytest.mark.parametrize(("dim", "values"), [(512, 0), (1024, 0), (2048, 0), (4096, 0), (8192, 0), (512, 4),
                                             (2048, 8), (1024, 32)])
def test_fused_bind_kernel_compiled_for_the_cpu_matches_reference(dim: int, values: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA kernel's source run on the CPU (`hrr_bind_emulate.cpp`: a std::thread per CUDA thread, a barrier per
    __syncthreads): bind and unbind, outputs and gradients (which run the kernel again) against the float64
    reference, at every D the GPU dispatch takes with the default build (0: 16 values per thread, 32 at 8192), and
    builds with 8 and 32 values per thread (which `--op bind_sweep` times) and 4 (which the source still takes);
    3 rows, so the last block has one."""
    from optimized.kernels import hrr_bind

    if hrr_bind.emulator_unavailable_reason():
        pytest.skip(hrr_bind.emulator_unavailable_reason())
    monkeypatch.setattr(hrr_bind, "_launch", partial(hrr_bind._launch, values=values))
    a, b = make_tensor((3, dim), 0), make_tensor((3, dim), 1)
    assert_equivalent(ref.bind, hrr_bind.fused_bind, (a, b), dtype=torch.float32)
    assert_equivalent(ref.unbind, lambda c, key: hrr_bind.fused_bind(key, c, True), (b, a), dtype=torch.float32)


def test_fused_bind_kernel_values_per_thread_per_dimension() -> None:
    """The default build's values per thread (read from the kernel source's build: 16, 32 at D = 8192, 0 for a D
    it does not take), and a clear error for a build the source has no plan for."""
    from optimized.kernels import hrr_bind

    if hrr_bind.emulator_unavailable_reason():
        pytest.skip(hrr_bind.emulator_unavailable_reason())
    assert [hrr_bind.default_values(dim) for dim in (*hrr_bind.SUPPORTED_DIMS, 16384)] == [16, 16, 16, 16, 32, 0]
    with pytest.raises(ValueError, match="values per thread must be 4, 8, 16 or 32"):
        hrr_bind._emulator(12)


@pytest.mark.gpu
def test_bind_sweep_benchmark_on_cuda_times_every_build_against_torch_fft() -> None:
    from training.benchmarks import BenchArgs, discover

    rows = discover()["bind_sweep"](BenchArgs(device=torch.device("cuda"), quick=True, repeat=1))
    assert rows[0].impl == "peer:copy"
    fused = [row for row in rows if row.impl == "optimized:cuda-fused"]
    assert len(fused) == 12 and all(row.ms > 0 and "torch.fft's time" in row.note for row in fused), fused
    assert all(float(row.note.split("max |Δ| / max |c| ")[1].split()[0]) <= 1e-5 for row in fused)
    assert sum("(the default)" in row.note for row in fused) == 4


def test_bind_sweep_has_no_rows_on_the_cpu() -> None:
    from training.benchmarks import BenchArgs, discover

    assert discover()["bind_sweep"](BenchArgs(device=torch.device("cpu"), quick=True, repeat=1)) == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the fused bind kernel's compiler)")
def test_fused_bind_kernel_compiles_for_sm90_without_local_memory(tmp_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA source builds for sm_90 on any machine with nvcc (no GPU needed) through the library's own build
    (cached, loaded with ctypes), and every kernel keeps its registers in registers (0-byte stack frame: the small
    DFTs' indices are compile-time constants)."""
    from optimized.kernels import hrr_bind
    from optimized.kernels.hrr_bind import SOURCE

    monkeypatch.setenv("MEMARCH_CACHE_DIR", str(tmp_path / "cache"))
    hrr_bind._library.cache_clear()
    try:
        library, reason = hrr_bind._library((9, 0))
        assert reason == "" and library is not None and library.memarch_hrr_bind.restype is not None
        assert [path.name.startswith("hrr_bind-sm_90-") for path in (tmp_path / "cache").iterdir()] == [True]
    finally:
        hrr_bind._library.cache_clear()
    result = subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(SOURCE),
                             "-o", str(tmp_path / "hrr_bind.cubin")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    frames = re.findall(r"(\d+) bytes stack frame", result.stderr)
    assert len(frames) == 10 and all(frame == "0" for frame in frames), result.stderr  # 5 D x bind/unbind


def test_fused_bind_says_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimized.kernels import hrr_bind

    x = torch.ones(2, 1024)
    assert not hrr_bind.fused_bind_supported(x, x) and opt.bind_dispatch(x, x) == "torch.fft"
    monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", "bind")
    assert hrr_bind.unavailable_reason() == "switched off by MEMARCH_DISABLE_KERNELS"
    monkeypatch.delenv("MEMARCH_DISABLE_KERNELS")
    monkeypatch.setattr(hrr_bind, "_nvcc", lambda: None)
    hrr_bind._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CUDA bind kernel is unavailable .*nvcc not found"):
            assert "nvcc not found" in hrr_bind._library((9, 0))[1]
    finally:
        hrr_bind._library.cache_clear()
    if not torch.cuda.is_available():
        assert hrr_bind.unavailable_reason() == "no CUDA device"


def test_bind_benchmark_reports_reference_and_optimized_rows() -> None:
    from training.benchmarks import BenchArgs, discover

    registry = discover()
    for op in ("bind", "unbind"):
        rows = registry[op](BenchArgs(device=torch.device("cpu"), quick=True, repeat=1))
        impls = [row.impl for row in rows]
        assert impls[:2] == ["reference", "optimized"]
        assert rows[1].dispatch == "torch.fft" and "faster than reference" in rows[1].note
        assert "scaled" in rows[0].note and rows[0].ms > 0


def test_bench_cli_records_the_memarch_switches_in_effect(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A/B runs differ only in a MEMARCH_* variable (e.g. the memory schedule); the printout and the JSON say which."""
    import json

    from tests.scripts import load_script

    bench = load_script("bench")
    monkeypatch.setenv("MEMARCH_DECAYED_CUMSUM", "batched")
    assert bench.main(["--op", "bind", "--quick", "--repeat", "1", "--device", "cpu",
                       "--json", str(tmp_path / "out.json")]) == 0
    assert "# settings: MEMARCH_DECAYED_CUMSUM=batched" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["settings"] == {"MEMARCH_DECAYED_CUMSUM": "batched"}
