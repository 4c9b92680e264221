"""Causal sliding-window attention (function and module): optimized vs reference, causality, properties,
bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.attention as opt
import reference.attention as ref
from reference.validation import MemarchError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_equivalent, assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds

CPU_DTYPES = st.sampled_from([torch.float64, torch.float32])


def _qkv(B: int, H: int, L: int, P: int, Dh: int, Dv: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (make_tensor((B, H, L, Dh), seed), make_tensor((B, H, P + L, Dh), seed + 1),
            make_tensor((B, H, P + L, Dv), seed + 2))


def _full_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook causal softmax attention with an explicit upper-triangular mask."""
    L = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    future = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


swa_sizes = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 12), st.integers(0, 3),
                      st.sampled_from([2, 4]), st.sampled_from([2, 3]), st.integers(1, 14))


# ---------------------------------------------------------------------------------------------- function

@given(sizes=swa_sizes, dtype=CPU_DTYPES, seed=seeds, custom_scale=st.booleans())
def test_swa_optimized_matches_reference(sizes: tuple[int, ...], dtype: torch.dtype, seed: int,
                                         custom_scale: bool) -> None:
    B, H, L, P, Dh, Dv, window = sizes
    kwargs: dict[str, object] = {"num_prefix": P, "scale": 0.7 if custom_scale else None}
    assert_equivalent(lambda q, k, v: ref.sliding_window_attention(q, k, v, window, **kwargs),  # type: ignore[arg-type]
                      lambda q, k, v: opt.sliding_window_attention(q, k, v, window, **kwargs),  # type: ignore[arg-type]
                      _qkv(B, H, L, P, Dh, Dv, seed), dtype=dtype)


@given(L=st.integers(1, 23), P=st.integers(0, 3), window=st.integers(1, 6), extra=st.integers(0, 3),
       dtype=CPU_DTYPES, seed=seeds)
def test_swa_blocked_form_matches_reference_for_any_block_at_least_window_minus_one(
        L: int, P: int, window: int, extra: int, dtype: torch.dtype, seed: int) -> None:
    block = max(1, window - 1) + extra
    scale = 1 / math.sqrt(4)
    assert_equivalent(lambda q, k, v: ref.sliding_window_attention(q, k, v, window, num_prefix=P),
                      lambda q, k, v: opt.blocked_attention(q, k, v, window, scale, P, block),
                      _qkv(2, 2, L, P, 4, 3, seed), dtype=dtype)


