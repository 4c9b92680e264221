"""Equilibrium layer and FixedPointBlock ([DEQ-7] … [DEQ-15]): implicit gradient = finite differences = unrolled
autograd, phantom/one-step gradients, optimized ≡ reference (outputs and gradients), spectral normalisation,
Jacobian estimates, the stability regulariser, memory injection, warm start, causality, torch.compile, bad input."""

from __future__ import annotations

import warnings
from types import ModuleType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.deq as opt
import reference.deq as ref
from reference.validation import ConfigError, ConvergenceError, NonFiniteError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_equivalent, assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds

IMPLS = st.sampled_from([ref, opt])
SOLVERS = st.sampled_from(list(ref.SOLVERS))


def layer(impl: ModuleType, config: ref.DEQConfig):  # type: ignore[no-untyped-def]
    """(x (B, n), W (n, n), b (n,)) ↦ z* of z = tanh(W z + x + b) through `impl.equilibrium`."""
    def run(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z, _ = impl.equilibrium(lambda z: torch.tanh(z @ W.T + x + b), torch.zeros_like(x), config)
        return z
    return run


def inputs(B: int, n: int, L: float, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    W = make_tensor((n, n), seed)
    W = (W * (L / torch.linalg.matrix_norm(W, ord=2))).to(dtype)
    return (make_tensor((B, n), seed + 1, dtype=dtype), W, make_tensor((n,), seed + 2, dtype=dtype) * 0.3)


def grads(fn, args: tuple[torch.Tensor, ...], seed: int = 0) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out = fn(*leaves)
    cot = make_tensor(out.shape, seed + 9, dtype=out.dtype)
    g = torch.autograd.grad((out * cot).sum(), leaves)
    return list(g)


TIGHT = {"tol": 1e-13, "max_iter": 600, "backward_tol": 1e-13, "backward_max_iter": 600}


@pytest.mark.parametrize("impl", [ref, opt])
@pytest.mark.parametrize("solver", ref.SOLVERS)
def test_implicit_gradient_equals_finite_differences(impl: ModuleType, solver: str) -> None:
    config = ref.DEQConfig(solver=solver, **TIGHT)  # type: ignore[arg-type]
    x, W, b = (t.requires_grad_(True) for t in inputs(2, 3, 0.7, 11))
    assert torch.autograd.gradcheck(layer(impl, config), (x, W, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@given(st.integers(1, 3), st.integers(1, 5), st.floats(0.1, 0.8), SOLVERS, IMPLS, seeds)
def test_implicit_gradient_equals_autograd_through_an_unrolled_solve(B: int, n: int, L: float, solver: str,
                                                                     impl: ModuleType, seed: int) -> None:
    args = inputs(B, n, L, seed)
    implicit = grads(layer(impl, ref.DEQConfig(solver=solver, **TIGHT)), args)  # type: ignore[arg-type]
    unrolled_config = ref.DEQConfig(solver="fixed_point", backward="unrolled", tol=1e-14, max_iter=2000)
    unrolled = grads(layer(impl, unrolled_config), args)
    for gi, gu in zip(implicit, unrolled, strict=True):
        torch.testing.assert_close(gi, gu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("impl", [ref, opt])
def test_phantom_gradient_approaches_the_implicit_gradient_as_steps_grow(impl: ModuleType) -> None:
    args = inputs(3, 6, 0.6, 5)
    exact = grads(layer(impl, ref.DEQConfig(**TIGHT)), args)  # type: ignore[arg-type]
    errors = []
    for k in (1, 4, 16, 48):
        cfg = ref.DEQConfig(backward="phantom", phantom_steps=k, phantom_damping=1.0, tol=1e-13, max_iter=600)
        g = grads(layer(impl, cfg), args)
        errors.append(max(float((a - e).abs().max()) for a, e in zip(g, exact, strict=True)))
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-3
    assert errors[-1] < 1e-8  # Neumann tail O(L^k)
    damped = ref.DEQConfig(backward="phantom", phantom_steps=80, phantom_damping=0.5, tol=1e-13, max_iter=600)
    for a, e in zip(grads(layer(impl, damped), args), exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", [ref, opt])
def test_one_step_gradient_is_the_jacobian_free_gradient_at_the_fixed_point(impl: ModuleType) -> None:
    x, W, b = inputs(2, 4, 0.5, 1)
    config = ref.DEQConfig(backward="one_step", tol=1e-13, max_iter=600)
    got = grads(layer(impl, config), (x, W, b))
    z_star, _ = impl.solve(lambda z: torch.tanh(z @ W.T + x + b), torch.zeros_like(x), tol=1e-13, max_iter=600)
    expected = grads(lambda x, W, b: torch.tanh(z_star @ W.T + x + b), (x, W, b))
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 5), st.floats(0.1, 0.8), SOLVERS,
       st.sampled_from(["implicit", "phantom", "one_step", "unrolled"]), seeds)
def test_optimized_equilibrium_matches_reference_outputs_and_gradients(B: int, n: int, L: float, solver: str,
                                                                       backward: str, seed: int) -> None:
    config = ref.DEQConfig(solver=solver, backward=backward, **TIGHT)  # type: ignore[arg-type]
    assert_equivalent(layer(ref, config), layer(opt, config), inputs(B, n, L, seed))


@pytest.mark.parametrize("solver", ref.SOLVERS)
def test_float32_optimized_equilibrium_matches_float64_reference(solver: str) -> None:
    ref_config = ref.DEQConfig(solver=solver, **TIGHT)  # type: ignore[arg-type]
    opt_config = ref.DEQConfig(solver=solver, tol=1e-6, max_iter=200, backward_tol=1e-6, backward_max_iter=200)
    assert_equivalent(layer(ref, ref_config), layer(opt, opt_config), inputs(3, 6, 0.5, 2), dtype=torch.float32)


@pytest.mark.parametrize("impl", [ref, opt])
def test_adjoint_non_convergence_warns_or_raises(impl: ModuleType) -> None:
    args = inputs(2, 4, 0.9, 3)
    loose = ref.DEQConfig(tol=1e-10, max_iter=300, backward_tol=1e-14, backward_max_iter=1)
    with pytest.warns(ref.ConvergenceWarning, match="adjoint fixed point.*did not converge"):
        grads(layer(impl, loose), args)
    strict = ref.DEQConfig(tol=1e-10, max_iter=300, backward_tol=1e-14, backward_max_iter=1, policy="raise")
    with pytest.raises(ConvergenceError, match="adjoint fixed point"):
        grads(layer(impl, strict), args)


# ---------------------------------------------------------------------------------------------- contraction

@given(st.integers(1, 8), st.integers(1, 8), st.floats(0.05, 2.0), st.floats(0.1, 10.0), seeds)
def test_exact_spectral_normalisation_bounds_the_lipschitz_constant(n_in: int, n_out: int, c: float, gain: float,
                                                                    seed: int) -> None:
    lin = ref.SpectralNormLinear(n_in, n_out, lipschitz=c, sigma_method="exact", seed=seed).double()
    with torch.no_grad():
        lin.weight.mul_(gain)
    sigma = float(torch.linalg.matrix_norm(lin.normalized_weight().detach(), ord=2))
    raw = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    assert sigma <= c * (1 + 1e-12)
    assert abs(sigma - min(c, raw)) <= 1e-10 * max(1.0, raw)  # untouched inside the bound


def test_power_iteration_spectral_norm_converges_to_the_target_during_training() -> None:
    lin = ref.SpectralNormLinear(16, 16, lipschitz=0.7, n_power_iterations=1, seed=3).double()
    with torch.no_grad():
        lin.weight.mul_(5.0)
    lin.train()
    for _ in range(60):
        lin(torch.zeros(1, 16, dtype=torch.float64))
    assert float(torch.linalg.matrix_norm(lin.normalized_weight().detach(), ord=2)) == pytest.approx(0.7, rel=1e-6)
    lin.eval()
    u = lin.u.clone()
    lin(torch.zeros(1, 16, dtype=torch.float64))
    assert torch.equal(u, lin.u)  # eval mode does not advance the power iteration


def _known_spectrum_map(n: int, sigma_1: float, seed: int) -> tuple[ref.Map, torch.Tensor]:
    U, _ = torch.linalg.qr(make_tensor((n, n), seed))
    V, _ = torch.linalg.qr(make_tensor((n, n), seed + 1))
    s = torch.linspace(0.5 * sigma_1, 0.0, n, dtype=torch.float64)
    s[0] = sigma_1
    W = U @ torch.diag(s) @ V.T
    return (lambda z: z @ W.T), W


@given(st.integers(2, 8), st.floats(0.1, 3.0), seeds)
def test_jacobian_spectral_norm_estimate_matches_the_largest_singular_value(n: int, sigma_1: float,
                                                                            seed: int) -> None:
    f, _ = _known_spectrum_map(n, sigma_1, seed)
    z = make_tensor((3, n), seed + 2)
    est = ref.jacobian_spectral_norm(f, z, n_iter=30)
    torch.testing.assert_close(est, torch.full((3,), sigma_1, dtype=torch.float64), rtol=1e-8, atol=0)


def test_jacobian_spectral_norm_is_per_sample_and_never_exceeds_the_true_norm() -> None:
    scale = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    W = make_tensor((5, 5), 0)
    z = make_tensor((2, 5), 1)
    est = ref.jacobian_spectral_norm(lambda z: torch.tanh(z @ W.T) * scale, z, n_iter=2)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v, b=b: torch.tanh(v @ W.T) * scale[b], z[b])
        assert float(est[b]) <= float(torch.linalg.matrix_norm(J, ord=2)) * (1 + 1e-12)
        assert float(est[b]) >= 0.5 * float(torch.linalg.matrix_norm(J, ord=2))


def test_hutchinson_frobenius_estimate_is_unbiased() -> None:
    f, W = _known_spectrum_map(6, 1.5, 0)
    z = make_tensor((1, 6), 1)
    est = ref.jacobian_frobenius_sq(f, z, n_samples=4000, seed=3)
    assert float(est[0]) == pytest.approx(float(W.pow(2).sum()) / 6, rel=0.05)


def test_stability_loss_is_zero_inside_the_target_and_its_gradient_shrinks_the_norm() -> None:
    W = torch.nn.Parameter(make_tensor((6, 6), 0))
    z = make_tensor((4, 6), 1)
    assert float(ref.stability_loss(lambda z: z @ (0.1 * W.detach()).T, z, 0.8)) == 0.0
    sigma0 = float(torch.linalg.matrix_norm(W.detach(), ord=2))
    loss = ref.stability_loss(lambda z: z @ W.T, z, contraction_target=0.8, n_iter=30)
    assert float(loss.detach()) == pytest.approx((sigma0 - 0.8) ** 2, rel=1e-6)
    loss.backward()
    assert W.grad is not None
    with torch.no_grad():
        W.sub_(0.01 * W.grad)
    assert float(torch.linalg.matrix_norm(W.detach(), ord=2)) < sigma0
    with pytest.raises(ConfigError, match="contraction_target must be > 0"):
        ref.stability_loss(lambda z: z, z, 0.0)


# ---------------------------------------------------------------------------------------------- block

def _blocks(d: int = 6, d_mem: int | None = 4, **kw: object) -> tuple[ref.FixedPointBlock, opt.FixedPointBlock]:
    config = ref.DEQConfig(max_iter=300, tol=1e-12, backward_tol=1e-12, backward_max_iter=300)
    r = ref.FixedPointBlock(d, d_mem, config=config, seed=1, **kw)  # type: ignore[arg-type]
    o = opt.FixedPointBlock(d, d_mem, config=config, seed=2, **kw)  # type: ignore[arg-type]
    return r, o


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ref.SOLVERS)
def test_optimized_fixed_point_block_matches_reference(dtype: torch.dtype, solver: str) -> None:
    r, o = _blocks()
    for block in (r, o):
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        block.config = ref.DEQConfig(solver=solver, tol=tol, max_iter=300, backward_tol=tol, backward_max_iter=300)
    x, mem = make_tensor((2, 3, 6), 0), make_tensor((2, 3, 4), 1)
    assert_same_parameters(r, o)
    r.train(), o.train()
    assert_modules_equivalent(r, o, (x, mem), dtype=dtype, kwargs={"mem_scale": 0.7})


def test_memory_injection_is_scaled_by_mem_scale() -> None:
    r, _ = _blocks()
    r.eval()
    x, mem = make_tensor((2, 6), 0), make_tensor((2, 4), 1)
    with torch.no_grad():
        z_none = r(x.float())
        z_zero = r(x.float(), mem.float(), mem_scale=0.0)
        r.mem_scale = 0.5
        z_attr = r(x.float(), mem.float())
        z_arg = r(x.float(), mem.float(), mem_scale=0.5)
    assert torch.equal(z_none, z_zero)
    assert torch.equal(z_attr, z_arg) and not torch.allclose(z_attr, z_none)


@pytest.mark.parametrize("block_cls", [ref.FixedPointBlock, opt.FixedPointBlock])
def test_block_warm_start_and_diagnostics(block_cls: type[ref.FixedPointBlock]) -> None:
    assert block_cls(8).config.max_iter == 8  # EMMA's deq_max_iter default
    block = block_cls(8, config=ref.DEQConfig(max_iter=30, tol=1e-4)).eval()
    x = make_tensor((4, 5, 8), 0).float()
    with torch.no_grad():
        z = block(x)
        cold = block.last_diagnostics
        block(x, z_init=z)
        warm = block.last_diagnostics
    assert set(cold) == {"converged", "iterations", "residual", "max_residual"}
    assert block.last_info is not None and block.last_info.converged.shape == (20,)
    assert float(warm["iterations"]) < float(cold["iterations"])
    assert float(cold["converged"]) == 1.0 and float(warm["converged"]) == 1.0


@pytest.mark.parametrize("impl", [ref, opt])
def test_fixed_point_block_is_causal(impl: ModuleType) -> None:
    block = impl.FixedPointBlock(4, config=ref.DEQConfig(tol=1e-10, max_iter=200)).double().eval()
    assert_causal(block, make_tensor((2, 7, 4), 3), t=4, atol=1e-12)


def test_block_solves_are_contractive_for_any_lipschitz_below_one() -> None:
    for c in (0.3, 0.9, 0.99):
        block = ref.FixedPointBlock(8, lipschitz=c, sigma_method="exact", seed=4).double()
        with torch.no_grad():
            block.w_z.weight.mul_(10.0)
        x = make_tensor((3, 8), 5)
        sigma = ref.jacobian_spectral_norm(block.map(x), make_tensor((3, 8), 6), n_iter=50)
        assert bool((sigma <= c * (1 + 1e-9)).all())


@pytest.mark.slow  # dynamo start-up alone takes ~10 s on 2 cores
def test_torch_compile_runs_the_optimized_block_and_matches_eager() -> None:
    torch._dynamo.reset()
    block = opt.FixedPointBlock(8, config=ref.DEQConfig(max_iter=6, tol=1e-5, check_every=0)).eval()
    x = make_tensor((4, 8), 0).float()
    compiled = torch.compile(block, backend="eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = block(x)
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_bad_block_inputs_and_configs_are_rejected_with_named_errors() -> None:
    block = ref.FixedPointBlock(6)
    with pytest.raises(ShapeError, match=r"x must have shape \(\.\.\., d_model=6\), got \(2, 5\)"):
        block(torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="mem was given but the block was built without d_mem"):
        block(torch.zeros(2, 6), torch.zeros(2, 3))
    with_mem = ref.FixedPointBlock(6, 3)
    with pytest.raises(ShapeError, match=r"mem must have shape \(2, 3\)"):
        with_mem(torch.zeros(2, 6), torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"z_init must have x's shape \(2, 6\)"):
        block(torch.zeros(2, 6), z_init=torch.zeros(1, 6))
    with pytest.raises(ConfigError, match="backward must be one of"):
        ref.DEQConfig(backward="adjoint")
    with pytest.raises(ConfigError, match="solver must be one of"):
        ref.DEQConfig(solver="newton")
    with pytest.raises(ConfigError, match=r"phantom_damping must lie in \(0, 1\]"):
        ref.DEQConfig(phantom_damping=1.5)
    with pytest.raises(ConfigError, match="max_iter must be an int >= 0"):
        ref.DEQConfig(max_iter=-2)
    with pytest.raises(ConfigError, match="lipschitz must be > 0"):
        ref.SpectralNormLinear(3, 3, lipschitz=0.0)


# ---------------------------------------------------------------------------------------------- gpu / bench

@pytest.mark.gpu
@pytest.mark.parametrize("solver", ref.SOLVERS)
def test_optimized_block_on_cuda_matches_float64_reference(solver: str) -> None:
    r, o = _blocks()
    for block in (r, o):
        block.config = ref.DEQConfig(solver=solver, tol=1e-6, max_iter=300, backward_tol=1e-6,
                                     backward_max_iter=300)
    x, mem = make_tensor((4, 3, 6), 0), make_tensor((4, 3, 4), 1)
    assert_modules_equivalent(r, o, (x, mem), dtype=torch.float32, kwargs={"mem_scale": 0.7}, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ref.SOLVERS)
def test_optimized_block_on_cuda_in_bfloat16_matches_float64_reference(solver: str) -> None:
    config = ref.DEQConfig(solver=solver, tol=1e-2, max_iter=100)
    r = ref.FixedPointBlock(6, 4, config=config, lipschitz=0.5, seed=1)
    o = opt.FixedPointBlock(6, 4, config=config, lipschitz=0.5, seed=1)
    x, mem = make_tensor((4, 3, 6), 0), make_tensor((4, 3, 4), 1)
    assert_modules_equivalent(r, o, (x, mem), dtype=torch.bfloat16, grad=False, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ref.SOLVERS)
def test_optimized_solvers_on_cuda_match_reference_and_raise_on_nan(method: str) -> None:
    W = make_tensor((16, 16), 0)
    W = W * (0.8 / torch.linalg.matrix_norm(W, ord=2))
    u = make_tensor((8, 16), 1)

    def f_cpu(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + u)
    z_r, i_r = ref.solve(f_cpu, torch.zeros(8, 16, dtype=torch.float64), method=method, tol=1e-12, max_iter=300)
    Wc, uc = W.cuda(), u.cuda()
    z_o, i_o = opt.solve(lambda z: torch.tanh(z @ Wc.T + uc), torch.zeros(8, 16, dtype=torch.float64,
                                                                          device="cuda"),
                         method=method, tol=1e-12, max_iter=300)
    torch.testing.assert_close(z_o.cpu(), z_r, rtol=1e-10, atol=1e-10)
    assert bool(((i_o.iterations.cpu() - i_r.iterations).abs() <= 1).all())
    with pytest.raises(NonFiniteError, match="iteration 0"):
        opt.solve(lambda z: z * float("nan"), torch.zeros(2, 3, device="cuda"), method=method)


@pytest.mark.slow
def test_benchmark_reports_anderson_at_most_half_of_plain_iterations_at_lipschitz_0_9() -> None:
    from training.benchmarks import BenchArgs
    from training.benchmarks.deq import bench_deq

    rows = bench_deq(BenchArgs(device=torch.device("cpu"), quick=True, repeat=1))
    summary = [r for r in rows if r.dispatch == "anderson/plain"]
    assert len(summary) == 1 and "PASS" in summary[0].note
    assert {r.impl for r in rows} == {"reference", "optimized"}
