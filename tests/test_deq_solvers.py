"""Fixed-point solvers ([DEQ-1] … [DEQ-6], [DEQ-16], [DEQ-17]): convergence on contractive maps to one z*,
the Banach iteration bound, honest non-convergence, optimized ≡ reference, policies, NaN stops, bad input."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.deq as opt
import optimized.deq_solvers as fast_solvers
import reference.deq as ref
from optimized.kernels import triton_available, triton_interpreting
from reference.validation import ConfigError, ConvergenceError, DTypeError, NonFiniteError, ShapeError
from tests.equivalence import assert_close_scaled
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance
from tests.triton_compile import assert_compiles

IMPLS = st.sampled_from([ref, opt])
SOLVERS = st.sampled_from(list(ref.SOLVERS))
KINDS = st.sampled_from(["tanh", "affine", "block"])
Map = Callable[[torch.Tensor], torch.Tensor]


def contractive_map(kind: str, B: int, n: int, L: float, seed: int,
                    dtype: torch.dtype = torch.float64) -> Map:
    """A map with Lipschitz constant exactly L (tanh, affine) or ≤ L (the library's FixedPointBlock)."""
    if kind == "block":
        block = ref.FixedPointBlock(n, lipschitz=L, sigma_method="exact", seed=seed).to(dtype)
        with torch.no_grad():
            block.w_z.weight.mul_(3.0)  # push σ(W) above L so the normalisation is active
        x = make_tensor((B, n), seed + 1, dtype=dtype)
        return block.map(x)
    W = make_tensor((n, n), seed, dtype=dtype)
    W = W * (L / torch.linalg.matrix_norm(W, ord=2))
    u = make_tensor((B, n), seed + 1, dtype=dtype) + 0.5  # offset keeps z* away from 0
    if kind == "tanh":
        return lambda z: torch.tanh(z @ W.T + u)
    return lambda z: z @ W.T + u


def true_residual(f: Map, z: torch.Tensor) -> torch.Tensor:
    fz = f(z)
    return (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + ref.RESIDUAL_EPS)


sizes = st.tuples(st.integers(1, 3), st.integers(1, 6))


@given(sizes, st.floats(0.05, 0.9), KINDS, IMPLS, st.sampled_from([0.1, 1.0, 10.0]), seeds)
def test_every_solver_converges_to_the_same_fixed_point_for_contractive_maps(
        size: tuple[int, int], L: float, kind: str, impl: ModuleType, z0_scale: float, seed: int) -> None:
    B, n = size
    f = contractive_map(kind, B, n, L, seed)
    z0 = make_tensor((B, n), seed + 2, scale=z0_scale)
    tol = 1e-9
    results = []
    for method in ref.SOLVERS:
        with torch.no_grad():
            z, info = impl.solve(f, z0, method=method, tol=tol, max_iter=1000)
        assert bool(info.converged.all()), f"{method}: residuals {info.residual.tolist()}"
        assert bool((info.residual <= tol).all())
        assert bool((true_residual(f, z) <= tol * (1 + 1e-6)).all()), method
        results.append(z)
    fnorm = f(results[0]).flatten(1).norm(dim=1)
    bound = 2 * tol * (fnorm + 1) / (1 - L) + 1e-13  # [DEQ-2]: both solves within r‖f(z)‖/(1−L) of z*
    for z in results[1:]:
        assert bool(((z - results[0]).flatten(1).norm(dim=1) <= bound).all())


@given(sizes, st.floats(0.05, 0.95), st.sampled_from(["tanh", "affine"]), IMPLS, st.sampled_from([1e-3, 1e-8]),
       seeds)
def test_plain_iteration_count_is_within_the_banach_bound(size: tuple[int, int], L: float, kind: str,
                                                          impl: ModuleType, tol: float, seed: int) -> None:
    B, n = size
    f = contractive_map(kind, B, n, L, seed)
    z0 = make_tensor((B, n), seed + 2, scale=3.0)
    with torch.no_grad():
        _, info = impl.fixed_point_iteration(f, z0, tol=tol, max_iter=2000)
        z, norms = z0, []
        for _ in range(int(info.iterations.max()) + 1):  # the same trajectory, to get min_k ‖f(z_k)‖
            norms.append(f(z).flatten(1).norm(dim=1))
            z = f(z)
        m_f = torch.stack(norms).min(0).values
        step0 = (f(z0) - z0).flatten(1).norm(dim=1)
    assert bool(info.converged.all())
    for b in range(B):
        ratio = tol * (1 - L) * float(m_f[b]) / max(float(step0[b]), 1e-300)
        banach = 0 if ratio >= 1 else math.ceil(math.log(ratio) / math.log(L))
        assert int(info.iterations[b]) <= banach + 1, (int(info.iterations[b]), banach)


@given(sizes, st.floats(1.5, 6.0), SOLVERS, IMPLS, seeds)
def test_non_contractive_map_never_reports_converged_with_a_large_residual(
        size: tuple[int, int], gain: float, method: str, impl: ModuleType, seed: int) -> None:
    B, n = size
    W = make_tensor((n, n), seed)
    W = W * (gain / torch.linalg.matrix_norm(W, ord=2))
    u = make_tensor((B, n), seed + 1)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + u)
    z0 = make_tensor((B, n), seed + 2)
    tol = 1e-8
    with torch.no_grad():
        try:
            z, info = impl.solve(f, z0, method=method, tol=tol, max_iter=40)
        except NonFiniteError:
            return  # a diverging Broyden/Anderson step is stopped with an error, which is not silent
        r = true_residual(f, z)
    assert bool((r[info.converged] <= tol * (1 + 1e-6)).all())
    assert torch.allclose(info.residual, r, rtol=1e-9, atol=0)
    assert bool((info.converged == (info.residual <= tol)).all())
    best = info.trace.min(0).values
    assert torch.equal(info.residual[~info.converged], best[~info.converged])


