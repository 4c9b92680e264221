"""Mamba block and stack: optimized vs reference, recurrent stepping vs the forward pass, causality, init, bad input."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.mamba as opt
import reference.mamba as ref
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds

CPU_DTYPES = st.sampled_from([torch.float64, torch.float32])


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def _perturbed(module: ModuleT, seed: int) -> ModuleT:
    """Random but sane parameters (small weights, A_log kept as initialised plus noise), so no test passes on
    the default init alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.add_(noise * (0.1 if name.endswith("A_log") else 0.3))
    return module


def _block_pair(d_model: int, d_state: int, d_conv: int, seed: int) -> tuple[ref.MambaBlock, opt.MambaBlock]:
    torch.manual_seed(seed)
    r = _perturbed(ref.MambaBlock(d_model, d_state, d_conv), seed)
    return r, opt.MambaBlock(d_model, d_state, d_conv)


@given(d_model=st.integers(2, 8), d_state=st.integers(1, 4), d_conv=st.integers(1, 4), length=st.integers(1, 19),
       dtype=CPU_DTYPES, seed=seeds)
def test_mamba_block_optimized_matches_reference(d_model: int, d_state: int, d_conv: int, length: int,
                                                 dtype: torch.dtype, seed: int) -> None:
    r, o = _block_pair(d_model, d_state, d_conv, seed)
    assert_modules_equivalent(r, o, (make_tensor((2, length, d_model), seed),), dtype=dtype)


@given(n_layers=st.integers(1, 3), length=st.integers(1, 12), dtype=CPU_DTYPES, seed=seeds)
def test_mamba_stack_optimized_matches_reference(n_layers: int, length: int, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    r = _perturbed(ref.MambaStack(6, 3, 3, n_layers), seed)
    assert_modules_equivalent(r, opt.MambaStack(6, 3, 3, n_layers), (make_tensor((2, length, 6), seed),),
                              dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(a_log=st.floats(5.0, 8.0), dt_bias=st.floats(0.0, 5.0), length=st.sampled_from([17, 64]), seed=seeds)
def test_mamba_block_gradients_stay_finite_once_A_log_has_grown(dtype: torch.dtype, a_log: float, dt_bias: float,
                                                               length: int, seed: int) -> None:
    # regression: with A = −exp(A_log), A_log ≈ 5–8 (grown in training) and Δ ≈ softplus(5), the optimized scan's
    # backward returned NaN for A_log and dt_proj in float32 while its forward pass stayed finite
    r, o = _block_pair(4, 4, 4, seed)
    with torch.no_grad():
        r.A_log.add_(a_log - r.A_log.max())
        r.dt_proj.bias.fill_(dt_bias)
    assert_modules_equivalent(r, o, (make_tensor((2, length, 4), seed),), dtype=dtype)


def test_optimized_modules_have_the_reference_parameters() -> None:
    assert_same_parameters(ref.MambaStack(8, 4, 4, 2), opt.MambaStack(8, 4, 4, 2))
    keys = set(ref.MambaBlock(8).state_dict())
    assert keys == {"in_proj.weight", "conv1d.conv.weight", "conv1d.conv.bias", "x_proj.weight", "dt_proj.weight",
                    "dt_proj.bias", "out_proj.weight", "A_log", "D"}


@pytest.mark.parametrize("pkg", [ref, opt], ids=["reference", "optimized"])
@given(length=st.integers(1, 11), split=st.integers(0, 11), seed=seeds)
def test_stepping_the_stack_equals_its_forward_pass(pkg: Any, length: int, split: int, seed: int) -> None:
    torch.manual_seed(seed)
    stack = _perturbed(pkg.MambaStack(6, 3, 3, 2), seed).to(torch.float64)
    x = make_tensor((2, length, 6), seed)
    with torch.no_grad():
        full = stack(x)
        cut = split % length  # prefix run in parallel with forward_with_state, the rest token by token
        if cut:
            prefix, states = stack.forward_with_state(x[:, :cut])
            torch.testing.assert_close(prefix, full[:, :cut], rtol=1e-10, atol=1e-10)
        else:
            states = stack.init_state(2, dtype=torch.float64)
        for t in range(cut, length):
            y_t, states = stack.step(x[:, t], states)
            torch.testing.assert_close(y_t, full[:, t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pkg", [ref, opt], ids=["reference", "optimized"])
def test_stepping_a_block_equals_its_forward_pass_and_final_state(pkg: Any) -> None:
    torch.manual_seed(0)
    block = _perturbed(pkg.MambaBlock(5, 4, 4), 0).to(torch.float64)
    x = make_tensor((3, 9, 5), 1)
    with torch.no_grad():
        full, final = block.forward_with_state(x)
        state = block.init_state(3, dtype=torch.float64)
        for t in range(9):
            y_t, state = block.step(x[:, t], state)
            torch.testing.assert_close(y_t, full[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, final.conv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.ssm, final.ssm, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pkg", [ref, opt], ids=["reference", "optimized"])
def test_mamba_stack_is_causal(pkg: Any) -> None:
    torch.manual_seed(0)
    stack = _perturbed(pkg.MambaStack(4, 2, 4, 2), 0).to(torch.float64)
    x = make_tensor((2, 18, 4), 2)
    for t in (1, 5, 9, 17):
        assert_causal(stack, x, t)


def test_mamba_block_initialisation_follows_the_paper() -> None:
    torch.manual_seed(0)
    block = ref.MambaBlock(40, d_state=6)
    assert block.d_inner == 80 and block.dt_rank == math.ceil(40 / 16) == 3 and block.d_conv == 4
    expected_A = -torch.arange(1, 7, dtype=torch.float32).repeat(80, 1)
    torch.testing.assert_close(-torch.exp(block.A_log.detach()), expected_A)
    assert torch.equal(block.D.detach(), torch.ones(80))
    dt = torch.nn.functional.softplus(block.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 1e-1 * (1 + 1e-5)
    assert float(dt.log().std()) > 0.5  # spread log-uniformly, not a constant
    assert float(block.dt_proj.weight.detach().abs().max()) <= 3 ** -0.5
    assert tuple(block.x_proj.weight.shape) == (3 + 12, 80)


def test_bad_mamba_inputs_and_configs_raise() -> None:
    for pkg in (ref, opt):
        block = pkg.MambaBlock(4)
        with pytest.raises(ShapeError, match=r"x.shape\[-1\] must be d_model = 4"):
            block(torch.zeros(1, 3, 5))
        with pytest.raises(ShapeError, match=r"x must have 3 dimensions \(B, L, d_model\)"):
            block(torch.zeros(3, 4))
        with pytest.raises(DTypeError, match="x must be a floating-point tensor"):
            block(torch.zeros(1, 3, 4, dtype=torch.long))
        with pytest.raises(ConfigError, match="d_state must be an integer >= 1, got 0"):
            pkg.MambaBlock(4, d_state=0)
        with pytest.raises(ConfigError, match="n_layers must be an integer >= 1, got 0"):
            pkg.MambaStack(4, 2, 4, 0)
        stack = pkg.MambaStack(4, 2, 4, 2)
        with pytest.raises(ShapeError, match="one MambaState per layer"):
            stack.step(torch.zeros(1, 4), stack.init_state(1)[:1])
