"""The needle-in-a-haystack generator: layout, determinism, answerability."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from training.tasks.needle import IGNORE_INDEX, NeedleConfig, NeedleTask


@st.composite
def needle_configs(draw: st.DrawFn) -> NeedleConfig:
    n = draw(st.integers(1, 6))
    L = draw(st.integers(2 * n + 2, 80))
    return NeedleConfig(n_needles=n, seq_len=L, num_keys=draw(st.integers(n, 12)),
                        num_values=draw(st.integers(2, 12)), num_filler=draw(st.integers(1, 8)))


@given(needle_configs(), st.integers(0, 10_000), st.integers(0, 100))
def test_every_sequence_holds_n_distinct_needles_and_an_answerable_query(cfg: NeedleConfig, seed: int,
                                                                        index: int) -> None:
    task = NeedleTask(cfg)
    x, y = task.batch("train", index, 8, seed)
    L = cfg.seq_len
    assert x.shape == y.shape == (8, L)
    assert int(x.max()) < task.vocab_size and int(x.min()) >= 0
    assert bool((y[:, : L - 1] == IGNORE_INDEX).all())
    assert bool((x[:, L - 2] == task.query_token).all())
    for b in range(8):
        hay = x[b, : L - 2]
        is_key = (hay >= task.key_offset) & (hay < task.value_offset)
        key_pos = is_key.nonzero().flatten()
        assert len(key_pos) == cfg.n_needles
        assert len(set(hay[key_pos].tolist())) == cfg.n_needles  # distinct keys
        values = hay[key_pos + 1]
        assert bool(((values >= task.value_offset) & (values < task.query_token)).all())
        queried = int(x[b, L - 1])
        answer = int(values[(hay[key_pos] == queried).nonzero().flatten()[0]])
        assert int(y[b, L - 1]) == answer


def test_batches_are_pure_functions_of_split_index_and_seed() -> None:
    task = NeedleTask(NeedleConfig())
    a = task.batch("train", 3, 4, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, task.batch("train", 3, 4, seed=1), strict=True))
    assert not torch.equal(a[0], task.batch("train", 4, 4, seed=1)[0])
    assert not torch.equal(a[0], task.batch("val", 3, 4, seed=1)[0])
    assert not torch.equal(a[0], task.batch("train", 3, 4, seed=2)[0])