@pytest.mark.parametrize("impl", [ref, opt])
def test_plain_iteration_reports_non_convergence_on_an_oscillating_map(impl: ModuleType) -> None:
    b = make_tensor((3, 4), 0)
    z0 = make_tensor((3, 4), 1)
    z, info = impl.fixed_point_iteration(lambda z: -z + b, z0, tol=1e-6, max_iter=25)
    assert not bool(info.converged.any())
    assert bool((info.iterations == 25).all())
    assert bool((info.residual > 1e-3).all())
    assert info.trace.shape == (26, 3)
    # the best iterate is returned: residual = the trace's minimum (even and odd iterates differ here)
    assert torch.equal(info.residual, info.trace.min(0).values)
    assert bool((info.trace[0] != info.trace[1]).all())
    torch.testing.assert_close(true_residual(lambda z: -z + b, z), info.residual, rtol=1e-12, atol=0)


@given(sizes, st.floats(0.1, 0.85), KINDS, SOLVERS, st.sampled_from([0, 1, 3]), seeds)
def test_optimized_solvers_match_reference(size: tuple[int, int], L: float, kind: str, method: str,
                                           check_every: int, seed: int) -> None:
    B, n = size
    f = contractive_map(kind, B, n, L, seed)
    z0 = make_tensor((B, n), seed + 2)
    with torch.no_grad():
        z_r, i_r = ref.solve(f, z0, method=method, tol=1e-12, max_iter=400)
        z_o, i_o = opt.solve(f, z0, method=method, tol=1e-12, max_iter=400, check_every=check_every)
    assert_close_scaled(z_o, z_r, tolerance(torch.float64), f"z* ({method})")
    assert bool(((i_o.iterations - i_r.iterations).abs() <= 1).all()), (i_o.iterations, i_r.iterations)
    assert torch.equal(i_o.converged, i_r.converged)
    if torch.equal(i_o.iterations, i_r.iterations):
        assert i_o.trace.shape == i_r.trace.shape
        torch.testing.assert_close(i_o.trace, i_r.trace, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("method", ref.SOLVERS)
def test_float32_optimized_solve_matches_float64_reference(method: str) -> None:
    f64 = contractive_map("tanh", 4, 8, 0.5, 3)
    f32 = contractive_map("tanh", 4, 8, 0.5, 3, dtype=torch.float32)
    z0 = make_tensor((4, 8), 7)
    z_r, _ = ref.solve(f64, z0, method=method, tol=1e-12, max_iter=200)
    z_o, info = opt.solve(f32, z0.float(), method=method, tol=1e-6, max_iter=200)
    assert z_o.dtype == torch.float32 and bool(info.converged.all())
    assert_close_scaled(z_o, z_r, tolerance(torch.float32), f"z* float32 ({method})")


@pytest.mark.parametrize("impl", [ref, opt])
def test_solutions_do_not_depend_on_the_other_samples_in_the_batch(impl: ModuleType) -> None:
    W = make_tensor((5, 5), 0)
    W = W * (0.8 / torch.linalg.matrix_norm(W, ord=2))
    u = make_tensor((4, 5), 1) * torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)[:, None]
    z0 = make_tensor((4, 5), 2)
    for method in ref.SOLVERS:
        z, info = impl.solve(lambda z: torch.tanh(z @ W.T + u), z0, method=method, tol=1e-10, max_iter=300)
        for b in range(4):
            ub = u[b:b + 1]
            zb, ib = impl.solve(lambda z, ub=ub: torch.tanh(z @ W.T + ub), z0[b:b + 1], method=method, tol=1e-10,
                                max_iter=300)
            assert int(ib.iterations[0]) == int(info.iterations[b]), method
            torch.testing.assert_close(zb[0], z[b], rtol=1e-12, atol=1e-12)


