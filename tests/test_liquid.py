"""Liquid time-constant cell ([EMMA-1] … [EMMA-3]): optimized ≡ reference (outputs and gradients), the state bound
of the semi-implicit step, convergence to the ODE, segment carry, causality, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optimized.liquid as opt
import reference.liquid as ref
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds


def cells(input_dim: int = 3, hidden_dim: int = 5, **kw: object) -> tuple[ref.LiquidCell, opt.LiquidCell]:
    return (ref.LiquidCell(input_dim, hidden_dim, seed=1, **kw),  # type: ignore[arg-type]
            opt.LiquidCell(input_dim, hidden_dim, seed=2, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(seed=seeds, length=st.integers(1, 7), unfolds=st.integers(1, 4))
@settings(max_examples=8, deadline=None)
def test_optimized_liquid_cell_matches_reference_outputs_and_gradients(dtype: torch.dtype, seed: int, length: int,
                                                                      unfolds: int) -> None:
    r, o = cells(ode_unfolds=unfolds, dt=0.7)
    x = 2.0 * make_tensor((2, length, 3), seed)
    h0 = make_tensor((2, 5), seed + 1)
    assert_modules_equivalent(r, o, (x, h0), dtype=dtype)


def test_liquid_cells_share_one_parameter_layout() -> None:
    r, o = cells()
    assert_same_parameters(r, o)
    assert set(r.state_dict()) == {"w_in.weight", "w_in.bias", "w_rec.weight", "tau_raw", "A"}


@given(seed=seeds, scale=st.sampled_from([1.0, 10.0, 1000.0]), unfolds=st.integers(1, 6))
@settings(max_examples=20, deadline=None)
def test_state_never_leaves_the_hull_of_the_previous_state_and_A(seed: int, scale: float, unfolds: int) -> None:
    """[EMMA-2]: h_new is a positive-weight average of h, A and 0, so |h_new| <= max(|h|, |A|) elementwise."""
    cell = ref.LiquidCell(3, 6, ode_unfolds=unfolds, dt=2.0, seed=seed % 1000).double()
    x = scale * make_tensor((4, 3), seed)
    h = 3.0 * make_tensor((4, 6), seed + 1)
    with torch.no_grad():
        h_new = cell.step(x, h)
        bound = torch.maximum(h.abs(), cell.A.abs().expand_as(h))
    assert bool((h_new.abs() <= bound + 1e-12).all())


def test_many_unfolds_converge_to_the_ltc_ode_solution() -> None:
    """[EMMA-1] [EMMA-2]: for a constant input, the semi-implicit scheme is first-order accurate in Δt."""
    cell = ref.LiquidCell(2, 4, dt=1.0, seed=3).double()
    x, h0 = make_tensor((2, 2), 4), make_tensor((2, 4), 5)

    def rhs(h: torch.Tensor) -> torch.Tensor:
        f = cell.f(x, h)
        return -(1 / cell.tau() + f) * h + f * cell.A

    with torch.no_grad():
        h, n = h0.clone(), 1000  # RK4 reference solution of dh/dt over t ∈ [0, dt]
        step = cell.dt / n
        for _ in range(n):
            k1 = rhs(h)
            k2 = rhs(h + step / 2 * k1)
            k3 = rhs(h + step / 2 * k2)
            k4 = rhs(h + step * k3)
            h = h + step / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        errors = []
        for unfolds in (1, 10, 100):
            cell.ode_unfolds = unfolds
            errors.append(float((cell.step(x, h0) - h).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2
    assert errors[1] / errors[2] > 5  # first order: 10× smaller Δt, about 10× smaller error


@pytest.mark.parametrize("impl", [ref, opt])
def test_running_two_segments_with_the_carried_state_equals_one_run(impl: object) -> None:
    cell = impl.LiquidCell(3, 5, seed=6).double()  # type: ignore[attr-defined]
    x = make_tensor((2, 9, 3), 7)
    with torch.no_grad():
        full, last = cell(x)
        a, mid = cell(x[:, :4])
        b, end = cell(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end, last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", [ref, opt])
def test_liquid_cell_is_causal(impl: object) -> None:
    cell = impl.LiquidCell(3, 5, seed=8).double()  # type: ignore[attr-defined]
    assert_causal(lambda x: cell(x)[0], make_tensor((2, 8, 3), 9), t=5)


@pytest.mark.parametrize("impl", [ref, opt])
def test_bad_liquid_inputs_and_configs_are_rejected_with_named_errors(impl: object) -> None:
    cls = impl.LiquidCell  # type: ignore[attr-defined]
    cell = cls(3, 5)
    with pytest.raises(ShapeError, match=r"x must have shape \(B, L, input_dim=3\), got \(2, 4, 2\)"):
        cell(torch.zeros(2, 4, 2))
    with pytest.raises(ShapeError, match=r"x"):
        cell(torch.zeros(4, 3))
    with pytest.raises(DTypeError, match=r"x"):
        cell(torch.zeros(2, 4, 3, dtype=torch.int64))
    with pytest.raises(ShapeError, match=r"h0 must have shape \(B=2, hidden_dim=5\), got \(2, 4\)"):
        cell(torch.zeros(2, 4, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match=r"ode_unfolds must be an integer >= 1, got 0"):
        cls(3, 5, ode_unfolds=0)
    with pytest.raises(ConfigError, match=r"dt must be a finite number > 0, got -1.0"):
        cls(3, 5, dt=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_liquid_cell_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    r, o = cells(input_dim=16, hidden_dim=32)
    x = make_tensor((4, 32, 16), 0)
    assert_modules_equivalent(r, o, (x,), dtype=dtype, device="cuda")
