"""Slot memory (HAMT's HCM, EMMA's VSAMemory) and the HRR capacity bounds: optimized ≡ reference (outputs and
gradients), sequence form ≡ step form, causality, decay bounds, the cosine bound [VSA-17] (and that it catches
bind used in place of unbind), recall accuracy [VSA-18], bad input."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import ModuleType
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.vsa as opt
import reference.vsa as ref
from reference.validation import ConfigError, DTypeError, NonFiniteError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_equivalent, assert_modules_equivalent, assert_same_parameters
from tests.strategies import make_tensor, seeds

CPU_DTYPES = st.sampled_from([torch.float64, torch.float32])
MODES = st.sampled_from(["circular", "elementwise"])
IMPLS = pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])
METHODS = st.sampled_from(["loop", "batched"])  # the optimized decayed_cumsum's two schedules [VSA-16b]


def cumsum_method(method: str) -> AbstractContextManager[object]:
    """Run the optimized `decayed_cumsum` with one schedule (the CPU default is the loop)."""
    return mock.patch.dict(os.environ, {"MEMARCH_DECAYED_CUMSUM": method})


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """MKL's threaded FFT spends ~10 ms per call in thread barriers on a loaded 2-core machine; one thread is
    microseconds at these sizes (numbers are unchanged)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memory_inputs(batch: int, length: int, slots: int, dim: int, seed: int, *, per_slot: bool, gated: bool,
                  decayed: bool) -> tuple[torch.Tensor | None, ...]:
    shape = (batch, length, slots, dim) if per_slot else (batch, length, dim)
    keys, values, queries = (make_tensor(shape, seed + i) for i in range(3))
    gen = torch.Generator().manual_seed(seed)
    scalars = (batch, length, slots) if per_slot else (batch, length)
    gate = torch.rand(scalars, generator=gen, dtype=torch.float64) if gated else None
    decay = torch.rand(scalars, generator=gen, dtype=torch.float64) if decayed else None
    if decay is not None and decay.numel():
        decay.view(-1)[0] = 0.0  # a full forget must be exact in the chunked form too
    state = make_tensor((batch, slots, dim), seed + 9)
    return keys, values, queries, gate, decay, state


# ---------------------------------------------------------------------------------------------- equivalence

@given(mode=MODES, length=st.integers(0, 9), slots=st.integers(1, 3), dim=st.sampled_from([1, 4, 5, 8]),
       per_slot=st.booleans(), gated=st.booleans(), decayed=st.booleans(), normalize=st.booleans(),
       chunk=st.integers(1, 4), dtype=CPU_DTYPES, seed=seeds, method=METHODS)
def test_slot_memory_optimized_matches_reference_outputs_and_gradients(
        mode: str, length: int, slots: int, dim: int, per_slot: bool, gated: bool, decayed: bool, normalize: bool,
        chunk: int, dtype: torch.dtype, seed: int, method: str) -> None:
    kwargs = {"mode": mode, "decay": 0.9, "normalize_read": normalize}
    r = ref.SlotMemory(dim, slots, **kwargs)  # type: ignore[arg-type]
    o = opt.SlotMemory(dim, slots, chunk_size=chunk, **kwargs)  # type: ignore[arg-type]
    assert_same_parameters(r, o)
    inputs = memory_inputs(2, length, slots, dim, seed, per_slot=per_slot, gated=gated, decayed=decayed)
    with cumsum_method(method):
        assert_modules_equivalent(r, o, inputs, dtype=dtype, seed=seed)