def test_anderson_needs_at_most_half_the_iterations_of_plain_iteration_at_lipschitz_0_9() -> None:
    n = 32
    Q, _ = torch.linalg.qr(make_tensor((n, n), 0))
    W = Q @ torch.diag(torch.linspace(-0.9, 0.9, n, dtype=torch.float64)) @ Q.T
    u = 0.1 * make_tensor((8, n), 1)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + u)
    z0 = torch.zeros(8, n, dtype=torch.float64)
    _, plain = opt.fixed_point_iteration(f, z0, tol=1e-6, max_iter=500)
    _, anderson = opt.anderson(f, z0, tol=1e-6, max_iter=500)
    assert bool(plain.converged.all()) and bool(anderson.converged.all())
    assert float(anderson.iterations.double().mean()) <= 0.5 * float(plain.iterations.double().mean())


@pytest.mark.parametrize("impl", [ref, opt])
@pytest.mark.parametrize("method", ref.SOLVERS)
def test_warm_start_at_the_fixed_point_takes_zero_iterations(impl: ModuleType, method: str) -> None:
    f = contractive_map("tanh", 2, 4, 0.5, 0)
    z_star, _ = impl.solve(f, torch.zeros(2, 4, dtype=torch.float64), method=method, tol=1e-12, max_iter=200)
    _, info = impl.solve(f, z_star, method=method, tol=1e-10, max_iter=200)
    assert info.iterations.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------- policies

@pytest.mark.parametrize("impl", [ref, opt])
@pytest.mark.parametrize("method", ref.SOLVERS)
def test_non_convergence_policy_flags_warns_or_raises(impl: ModuleType, method: str) -> None:
    f = contractive_map("tanh", 3, 4, 0.95, 0)
    z0 = make_tensor((3, 4), 1, scale=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = impl.solve(f, z0, method=method, tol=1e-14, max_iter=2, policy="flag")
    assert not bool(info.converged.all())
    name = "fixed_point_iteration" if method == "fixed_point" else method
    with pytest.warns(ref.ConvergenceWarning, match=rf"{name}: \d/3 sample\(s\) did not converge to tol=1e-14"):
        impl.solve(f, z0, method=method, tol=1e-14, max_iter=2, policy="warn")
    with pytest.raises(ConvergenceError, match=r"within max_iter=2 iterations \(worst relative residual"):
        impl.solve(f, z0, method=method, tol=1e-14, max_iter=2, policy="raise")


class NaNAfter:
    """A contractive map that returns NaN for sample 1 from its `bad_call`-th call on."""

    def __init__(self, bad_call: int) -> None:
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = 0.5 * torch.tanh(z) + 1.0
        if self.calls >= self.bad_call:
            out = out.clone()
            out[1, 0] = float("nan")
        self.calls += 1
        return out


@pytest.mark.parametrize("impl", [ref, opt])
@pytest.mark.parametrize("method", ref.SOLVERS)
@pytest.mark.parametrize("check_every", [0, 1, 4])
def test_nan_in_an_iterate_stops_the_solve_naming_the_step(impl: ModuleType, method: str, check_every: int) -> None:
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=rf"{method}\w*: iteration 3: .* in 1 sample\(s\) \(first: sample 1\)"):
        impl.solve(NaNAfter(3), z0, method=method, tol=1e-12, max_iter=50, check_every=check_every)
    bad_z0 = z0.clone()
    bad_z0[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"iteration 0: .*first: sample 2"):
        impl.solve(NaNAfter(100), bad_z0, method=method, tol=1e-12, max_iter=50, check_every=check_every)


# ---------------------------------------------------------------------------------------------- stop_fn

