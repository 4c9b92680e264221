"""RMSNorm, SwiGLU, rotary embeddings and causal depthwise conv1d: optimized vs reference, properties, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.primitives as opt
import reference.primitives as ref
from reference.validation import DTypeError, MemarchError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_equivalent, assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds

CPU_DTYPES = st.sampled_from([torch.float64, torch.float32])
needs_cuda = pytest.mark.gpu


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random parameters, so that a test cannot pass on the default init (e.g. unit RMSNorm gain)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


# ---------------------------------------------------------------------------------------------- RMSNorm

@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), use_weight=st.booleans(),
       dtype=CPU_DTYPES, seed=seeds)
def test_rms_norm_optimized_matches_reference(shape: tuple[int, ...], use_weight: bool, dtype: torch.dtype,
                                              seed: int) -> None:
    x = make_tensor(shape, seed)
    w = make_tensor(shape[-1:], seed + 1) if use_weight else None
    assert_equivalent(ref.rms_norm, opt.rms_norm, (x, w), dtype=dtype)


@given(dtype=CPU_DTYPES, seed=seeds)
def test_rms_norm_module_optimized_matches_reference(dtype: torch.dtype, seed: int) -> None:
    r = _perturbed(ref.RMSNorm(5, eps=1e-5), seed)
    assert_modules_equivalent(r, opt.RMSNorm(5, eps=1e-5), (make_tensor((2, 3, 5), seed),), dtype=dtype)


def test_rms_norm_weight_initialised_to_ones() -> None:
    assert torch.equal(ref.RMSNorm(7).weight.detach(), torch.ones(7))
    assert list(ref.RMSNorm(7).state_dict()) == ["weight"]


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(seed=seeds, dim=st.integers(1, 16), scale=st.floats(1e-3, 1e3))
def test_rms_norm_output_has_unit_rms_and_is_scale_invariant(impl: object, seed: int, dim: int,
                                                              scale: float) -> None:
    x = make_tensor((3, dim), seed) + 0.1  # (B, D), away from the zero vector
    y = impl.rms_norm(x, None, 0.0)  # type: ignore[attr-defined]
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=0)
    y_scaled = impl.rms_norm(x * scale, torch.ones(dim, dtype=torch.float64), 0.0)  # type: ignore[attr-defined]
    torch.testing.assert_close(y_scaled, y, rtol=1e-10, atol=1e-12)


def test_rms_norm_rejects_mismatched_weight_and_integer_input() -> None:
    for impl in (ref, opt):
        with pytest.raises(ShapeError, match=r"rms_norm: weight.shape\[0\] must be 4"):
            impl.rms_norm(torch.ones(2, 4), torch.ones(3))
        with pytest.raises(DTypeError, match="x must be a floating-point tensor"):
            impl.rms_norm(torch.ones(2, 4, dtype=torch.long), None)


# ---------------------------------------------------------------------------------------------- SwiGLU

@given(dim=st.integers(1, 6), hidden=st.integers(1, 8), lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
       dtype=CPU_DTYPES, seed=seeds)
def test_swiglu_optimized_matches_reference(dim: int, hidden: int, lead: tuple[int, ...], dtype: torch.dtype,
                                            seed: int) -> None:
    inputs = (make_tensor((*lead, dim), seed), make_tensor((hidden, dim), seed + 1),
              make_tensor((hidden, dim), seed + 2), make_tensor((dim, hidden), seed + 3))
    assert_equivalent(ref.swiglu, opt.swiglu, inputs, dtype=dtype)


@given(dtype=CPU_DTYPES, seed=seeds)
def test_swiglu_module_optimized_matches_reference(dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    r = ref.SwiGLU(6, 10)
    assert_modules_equivalent(r, opt.SwiGLU(6, 10), (make_tensor((2, 3, 6), seed),), dtype=dtype)


def test_swiglu_module_has_bias_free_gate_up_down() -> None:
    m = ref.SwiGLU(4, 9)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "w_gate.weight": (9, 4), "w_up.weight": (9, 4), "w_down.weight": (4, 9)}


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_swiglu_is_linear_in_up_and_down_but_not_in_gate(impl: object) -> None:
    x, wg, wu, wd = (make_tensor(s, i) for i, s in enumerate([(3, 4), (5, 4), (5, 4), (4, 5)]))
    f = impl.swiglu  # type: ignore[attr-defined]
    base = f(x, wg, wu, wd)
    torch.testing.assert_close(f(x, wg, 3 * wu, wd), 3 * base)
    torch.testing.assert_close(f(x, wg, wu, -2 * wd), -2 * base)
    assert not torch.allclose(f(x, 3 * wg, wu, wd), 3 * base)  # SiLU sits on the gate only
    silu = (x @ wg.T) * torch.sigmoid(x @ wg.T)
    torch.testing.assert_close(base, (silu * (x @ wu.T)) @ wd.T)


def test_swiglu_rejects_mismatched_weights() -> None:
    x = torch.ones(2, 4)
    for impl in (ref, opt):
        with pytest.raises(ShapeError, match=r"w_up must have shape \(6, 4\)"):
            impl.swiglu(x, torch.ones(6, 4), torch.ones(5, 4), torch.ones(4, 6))
        with pytest.raises(ShapeError, match=r"w_gate.shape\[1\] must be 4"):
            impl.swiglu(x, torch.ones(6, 3), torch.ones(6, 4), torch.ones(4, 6))


# ---------------------------------------------------------------------------------------------- rotary

@given(seq_len=st.integers(0, 40), half=st.integers(1, 8), offset=st.integers(0, 100_000),
       base=st.sampled_from([10000.0, 500.0, 1e6]), dtype=CPU_DTYPES)
def test_rotary_tables_optimized_match_reference(seq_len: int, half: int, offset: int, base: float,
                                                 dtype: torch.dtype) -> None:
    r = ref.rotary_cos_sin(seq_len, 2 * half, base=base, offset=offset, dtype=dtype)
    o = opt.rotary_cos_sin(seq_len, 2 * half, base=base, offset=offset, dtype=dtype)
    for a, b in zip(r, o, strict=True):
        assert a.shape == (seq_len, half) and a.dtype == dtype
        torch.testing.assert_close(b, a, rtol=0, atol=1e-15 if dtype == torch.float64 else 1e-7)


def test_rotary_tables_hold_the_stated_angles() -> None:
    cos, sin = ref.rotary_cos_sin(3, 4, base=100.0, offset=2, dtype=torch.float64)
    angles = torch.tensor([[2.0, 0.2], [3.0, 0.3], [4.0, 0.4]], dtype=torch.float64)  # (o + t)·100^(−2i/4)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 4)),
       table_rank=st.sampled_from([2, 4]), dtype=CPU_DTYPES, seed=seeds)
def test_apply_rotary_optimized_matches_reference(shape: tuple[int, int, int, int], table_rank: int,
                                                  dtype: torch.dtype, seed: int) -> None:
    B, H, L, half = shape
    x = make_tensor((B, H, L, 2 * half), seed)
    cos, sin = ref.rotary_cos_sin(L, 2 * half, offset=seed % 50, dtype=torch.float64)
    if table_rank == 4:
        cos, sin = cos[None, None], sin[None, None]
    assert_equivalent(ref.apply_rotary, opt.apply_rotary, (x, cos, sin), dtype=dtype)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_apply_rotary_pairs_channel_i_with_i_plus_half(impl: object) -> None:
    x = torch.zeros(1, 1, 1, 6, dtype=torch.float64)
    x[..., 1] = 1.0  # e_1 rotates in the plane (e_1, e_4)
    phi = torch.tensor([[0.0, 0.7, 0.0]], dtype=torch.float64)
    y = impl.apply_rotary(x, phi.cos(), phi.sin())  # type: ignore[attr-defined]
    want = torch.zeros(6, dtype=torch.float64)
    want[1], want[4] = torch.cos(torch.tensor(0.7)), torch.sin(torch.tensor(0.7))
    torch.testing.assert_close(y.flatten(), want)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(seed=seeds, m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(1, 5000),
       half=st.integers(1, 8))
def test_rotary_scores_depend_only_on_position_difference(impl: object, seed: int, m: int, n: int, shift: int,
                                                          half: int) -> None:
    q = make_tensor((1, 1, 1, 2 * half), seed)
    k = make_tensor((1, 1, 1, 2 * half), seed + 1)
    f = impl.apply_rotary  # type: ignore[attr-defined]
    tables = impl.rotary_cos_sin  # type: ignore[attr-defined]

    def score(pq: int, pk: int) -> torch.Tensor:
        return (f(q, *tables(1, 2 * half, offset=pq, dtype=torch.float64))
                * f(k, *tables(1, 2 * half, offset=pk, dtype=torch.float64))).sum()

    torch.testing.assert_close(score(m + shift, n + shift), score(m, n), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score(n, n), (q * k).sum(), rtol=1e-9, atol=1e-9)  # offset 0 = no rotation


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(seed=seeds, offset=st.integers(0, 10_000))
def test_rotary_preserves_norm_of_every_position(impl: object, seed: int, offset: int) -> None:
    x = make_tensor((2, 3, 5, 8), seed)
    y = impl.apply_rotary(x, *impl.rotary_cos_sin(5, 8, offset=offset, dtype=torch.float64))  # type: ignore[attr-defined]
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])  # it does rotate


def test_rotary_rejects_odd_head_dim_wrong_rank_and_mismatched_tables() -> None:
    for impl in (ref, opt):
        with pytest.raises(ShapeError, match=r"head_dim must be a positive even number.*got 5"):
            impl.rotary_cos_sin(4, 5)
        cos, sin = ref.rotary_cos_sin(4, 6)
        with pytest.raises(ShapeError, match=r"x.shape\[3\] \(head_dim\) must be even"):
            impl.apply_rotary(torch.ones(1, 1, 4, 5), cos, sin)
        with pytest.raises(ShapeError, match=r"x must have 4 dimensions \(B, H, L, Dh\)"):
            impl.apply_rotary(torch.ones(4, 6), cos, sin)
        with pytest.raises(ShapeError, match=r"cos must end in \(L, Dh/2\) = \(5, 3\)"):
            impl.apply_rotary(torch.ones(1, 1, 5, 6), cos, sin)
        with pytest.raises(MemarchError, match="offset must be >= 0"):
            impl.rotary_cos_sin(4, 6, offset=-1)


# ---------------------------------------------------------------------------------------------- conv1d

conv_sizes = st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 4), st.integers(1, 5))


@given(sizes=conv_sizes, use_bias=st.booleans(), dtype=CPU_DTYPES, seed=seeds)
def test_causal_conv_optimized_matches_reference(sizes: tuple[int, int, int, int], use_bias: bool,
                                                 dtype: torch.dtype, seed: int) -> None:
    B, L, D, K = sizes
    inputs = (make_tensor((B, L, D), seed), make_tensor((D, K), seed + 1),
              make_tensor((D,), seed + 2) if use_bias else None)
    assert_equivalent(ref.causal_depthwise_conv1d, opt.causal_depthwise_conv1d, inputs, dtype=dtype)


@given(sizes=conv_sizes, use_bias=st.booleans(), dtype=CPU_DTYPES, seed=seeds)
def test_causal_conv_module_optimized_matches_reference(sizes: tuple[int, int, int, int], use_bias: bool,
                                                        dtype: torch.dtype, seed: int) -> None:
    B, L, D, K = sizes
    torch.manual_seed(seed)
    r = ref.CausalDepthwiseConv1d(D, K, bias=use_bias)
    assert_modules_equivalent(r, opt.CausalDepthwiseConv1d(D, K, bias=use_bias), (make_tensor((B, L, D), seed),),
                              dtype=dtype)


def test_causal_conv_module_keeps_mamba_parameter_layout_and_matches_its_conv1d() -> None:
    torch.manual_seed(0)
    m = ref.CausalDepthwiseConv1d(3, 4).double()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {"conv.weight": (3, 1, 4), "conv.bias": (3,)}
    assert_same_parameters(m, opt.CausalDepthwiseConv1d(3, 4))
    x = make_tensor((2, 7, 3), 1)  # (B, L, D)
    want = m.conv(x.transpose(1, 2))[..., :7].transpose(1, 2)  # mamba-ssm's use of the padded Conv1d
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_causal_conv_impulse_response_is_the_reversed_filter_plus_bias(impl: object) -> None:
    w = make_tensor((2, 3), 5)  # (D, K)
    b = make_tensor((2,), 6)
    x = torch.zeros(1, 5, 2, dtype=torch.float64)
    x[0, 0] = 1.0
    y = impl.causal_depthwise_conv1d(x, w, b)  # type: ignore[attr-defined]
    want = torch.stack([w[:, 2], w[:, 1], w[:, 0], torch.zeros(2, dtype=torch.float64),
                        torch.zeros(2, dtype=torch.float64)]) + b
    torch.testing.assert_close(y[0], want)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(seed=seeds, t=st.integers(1, 7), K=st.integers(1, 4))
def test_causal_conv_never_sees_the_future(impl: object, seed: int, t: int, K: int) -> None:
    w, b = make_tensor((3, K), seed), make_tensor((3,), seed + 1)
    x = make_tensor((2, 8, 3), seed + 2)
    assert_causal(lambda u: impl.causal_depthwise_conv1d(u, w, b), x, t)  # type: ignore[attr-defined]
    module = impl.CausalDepthwiseConv1d(3, K).double()  # type: ignore[attr-defined]
    assert_causal(module, x, t)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
@given(sizes=conv_sizes, use_bias=st.booleans(), seed=seeds)
def test_causal_conv_steps_reproduce_the_full_conv(impl: object, sizes: tuple[int, int, int, int],
                                                   use_bias: bool, seed: int) -> None:
    B, L, D, K = sizes
    torch.manual_seed(seed)
    m = impl.CausalDepthwiseConv1d(D, K, bias=use_bias).double()  # type: ignore[attr-defined]
    x = make_tensor((B, L, D), seed)
    state = m.init_state(B)  # (B, D, K)
    ys = []
    for t in range(L):
        y_t, state = m.step(state, x[:, t])
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), m(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[:, :, -min(K, L):], x[:, -min(K, L):].transpose(1, 2))
    zero = m.init_state(B)
    m.step(zero, x[:, 0])
    assert not zero.any()  # the given state is left untouched


@given(dtype=CPU_DTYPES, seed=seeds, use_bias=st.booleans())
def test_causal_conv_step_optimized_matches_reference(dtype: torch.dtype, seed: int, use_bias: bool) -> None:
    inputs = (make_tensor((2, 3, 4), seed), make_tensor((2, 3), seed + 1), make_tensor((3, 4), seed + 2),
              make_tensor((3,), seed + 3) if use_bias else None)
    assert_equivalent(ref.causal_depthwise_conv1d_step, opt.causal_depthwise_conv1d_step, inputs, dtype=dtype)


def test_causal_conv_rejects_wrong_rank_and_mismatched_dims() -> None:
    for impl in (ref, opt):
        with pytest.raises(ShapeError, match=r"x must have 3 dimensions \(B, L, D\), got shape \(4, 3\)"):
            impl.causal_depthwise_conv1d(torch.ones(4, 3), torch.ones(3, 2))
        with pytest.raises(ShapeError, match=r"weight.shape\[0\] must be 3"):
            impl.causal_depthwise_conv1d(torch.ones(1, 4, 3), torch.ones(2, 2))
        with pytest.raises(ShapeError, match=r"bias.shape\[0\] must be 3"):
            impl.causal_depthwise_conv1d(torch.ones(1, 4, 3), torch.ones(3, 2), torch.ones(4))
        with pytest.raises(ShapeError, match=r"conv_state must have shape \(B, D, K\) = \(1, 3, 2\)"):
            impl.causal_depthwise_conv1d_step(torch.ones(1, 3, 4), torch.ones(1, 3), torch.ones(3, 2))
    with pytest.raises(MemarchError, match="kernel_size must be >= 1"):
        ref.CausalDepthwiseConv1d(3, 0)


# ---------------------------------------------------------------------------------------------- GPU

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_primitives_on_cuda_match_float64_reference(dtype: torch.dtype) -> None:
    x = make_tensor((2, 33, 64), 0)
    assert_equivalent(ref.rms_norm, opt.rms_norm, (x, make_tensor((64,), 1)), dtype=dtype, device="cuda")
    weights = (make_tensor((96, 64), 2, scale=0.1), make_tensor((96, 64), 3, scale=0.1),
               make_tensor((64, 96), 4, scale=0.1))
    assert_equivalent(ref.swiglu, opt.swiglu, (x, *weights), dtype=dtype, device="cuda")
    cos, sin = ref.rotary_cos_sin(33, 16, dtype=torch.float64)
    assert_equivalent(ref.apply_rotary, opt.apply_rotary, (make_tensor((2, 4, 33, 16), 5), cos, sin),
                      dtype=dtype, device="cuda")
    assert_equivalent(ref.causal_depthwise_conv1d, opt.causal_depthwise_conv1d,
                      (x, make_tensor((64, 4), 6), make_tensor((64,), 7)), dtype=dtype, device="cuda")
    torch.manual_seed(0)
    assert_modules_equivalent(ref.CausalDepthwiseConv1d(64, 4), opt.CausalDepthwiseConv1d(64, 4), (x,),
                              dtype=dtype, device="cuda")