@given(mode=MODES, length=st.integers(0, 9), per_slot=st.booleans(), dtype=CPU_DTYPES, seed=seeds, method=METHODS)
def test_forward_many_reads_every_query_from_one_pass(mode: str, length: int, per_slot: bool, dtype: torch.dtype,
                                                      seed: int, method: str) -> None:
    """`forward_many` (HAMT's read and reconstruction read from one memory pass): optimized ≡ reference in
    outputs and gradients (float64 reference), and in each package every read equals `forward` with that query
    alone, the last state included."""
    keys, values, queries, gate, decay, state = memory_inputs(2, length, 3, 6, seed, per_slot=per_slot, gated=True,
                                                               decayed=True)
    assert keys is not None and values is not None and queries is not None
    second = make_tensor(tuple(queries.shape), seed + 20)
    kwargs = {"mode": mode, "decay": 0.9, "normalize_read": True}
    r, o = ref.SlotMemory(6, 3, **kwargs), opt.SlotMemory(6, 3, chunk_size=2, **kwargs)  # type: ignore[arg-type]

    def flat(memory: ref.SlotMemory) -> Callable[..., tuple[torch.Tensor, ...]]:
        def run(k: torch.Tensor, v: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, g: torch.Tensor,
                lam: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
            (a, b), last = memory.forward_many(k, v, (q1, q2), g, lam, m)
            return a, b, last
        return run

    with cumsum_method(method):
        assert_equivalent(flat(r), flat(o), (keys, values, queries, second, gate, decay, state), dtype=dtype)
        for memory in (r, o):
            (a, b), last = memory.forward_many(keys, values, (queries, second), gate, decay, state)
            alone_a, last_a = memory(keys, values, queries, gate, decay, state)
            alone_b, _ = memory(keys, values, second, gate, decay, state)
            for got, want in ((a, alone_a), (b, alone_b), (last, last_a)):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@IMPLS
def test_forward_many_needs_a_query_and_checks_every_one(impl: ModuleType) -> None:
    memory = impl.SlotMemory(4, 2)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with pytest.raises(ShapeError, match="at least one query"):
        memory.forward_many(x, x, ())
    with pytest.raises(ShapeError, match="queries"):
        memory.forward_many(x, x, (x, torch.randn(1, 3, 5, dtype=torch.float64)))


@given(length=st.integers(0, 40), chunk=st.integers(1, 5), dtype=CPU_DTYPES, seed=seeds, with_state=st.booleans(),
       method=METHODS)
def test_decayed_cumsum_chunked_matches_the_literal_recurrence(length: int, chunk: int, dtype: torch.dtype, seed: int,
                                                                with_state: bool, method: str) -> None:
    """Both schedules; lengths up to 40 with chunks of 2–5 take the batched form through two and three levels."""
    u = make_tensor((2, length, 3, 4), seed)
    lam = torch.rand(2, length, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if length:
        lam[:, 0, 0] = 0.0
        lam[:, length // 2, 1] = 0.0  # a zero decay inside the sequence (often mid-chunk, sometimes a chunk end)
    state = make_tensor((2, 3, 4), seed + 1) if with_state else None
    with cumsum_method(method):
        assert_equivalent(ref.decayed_cumsum, lambda *x: opt.decayed_cumsum(*x, chunk_size=chunk), (u, lam, state),
                          dtype=dtype)


def test_decayed_cumsum_batched_schedule_over_three_levels_and_a_padded_tail() -> None:
    """L = 203 in chunks of 4: 51 chunks (the last one padded), 13 chunk ends of those, 4 of those: the batched
    form's recursion three levels deep, against the literal recurrence in float64 with gradients; u non-contiguous."""
    u = make_tensor((1, 2, 203, 3), 7).transpose(1, 2)  # (B, L, S, X) as a strided view
    lam = 0.5 + 0.5 * torch.rand(1, 203, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lam[0, 100, 0] = 0.0
    with cumsum_method("batched"):
        assert_equivalent(ref.decayed_cumsum, lambda *x: opt.decayed_cumsum(*x, chunk_size=4),
                          (u, lam, make_tensor((1, 2, 3), 8)), dtype=torch.float64)


def test_decayed_cumsum_schedule_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` takes the loop on the CPU and the batched form elsewhere; an unknown value names the choices."""
    monkeypatch.delenv("MEMARCH_DECAYED_CUMSUM", raising=False)
    assert opt._cumsum_method(torch.device("cpu")) == "loop"
    assert opt._cumsum_method(torch.device("cuda")) == "batched"
    monkeypatch.setenv("MEMARCH_DECAYED_CUMSUM", "loop")
    assert opt._cumsum_method(torch.device("cuda")) == "loop"
    monkeypatch.setenv("MEMARCH_DECAYED_CUMSUM", "scan")
    with pytest.raises(ValueError, match="auto, loop, batched"):
        opt.decayed_cumsum(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1))


def test_decayed_cumsum_batched_schedule_launches_a_number_of_ops_independent_of_length() -> None:
    """The point of the batched form: its op count grows with the levels (⌈log_C L⌉), not with L/C as the loop's
    does — counted by the profiler's aten ops in forward + backward on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    def ops(method: str, length: int) -> int:
        u = torch.randn(1, length, 2, 3, requires_grad=True)
        lam = torch.rand(1, length, 2)
        with cumsum_method(method), profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.decayed_cumsum(u, lam, None, chunk_size=8).sum().backward()
        return len([e for e in prof.events() if e.name.startswith("aten::")])

    assert ops("batched", 64) == ops("batched", 32)  # 8 or 4 chunks, then one chunk of their ends: two levels
    assert ops("loop", 64) > 1.5 * ops("loop", 32)  # the loop: a set of ops per chunk
    assert ops("batched", 256) < ops("loop", 256) / 4


@given(steps=st.integers(1, 7), seed=seeds, zeros=st.lists(st.integers(0, 6), max_size=3),
       dtype=CPU_DTYPES)
def test_decay_products_match_the_literal_products_with_zero_decays(steps: int, seed: int, zeros: list[int],
                                                                     dtype: torch.dtype) -> None:
    """[VSA-16a] the optimized products and their hand-written backward (no host sync) against the literal
    products and autograd through them, with some λ exactly 0 (where a division-based gradient would fail)."""
    lam = torch.rand(2, 3, steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for j in zeros:
        lam[..., j % steps] = 0.0
    assert_equivalent(ref.decay_products, opt.decay_products, (lam,), dtype=dtype)


@IMPLS
def test_decay_products_reject_bad_input(impl: ModuleType) -> None:
    with pytest.raises(ShapeError, match="lam must have a last dim"):
        impl.decay_products(torch.tensor(0.5))
    with pytest.raises(ShapeError, match="lam must have a last dim"):
        impl.decay_products(torch.ones(2, 0))
    with pytest.raises(DTypeError, match="lam"):
        impl.decay_products(torch.ones(2, 3, dtype=torch.int64))


def test_decayed_cumsum_backward_makes_no_host_sync() -> None:
    """torch's cumprod backward reads `(λ == 0).any()` on the host (a device sync per chunk on a GPU); the
    chunked sum's backward must not call `item` at all."""
    from torch.profiler import ProfilerActivity, profile

    for method in ("loop", "batched"):
        u = torch.randn(1, 20, 2, 3, requires_grad=True)
        lam = torch.rand(1, 20, 2, requires_grad=True)
        with cumsum_method(method):
            out = opt.decayed_cumsum(u, lam, None, chunk_size=4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out.sum().backward()
        syncs = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
        assert not syncs, (method, syncs)
        assert u.grad is not None and lam.grad is not None


@given(mode=MODES, dtype=CPU_DTYPES, seed=seeds)
def test_slot_memory_write_and_read_steps_match_reference(mode: str, dtype: torch.dtype, seed: int) -> None:
    r, o = ref.SlotMemory(6, 2, mode=mode, decay=0.5), opt.SlotMemory(6, 2, mode=mode, decay=0.5)  # type: ignore[arg-type]
    state, key, value, gate = make_tensor((3, 2, 6), seed), make_tensor((3, 2, 6), seed + 1), \
        make_tensor((3, 6), seed + 2), make_tensor((3, 2), seed + 3)
    assert_equivalent(r.write, o.write, (state, key, value, gate), dtype=dtype)
    assert_equivalent(r.read, o.read, (state, key), dtype=dtype)


@IMPLS
@given(mode=MODES, length=st.integers(1, 10), chunk=st.integers(1, 12), seed=seeds)
def test_sequence_form_equals_the_step_form(impl: ModuleType, mode: str, length: int, chunk: int, seed: int) -> None:
    memory = impl.SlotMemory(4, 2, mode=mode, decay=0.8, normalize_read=True, chunk_size=chunk)
    keys, values, queries, gate, decay, state = memory_inputs(2, length, 2, 4, seed, per_slot=True, gated=True,
                                                              decayed=True)
    assert keys is not None and values is not None and queries is not None and state is not None
    assert gate is not None and decay is not None
    reads, last = memory(keys, values, queries, gate, decay, state)
    M = state
    for t in range(length):
        M = memory.write(M, keys[:, t], values[:, t], None if gate is None else gate[:, t],
                         None if decay is None else decay[:, t])
        torch.testing.assert_close(reads[:, t], memory.read(M, queries[:, t]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, M, rtol=1e-10, atol=1e-10)
    # carrying the state across two segments equals one pass
    cut = length // 2
    first, mid = memory(keys[:, :cut], values[:, :cut], queries[:, :cut], gate[:, :cut], decay[:, :cut], state)
    second, end = memory(keys[:, cut:], values[:, cut:], queries[:, cut:], gate[:, cut:], decay[:, cut:], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), reads, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end, last, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- causality, decay

@IMPLS
@given(mode=MODES, t=st.integers(0, 7), seed=seeds)
def test_slot_memory_is_causal(impl: ModuleType, mode: str, t: int, seed: int) -> None:
    memory = impl.SlotMemory(4, 2, mode=mode, decay=0.9, chunk_size=3)

    def reads(x: torch.Tensor) -> torch.Tensor:  # x (B, L, 3, D): keys, values, queries stacked
        return memory(x[:, :, 0], x[:, :, 1], x[:, :, 2])[0]

    assert_causal(reads, make_tensor((2, 8, 3, 4), seed), t)


@IMPLS
@given(mode=MODES, lam=st.floats(0.0, 1.0), seed=seeds)
def test_trace_norm_never_grows_under_decay_without_writes(impl: ModuleType, mode: str, lam: float,
                                                           seed: int) -> None:
    memory = impl.SlotMemory(8, 3, mode=mode, decay=lam, chunk_size=4)
    state = make_tensor((2, 3, 8), seed)
    keys = make_tensor((2, 10, 8), seed + 1)
    gate = torch.zeros(2, 10, dtype=torch.float64)  # no writes
    states = impl.decayed_cumsum(torch.zeros(2, 10, 3, 8, dtype=torch.float64),
                                 torch.full((2, 10, 3), lam, dtype=torch.float64), state)
    norms = torch.linalg.vector_norm(torch.cat([state[:, None], states], dim=1), dim=-1)  # (B, L + 1, S)
    assert bool((norms[:, 1:] <= norms[:, :-1] * (1 + 1e-12)).all())
    torch.testing.assert_close(norms[:, -1], norms[:, 0] * lam**10, rtol=1e-9, atol=1e-12)
    _, last = memory(keys, keys, keys, gate, None, state)
    torch.testing.assert_close(last, state * lam**10, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- capacity

def retrieval_cosines(impl: ModuleType, num_pairs: int, dim: int, traces: int, seed: int,
                      retrieve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """cos(retrieve(T, a_i), b_i) for every pair of `traces` traces, each the bundle of k HRR pairs."""
    g = torch.Generator().manual_seed(seed)
    a = impl.random_hrr(dim, (traces, num_pairs), generator=g, dtype=torch.float64)
    b = impl.random_hrr(dim, (traces, num_pairs), generator=g, dtype=torch.float64)
    T = impl.bundle(impl.bind(a, b))[:, None]  # (traces, 1, D)
    return impl.cosine(retrieve(T, a), b).flatten()


@given(num_pairs=st.integers(1, 8), dim=st.sampled_from([2048, 3000, 4096]), seed=seeds)
def test_hrr_retrieval_cosine_clears_the_bound_and_bind_instead_of_unbind_does_not(num_pairs: int, dim: int,
                                                                                  seed: int) -> None:
    bound = ref.hrr_recall_bound(num_pairs, dim, delta=0.01)
    assert bound > 0.1  # the drawn sizes make the check meaningful
    cos = retrieval_cosines(opt, num_pairs, dim, 4, seed, lambda T, a: opt.unbind(T, a))
    assert bool((cos >= bound).all()), f"min cosine {float(cos.min()):.3f} < bound {bound:.3f}"
    mean, sd = ref.hrr_cosine_stats(num_pairs, dim)
    assert abs(float(cos.mean()) - mean) < 6 * sd / cos.numel() ** 0.5 + 0.01
    wrong = retrieval_cosines(opt, num_pairs, dim, 4, seed, lambda T, a: opt.bind(T, a))
    assert not bool((wrong >= bound).all()), "the bound does not tell unbinding from binding"


def test_reference_hrr_retrieval_clears_the_bound() -> None:
    cos = retrieval_cosines(ref, 2, 2048, 1, 0, lambda T, a: ref.unbind(T, a))
    assert bool((cos >= ref.hrr_recall_bound(2, 2048)).all())


def test_capacity_bounds_match_the_spec_table() -> None:
    assert [round(ref.hrr_recall_bound(k, 4096), 3) for k in (1, 2, 4, 8)] == [0.597, 0.469, 0.324, 0.196]
    assert [round(ref.hrr_recall_accuracy_bound(k, 4096, k + 8), 3) for k in (1, 2, 4, 8)] == \
        [0.986, 0.979, 0.959, 0.909]
    mean, sd = ref.hrr_cosine_stats(1, 512)
    assert mean == pytest.approx(2**-0.5) and sd == pytest.approx((0.5 / 512) ** 0.5)
    assert ref.hrr_recall_bound(8, 1024) < ref.hrr_recall_bound(8, 4096) < ref.hrr_recall_bound(4, 4096)


@given(num_pairs=st.integers(1, 8), seed=seeds)
def test_slot_memory_recalls_k_pairs_above_the_accuracy_bound(num_pairs: int, seed: int) -> None:
    dim, slots, distractors, batch = 2048, 2, 8, 4
    g = torch.Generator().manual_seed(seed)
    keys = opt.random_hrr(dim, (batch, num_pairs, slots), generator=g, dtype=torch.float64)
    values = opt.random_hrr(dim, (batch, num_pairs, slots), generator=g, dtype=torch.float64)
    memory = opt.SlotMemory(dim, slots)
    _, M = memory(keys, values, keys)  # all k pairs written, M (B, S, D)
    retrieved = torch.stack([memory.read(M, keys[:, i]) for i in range(num_pairs)], dim=1)  # (B, k, S, D)
    hits = 0
    for b in range(batch):
        for s in range(slots):
            codebook = torch.cat([values[b, :, s], opt.random_hrr(dim, (distractors,), generator=g,
                                                                   dtype=torch.float64)])
            found = opt.cleanup(retrieved[b, :, s], codebook).indices[:, 0]
            hits += int((found == torch.arange(num_pairs)).sum())
    accuracy = hits / (batch * slots * num_pairs)
    assert accuracy >= ref.hrr_recall_accuracy_bound(num_pairs, dim, num_pairs + distractors)


# ---------------------------------------------------------------------------------------------- bad input

@IMPLS
def test_slot_memory_rejects_bad_configs_shapes_dtypes_and_nan_state(impl: ModuleType) -> None:
    with pytest.raises(ShapeError, match=r"SlotMemory: dim \(D\) must be an int >= 1, got 0"):
        impl.SlotMemory(0)
    with pytest.raises(ConfigError, match="num_slots must be an int >= 1, got 0"):
        impl.SlotMemory(4, 0)
    with pytest.raises(ConfigError, match="mode must be one of"):
        impl.SlotMemory(4, mode="fft")
    memory = impl.SlotMemory(4, 2)
    keys = torch.ones(2, 3, 4)
    with pytest.raises(ShapeError, match=r"values must have shape \(2, 3, 4\).*or \(2, 3, 2, 4\).*got \(2, 3, 5\)"):
        memory(keys, torch.ones(2, 3, 5), keys)
    with pytest.raises(ShapeError, match=r"gate must have shape \(2, 3\).*or \(2, 3, 2\)"):
        memory(keys, keys, keys, torch.ones(2, 3, 4))
    with pytest.raises(DTypeError, match="keys must be a floating-point tensor"):
        memory(keys.long(), keys, keys)
    state = memory.init_state(2)
    state[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"SlotMemory.forward: state holds 1 non-finite"):
        memory(keys, keys, keys, state=state)
    with pytest.raises(NonFiniteError, match=r"SlotMemory.read: state holds 1 non-finite"):
        memory.read(state, torch.ones(2, 4))
    with pytest.raises(ShapeError, match=r"state must have shape \(B, S=2, D=4\), got \(2, 4\)"):
        memory.write(torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 4))
    strict = impl.SlotMemory(4, mode="elementwise", strict=True)
    with pytest.raises(ValueError, match="bipolar key keys"):
        strict(torch.full((1, 2, 4), 0.5), keys[:1, :2], keys[:1, :2])
    with pytest.raises(ShapeError, match=r"lam must have shape \(B, L, S\)"):
        impl.decayed_cumsum(torch.ones(1, 2, 3, 4), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["circular", "elementwise"])
def test_slot_memory_on_cuda_matches_reference(dtype: torch.dtype, mode: str) -> None:
    r = ref.SlotMemory(16, 2, mode=mode, decay=0.9)  # type: ignore[arg-type]
    o = opt.SlotMemory(16, 2, mode=mode, decay=0.9, chunk_size=4)  # type: ignore[arg-type]
    inputs = memory_inputs(2, 9, 2, 16, 0, per_slot=True, gated=True, decayed=True)
    assert_modules_equivalent(r, o, inputs, dtype=dtype, device="cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cumsum_benchmark_times_both_schedules_and_the_reference(device: str) -> None:
    """`bench.py --op cumsum`: per length a loop row and a batched row (named in `dispatch`, the batched one with
    its speed relative to the loop's), and the literal reference at the shortest length."""
    from training.benchmarks import BenchArgs, discover

    rows = discover()["cumsum"](BenchArgs(device=torch.device(device), quick=True, repeat=1))
    assert [(row.impl, row.dispatch) for row in rows] == [
        ("optimized", "decayed_cumsum:loop"), ("optimized", "decayed_cumsum:batched"), ("reference", "loop over t"),
        ("optimized", "decayed_cumsum:loop"), ("optimized", "decayed_cumsum:batched")]
    assert all(row.ms > 0 for row in rows)
    assert "the loop's speed" in rows[1].note and "L=1024" in rows[3].params