@pytest.mark.parametrize(("L", "window", "P"), [(150, 5, 0), (150, 5, 2), (150, 70, 1), (140, 1, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swa_public_function_takes_blocked_path_at_long_length_and_matches_reference(
        L: int, window: int, P: int, dtype: torch.dtype) -> None:
    assert opt.swa_dispatch(L, window, P) == "sdpa-blocked"
    assert_equivalent(lambda q, k, v: ref.sliding_window_attention(q, k, v, window, num_prefix=P),
                      lambda q, k, v: opt.sliding_window_attention(q, k, v, window, num_prefix=P),
                      _qkv(1, 2, L, P, 4, 4, L + window), dtype=dtype)


def test_swa_dispatch_names_each_path() -> None:
    assert opt.swa_dispatch(100, 128) == "sdpa-causal"
    assert opt.swa_dispatch(100, 128, num_prefix=4) == "sdpa-dense"
    assert opt.swa_dispatch(256, 128) == "sdpa-dense"
    assert opt.swa_dispatch(257, 128) == "sdpa-blocked"
    assert opt.swa_dispatch(4096, 8) == "sdpa-blocked"


def test_swa_block_mask_has_window_sized_rows_not_length_sized() -> None:
    mask = opt.block_mask(num_blocks=5, block=4, window=3, num_prefix=2, device=torch.device("cpu"))
    assert mask.shape == (5, 4, 2 + 8)
    assert mask[:, :, :2].all()  # the prefix is always visible
    assert torch.equal(mask[1:, :, 2:].sum(-1), torch.full((4, 4), 3))  # w keys per query after block 0
    assert not mask[0, :, 2:6].any()  # nothing before position 0


@pytest.mark.parametrize("fn", [ref.sliding_window_attention, opt.sliding_window_attention],
                         ids=["reference", "optimized"])
@given(L=st.integers(1, 10), extra=st.integers(0, 5), seed=seeds)
def test_swa_with_window_at_least_length_is_full_causal_attention(fn: object, L: int, extra: int,
                                                                  seed: int) -> None:
    q, k, v = _qkv(2, 2, L, 0, 4, 3, seed)
    out = fn(q, k, v, L + extra)  # type: ignore[operator]
    torch.testing.assert_close(out, _full_causal_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("fn", "L"), [(ref.sliding_window_attention, 5), (opt.sliding_window_attention, 5),
                                       (opt.sliding_window_attention, 200)],
                         ids=["reference", "optimized-dense", "optimized-blocked"])
@given(seed=seeds)
def test_swa_with_window_one_and_no_prefix_returns_v_of_the_same_position(fn: object, L: int, seed: int) -> None:
    q, k, v = _qkv(1, 2, L, 0, 4, 3, seed)
    torch.testing.assert_close(fn(q, k, v, 1), v, rtol=1e-12, atol=1e-12)  # type: ignore[operator]


@pytest.mark.parametrize("fn", [ref.sliding_window_attention, opt.sliding_window_attention],
                         ids=["reference", "optimized"])
def test_swa_window_one_with_prefix_mixes_only_prefix_and_self(fn: object) -> None:
    q, k, v = _qkv(1, 1, 6, 2, 4, 3, 0)
    out = fn(q, k, v, 1, num_prefix=2)  # type: ignore[operator]
    for t in range(6):
        keys = torch.cat([k[:, :, :2], k[:, :, 2 + t:3 + t]], 2)
        values = torch.cat([v[:, :, :2], v[:, :, 2 + t:3 + t]], 2)
        p = torch.softmax(q[:, :, t:t + 1] @ keys.transpose(-1, -2) / 2.0, dim=-1)
        torch.testing.assert_close(out[:, :, t:t + 1], p @ values)


# L = 140 takes the optimized blocked path; the reference loop only needs the short length.
@pytest.mark.parametrize(("fn", "L"), [(ref.sliding_window_attention, 9), (opt.sliding_window_attention, 9),
                                       (opt.sliding_window_attention, 140)],
                         ids=["reference", "optimized-dense", "optimized-blocked"])
@given(window=st.integers(1, 5), P=st.integers(0, 2), t=st.integers(1, 8), seed=seeds)
def test_swa_never_sees_the_future(fn: object, L: int, window: int, P: int, t: int, seed: int) -> None:
    prefix_k, prefix_v = make_tensor((1, 2, P, 4), seed), make_tensor((1, 2, P, 4), seed + 1)

    def attend(x: torch.Tensor) -> torch.Tensor:  # x (B, H, L, 12) holds q, k, v of the sequence
        q, k, v = x.split(4, dim=-1)
        k, v = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
        return fn(q, k, v, window, num_prefix=P)  # type: ignore[operator]

    assert_causal(attend, make_tensor((1, 2, L, 12), seed + 2), t * L // 9, time_dim=2)


@pytest.mark.parametrize("fn", [ref.sliding_window_attention, opt.sliding_window_attention],
                         ids=["reference", "optimized"])
def test_swa_forgets_keys_older_than_the_window(fn: object) -> None:
    q, k, v = _qkv(1, 1, 12, 0, 4, 3, 3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :4], v2[:, :, :4] = 10.0, -10.0  # positions 0..3 lie outside the window of queries t >= 7
    a, b = fn(q, k, v, 4), fn(q, k2, v2, 4)  # type: ignore[operator]
    torch.testing.assert_close(a[:, :, 7:], b[:, :, 7:], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, :, 6], b[:, :, 6])  # query 6 still sees position 3


def test_swa_rejects_bad_window_ranks_and_shapes() -> None:
    q, k, v = _qkv(1, 2, 5, 1, 4, 4, 0)
    for fn in (ref.sliding_window_attention, opt.sliding_window_attention):
        for bad in (0, -3):
            with pytest.raises(MemarchError, match=rf"window must be an int >= 1.*got {bad}"):
                fn(q, k, v, bad, num_prefix=1)
        with pytest.raises(ShapeError, match=r"q must have 4 dimensions"):
            fn(q[0], k, v, 2, num_prefix=1)
        with pytest.raises(ShapeError, match=r"k must have shape \(B, H, P \+ L, Dh\) = \(1, 2, 5, 4\)"):
            fn(q, k, v, 2)  # forgot num_prefix: k is one position too long
        with pytest.raises(ShapeError, match=r"v must have shape"):
            fn(q, k, v[:, :1], 2, num_prefix=1)
        with pytest.raises(MemarchError, match=r"num_prefix must be an int >= 0"):
            fn(q, k, v, 2, num_prefix=-1)
        with pytest.raises(MemarchError, match=r"scale must be a finite float > 0"):
            fn(q, k, v, 2, num_prefix=1, scale=0.0)


# ---------------------------------------------------------------------------------------------- module

def _modules(seed: int, window: int, bias: bool = False) -> tuple[ref.SlidingWindowAttention,
                                                                    opt.SlidingWindowAttention]:
    torch.manual_seed(seed)
    r = ref.SlidingWindowAttention(8, 2, window, bias=bias, rotary_base=100.0)
    return r, opt.SlidingWindowAttention(8, 2, window, bias=bias, rotary_base=100.0)


@given(L=st.integers(1, 10), P=st.integers(0, 3), window=st.integers(1, 12), bias=st.booleans(),
       dtype=CPU_DTYPES, seed=seeds)
def test_swa_module_optimized_matches_reference(L: int, P: int, window: int, bias: bool, dtype: torch.dtype,
                                                seed: int) -> None:
    r, o = _modules(seed, window, bias)
    inputs = (make_tensor((2, L, 8), seed),) + ((make_tensor((2, P, 8), seed + 1),) if P else ())
    assert_modules_equivalent(r, o, inputs, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swa_module_on_blocked_path_matches_reference(dtype: torch.dtype) -> None:
    r, o = _modules(0, 3)
    assert_modules_equivalent(r, o, (make_tensor((1, 140, 8), 1), make_tensor((3, 8), 2)), dtype=dtype)


def test_swa_module_has_q_k_v_o_projections_and_one_layout() -> None:
    r, o = _modules(0, 4, bias=True)
    assert_same_parameters(r, o)
    assert sorted(r.state_dict()) == sorted(f"{n}_proj.{p}" for n in "qkvo" for p in ("weight", "bias"))


@pytest.mark.parametrize(("impl", "L"), [(ref, 9), (opt, 9), (opt, 140)],
                         ids=["reference", "optimized-dense", "optimized-blocked"])
@given(window=st.integers(1, 5), t=st.integers(1, 8), seed=seeds)
def test_swa_module_never_sees_the_future(impl: object, L: int, window: int, t: int, seed: int) -> None:
    torch.manual_seed(seed)
    m = impl.SlidingWindowAttention(8, 2, window).double()  # type: ignore[attr-defined]
    prefix = make_tensor((2, 8), seed)
    assert_causal(lambda x: m(x, prefix), make_tensor((2, L, 8), seed + 1), t * L // 9)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_swa_module_follows_prim10_rotating_sequence_q_k_but_not_prefix_keys(impl: object) -> None:
    from reference.primitives import apply_rotary, rotary_cos_sin

    torch.manual_seed(0)
    m = impl.SlidingWindowAttention(8, 2, 3, rotary_base=50.0).double()  # type: ignore[attr-defined]
    x, z = make_tensor((2, 6, 8), 1), make_tensor((2, 2, 8), 2)  # (B, L, D), (B, P, D)

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(y.shape[0], y.shape[1], 2, 4).transpose(1, 2)

    cos, sin = rotary_cos_sin(6, 4, base=50.0, dtype=torch.float64)
    q = apply_rotary(heads(x @ m.q_proj.weight.T), cos, sin)
    k = torch.cat([heads(z @ m.k_proj.weight.T), apply_rotary(heads(x @ m.k_proj.weight.T), cos, sin)], 2)
    v = torch.cat([heads(z @ m.v_proj.weight.T), heads(x @ m.v_proj.weight.T)], 2)
    o = ref.sliding_window_attention(q, k, v, 3, num_prefix=2).transpose(1, 2).reshape(2, 6, 8)
    torch.testing.assert_close(m(x, z), o @ m.o_proj.weight.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_swa_module_shared_prefix_equals_batched_prefix_and_is_visible_everywhere(impl: object) -> None:
    torch.manual_seed(0)
    m = impl.SlidingWindowAttention(8, 2, 2).double()  # type: ignore[attr-defined]
    x, prefix = make_tensor((3, 7, 8), 1), make_tensor((4, 8), 2)
    shared = m(x, prefix)
    torch.testing.assert_close(shared, m(x, prefix.expand(3, 4, 8)), rtol=0, atol=0)
    changed = m(x, prefix + 1.0)
    assert ((shared - changed).abs().amax(dim=(0, 2)) > 1e-6).all()  # every position reads the prefix


@pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
def test_swa_module_scores_are_translation_invariant_through_rotary(impl: object) -> None:
    """Prepending tokens that fall outside the window (3) must not change the outputs of later positions,
    although their absolute positions move by 5: only relative positions enter the scores."""
    torch.manual_seed(0)
    m = impl.SlidingWindowAttention(8, 2, 3).double()  # type: ignore[attr-defined]
    x = make_tensor((1, 10, 8), 3)
    shifted = torch.cat([make_tensor((1, 5, 8), 4), x], dim=1)  # the same tokens 5 positions later
    torch.testing.assert_close(m(shifted)[:, 5 + 2:], m(x)[:, 2:], rtol=1e-10, atol=1e-10)


def test_swa_module_rejects_bad_configuration_and_input() -> None:
    with pytest.raises(ShapeError, match=r"head_dim = dim / num_heads must be even.*head_dim=3"):
        ref.SlidingWindowAttention(6, 2, 4)
    with pytest.raises(MemarchError, match=r"dim must be a positive multiple of num_heads, got dim=10"):
        ref.SlidingWindowAttention(10, 4, 4)
    with pytest.raises(MemarchError, match=r"window must be an int >= 1.*got 0"):
        opt.SlidingWindowAttention(8, 2, 0)
    m = opt.SlidingWindowAttention(8, 2, 4)
    with pytest.raises(ShapeError, match=r"x must have 3 dimensions \(B, L, D\)"):
        m(torch.ones(5, 8))
    with pytest.raises(ShapeError, match=r"x.shape\[2\] must be dim=8"):
        m(torch.ones(1, 5, 6))
    with pytest.raises(ShapeError, match=r"prefix must have shape \(B, P, D\) with B=1, D=8"):
        m(torch.ones(1, 5, 8), torch.ones(2, 3, 8))


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("L", "window", "P"), [(64, 16, 0), (300, 16, 4), (600, 128, 0)])
def test_swa_on_cuda_matches_float64_reference(dtype: torch.dtype, L: int, window: int, P: int) -> None:
    assert_equivalent(lambda q, k, v: ref.sliding_window_attention(q, k, v, window, num_prefix=P),
                      lambda q, k, v: opt.sliding_window_attention(q, k, v, window, num_prefix=P),
                      _qkv(2, 2, L, P, 32, 32, L), dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swa_module_on_cuda_matches_float64_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    r = ref.SlidingWindowAttention(64, 4, 32)
    assert_modules_equivalent(r, opt.SlidingWindowAttention(64, 4, 32),
                              (make_tensor((2, 200, 64), 1), make_tensor((2, 4, 64), 2)), dtype=dtype,
                              device="cuda")
