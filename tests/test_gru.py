"""GRU baseline: optimized (fused nn.GRU) ≡ literal reference, causality, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optimized.gru import GRUModel as OptGRU
from reference.gru import GRUConfig, gru_cell
from reference.gru import GRUModel as RefGRU
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_modules_equivalent
from tests.strategies import seeds


def models(cfg: GRUConfig, seed: int) -> tuple[RefGRU, OptGRU]:
    torch.manual_seed(seed)
    ref = RefGRU(cfg)
    opt = OptGRU(cfg)
    opt.load_state_dict(ref.state_dict())
    return ref, opt


@given(seed=seeds, layers=st.integers(1, 2), L=st.integers(1, 9), B=st.integers(1, 3),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_optimized_gru_matches_reference_outputs_and_gradients(seed: int, layers: int, L: int, B: int,
                                                               dtype: torch.dtype) -> None:
    cfg = GRUConfig(vocab_size=7, embed_dim=5, hidden_dim=6, num_layers=layers)
    ref, opt = models(cfg, seed)
    ids = torch.randint(0, 7, (B, L), generator=torch.Generator().manual_seed(seed))
    assert_modules_equivalent(ref, opt, (ids,), dtype=dtype, seed=seed)


def test_gru_cell_matches_torch_gru_cell() -> None:
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(4, 3).double()
    x, h = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    expected = cell(x, h)
    got = gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [RefGRU, OptGRU])
@given(seed=seeds, t=st.integers(0, 7))
def test_gru_is_causal(cls: type[RefGRU], seed: int, t: int) -> None:
    torch.manual_seed(seed)
    model = cls(GRUConfig(vocab_size=9, embed_dim=4, hidden_dim=5)).double()
    ids = torch.randint(0, 9, (2, 8), generator=torch.Generator().manual_seed(seed))
    assert_causal(model, ids, t, vocab_size=9)


@pytest.mark.parametrize("cls", [RefGRU, OptGRU])
def test_gru_rejects_bad_input(cls: type[RefGRU]) -> None:
    model = cls(GRUConfig(vocab_size=9, embed_dim=4, hidden_dim=5))
    with pytest.raises(ShapeError, match=r"input_ids must have 2 dimensions \(batch, seq_len\), got shape \(2, 3, 4\)"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(DTypeError, match=r"input_ids must be int64/int32 token ids, got torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"seq_len 0"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"input_ids: token ids must lie in \[0, vocab_size=9\), got min 0, max 9"):
        model(torch.tensor([[0, 9]]))
    with pytest.raises(ShapeError, match=r"state must have shape \(num_layers, batch, hidden_dim\) = \(1, 2, 5\)"):
        model(torch.zeros(2, 3, dtype=torch.long), state=torch.zeros(1, 2, 4))
    with pytest.raises(ConfigError, match=r"hidden_dim: must be an integer >= 1, got 0"):
        GRUConfig(vocab_size=9, hidden_dim=0)


@pytest.mark.gpu
def test_optimized_gru_matches_reference_on_cuda_in_bf16_and_fp32() -> None:
    cfg = GRUConfig(vocab_size=11, embed_dim=16, hidden_dim=32, num_layers=2)
    ref, opt = models(cfg, 0)
    ids = torch.randint(0, 11, (4, 33), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        assert_modules_equivalent(ref, opt, (ids,), dtype=dtype, device="cuda", grad=dtype == torch.float32)