@pytest.mark.parametrize("impl", [ref, opt])
def test_energy_stop_rule_is_anded_with_the_residual_test(impl: ModuleType) -> None:
    f = contractive_map("tanh", 2, 6, 0.7, 4)
    z0 = make_tensor((2, 6), 5)

    def energy(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z.pow(2).sum(1)
    _, loose = impl.fixed_point_iteration(f, z0, tol=1e-2, max_iter=500)
    z, strict = impl.fixed_point_iteration(f, z0, tol=1e-2, max_iter=500, stop_fn=ref.energy_stop(energy, 1e-10))
    assert bool(strict.converged.all())
    assert bool((strict.iterations > loose.iterations).all())
    assert bool(((energy(f(z)) - energy(z)).abs() <= 1e-10).all())
    _, only_energy = impl.fixed_point_iteration(f, z0, tol=math.inf, max_iter=500,
                                                stop_fn=ref.energy_stop(energy, 1e-10))
    assert torch.equal(only_energy.iterations, strict.iterations)


@pytest.mark.parametrize("impl", [ref, opt])
def test_bad_solver_arguments_are_rejected_with_named_errors(impl: ModuleType) -> None:
    f = contractive_map("tanh", 2, 3, 0.5, 0)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(DTypeError, match="z0 must be a floating-point tensor"):
        impl.solve(f, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"z0 must be a batch \(B, \*S\) with B >= 1"):
        impl.solve(f, torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="tol must be a number > 0"):
        impl.solve(f, z0, tol=0.0)
    with pytest.raises(ConfigError, match="max_iter must be an int >= 0, got -1"):
        impl.solve(f, z0, max_iter=-1)
    with pytest.raises(ConfigError, match="policy must be one of"):
        impl.solve(f, z0, policy="ignore")
    with pytest.raises(ConfigError, match="method must be one of"):
        impl.solve(f, z0, method="newton")
    with pytest.raises(ConfigError, match=r"beta \(Anderson damping\) must lie in \(0, 1\], got 0.0"):
        impl.anderson(f, z0, beta=0.0)
    with pytest.raises(ConfigError, match=r"m \(Anderson memory\) must be an int >= 1"):
        impl.anderson(f, z0, m=0)
    with pytest.raises(ShapeError, match=r"f must map z of shape \(2, 3\) to the same shape, got \(2, 2\)"):
        impl.solve(lambda z: z[:, :2], z0)
    with pytest.raises(ShapeError, match=r"stop_fn must return a \(B,\) = \(2,\) bool tensor"):
        impl.solve(f, z0, stop_fn=lambda z, fz: torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------- Triton bookkeeping kernels

needs_interpreter = pytest.mark.skipif(not (triton_available() and triton_interpreting()),
                                       reason="Triton kernel test on CPU needs triton and TRITON_INTERPRET=1 "
                                              "(tox sets it)")


Solved = tuple[torch.Tensor, ref.SolverInfo]


def _both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Solved]) -> list[Solved]:
    """`run` once on the torch path and once with the kernels forced on (CPU tensors in the interpreter)."""
    out: list[Solved] = []
    for kernels in (False, True):
        monkeypatch.setattr(fast_solvers, "use_kernels", lambda z0, kernels=kernels: kernels)
        with torch.no_grad():
            out.append(run())
    return out


@needs_interpreter
@pytest.mark.parametrize("method", ref.SOLVERS)
@pytest.mark.parametrize(("shape", "dtype"), [((3, 7), torch.float64), ((2, 3, 5), torch.float32)])
def test_kernel_bookkeeping_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch, method: str,
                                                  dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    # L = 0.9, max_iter 25: some plain-iteration samples do not converge (best iterate, flags); the stop rule
    # masks one sample
    B, n = shape[0], math.prod(shape[1:])
    f2 = contractive_map("tanh", B, n, 0.9, 11, dtype=dtype)

    def f(z: torch.Tensor) -> torch.Tensor:
        return f2(z.reshape(B, n)).reshape(shape)

    def stop(z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        return torch.arange(B) != 1

    z0 = make_tensor(shape, 12, dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for stop_fn in (None, stop):
        def run(stop_fn: ref.StopFn | None = stop_fn) -> Solved:
            return fast_solvers.solve(f, z0, method=method, tol=tol, max_iter=25, stop_fn=stop_fn, check_every=3)
        (za, ia), (zb, ib) = _both_paths(monkeypatch, run)
        rtol = tolerance(dtype)
        assert (ia.iterations - ib.iterations).abs().max() <= 1
        assert torch.equal(ia.converged, ib.converged)
        assert_close_scaled(zb, za, rtol, "z*")
        assert_close_scaled(ib.residual, ia.residual, rtol, "residual")
        rows = min(ia.trace.shape[0], ib.trace.shape[0])
        assert_close_scaled(ib.trace[:rows], ia.trace[:rows], rtol, "trace")
        if stop_fn is not None:
            assert not bool(ib.converged[1])


@needs_interpreter
@pytest.mark.parametrize("method", ref.SOLVERS)
def test_kernel_path_leaves_the_loop_when_the_torch_path_does(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # the kernel counts the samples still iterating and the ones ever non-finite; the host's check every
    # `check_every` iterations reads those counts: both paths must call f equally often
    f2 = contractive_map("tanh", 3, 6, 0.5, 21)
    calls: list[int] = []

    def counted(z: torch.Tensor) -> torch.Tensor:
        calls[-1] += 1
        return f2(z)

    def run() -> Solved:
        calls.append(0)
        return fast_solvers.solve(counted, make_tensor((3, 6), 22), method=method, tol=1e-6, max_iter=200,
                                  check_every=2)
    (_, ia), (_, ib) = _both_paths(monkeypatch, run)
    assert bool(ia.converged.all()) and bool(ib.converged.all()) and calls[0] == calls[1] < 60


@needs_interpreter
def test_broyden_kernel_grows_its_low_rank_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    # U/V start with 2 rows and double (2 → 4 → 8 → …) while the solve runs; the result equals the torch path
    monkeypatch.setattr(fast_solvers, "BROYDEN_START_ROWS", 2)
    f = contractive_map("tanh", 2, 5, 0.9, 5)
    z0 = make_tensor((2, 5), 6)
    (za, ia), (zb, ib) = _both_paths(monkeypatch, lambda: fast_solvers.broyden(f, z0, tol=1e-12, max_iter=40))
    assert int(ib.iterations.max()) > 9 and bool(ib.converged.all())
    assert (ia.iterations - ib.iterations).abs().max() <= 1
    assert_close_scaled(zb, za, tolerance(torch.float64), "z*")


@needs_interpreter
@pytest.mark.parametrize("method", ref.SOLVERS)
def test_kernel_path_stops_on_nan_naming_the_step(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setattr(fast_solvers, "use_kernels", lambda z0: True)
    with torch.no_grad(), pytest.raises(NonFiniteError, match=r"iteration 3: .* in 1 sample\(s\) \(first: sample 1\)"):
        fast_solvers.solve(NaNAfter(3), torch.zeros(3, 4), method=method, tol=1e-12, max_iter=50, check_every=2)


def test_kernels_are_used_only_without_autograd_on_cuda() -> None:
    z = torch.zeros(2, 3)
    assert not fast_solvers.use_kernels(z)  # CPU tensors: torch path (the interpreter is for tests)
    if torch.cuda.is_available() and triton_available():
        with torch.no_grad():
            assert fast_solvers.use_kernels(z.cuda())
        assert not fast_solvers.use_kernels(z.cuda())  # the unrolled backward solves under autograd


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_deq_kernels_compile_for_h100_without_a_gpu() -> None:
    script = ("from optimized.kernels.deq import compile_for_gpu\n"
              "for dtype, n in (('fp32', 512), ('bf16', 2048)):\n"
              "    assert all('cubin' in k.asm for k in compile_for_gpu(90, dtype, n=n))\n")
    assert_compiles(script)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ref.SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_on_cuda_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch, method: str,
                                                   dtype: torch.dtype) -> None:
    f64 = contractive_map("tanh", 64, 512, 0.9, 3, dtype=torch.float32)
    z0 = make_tensor((64, 512), 4).to("cuda", dtype)

    def f(z: torch.Tensor) -> torch.Tensor:
        return f64(z.float().cpu()).to("cuda", dtype)

    # bf16 iterates cannot reach a 1e-4 residual, and Broyden's secant pairs of bf16-rounded iterates are
    # dominated by rounding, so the two paths' trajectories part after a few steps: in bf16 both must converge to
    # a looser tol with a true residual (of the returned z, in fp32) within rounding of it; in fp32 the iteration
    # counts agree within 1 and z* to fp32 tolerance
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        assert fast_solvers.use_kernels(z0)
        zb, ib = fast_solvers.solve(f, z0, method=method, tol=tol, max_iter=40)
    monkeypatch.setattr(fast_solvers, "use_kernels", lambda z0: False)
    with torch.no_grad():
        za, ia = fast_solvers.solve(f, z0, method=method, tol=tol, max_iter=40)
    if dtype == torch.float32:
        assert (ia.iterations - ib.iterations).abs().max() <= 1
        assert_close_scaled(zb.cpu(), za.cpu(), tolerance(dtype), "z*")
    else:
        for z, info in ((za, ia), (zb, ib)):
            assert bool(info.converged.all())
            assert float(true_residual(f64, z.float().cpu()).max()) <= tol + 1e-2
