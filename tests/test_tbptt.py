"""Truncated BPTT in the shared trainer, and the GRU's carried state (segments, generation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optimized.gru import GRUModel as OptGRU
from reference.gru import GRUConfig
from reference.gru import GRUModel as RefGRU
from reference.validation import ConfigError
from tests.strategies import seeds
from training import load_experiment
from training.generation import generate
from training.loop import loss_and_accuracy, segment_losses, train

CFG = GRUConfig(vocab_size=11, embed_dim=5, hidden_dim=7, num_layers=2)


@pytest.mark.parametrize("cls", [RefGRU, OptGRU])
@given(seed=seeds, L=st.integers(1, 12), cut=st.integers(1, 12))
def test_segmentwise_forward_with_carried_state_equals_one_pass(cls: type[RefGRU], seed: int, L: int,
                                                                cut: int) -> None:
    torch.manual_seed(seed)
    model = cls(CFG).double()
    ids = torch.randint(0, 11, (2, L), generator=torch.Generator().manual_seed(seed))
    full = model(ids)
    first = model(ids[:, :cut], return_state=True)
    assert isinstance(first, dict)
    rest = model(ids[:, cut:], state=first["state"]) if cut < L else first["logits"][:, :0]
    torch.testing.assert_close(torch.cat([first["logits"], rest], dim=1), full, rtol=1e-12, atol=1e-12)


@given(seed=seeds, length=st.integers(1, 9))
def test_tbptt_segment_losses_sum_to_the_full_loss(seed: int, length: int) -> None:
    torch.manual_seed(seed)
    model = OptGRU(CFG).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (3, 9), generator=g)
    y = torch.randint(0, 11, (3, 9), generator=g)
    y[:, ::2] = -100  # some ignored targets
    full, _ = loss_and_accuracy(model(x), y)
    parts = list(segment_losses(model, x, y, length))
    assert len(parts) == -(-9 // length)
    weighted = sum(float(loss.detach()) * w for loss, _, _, _, w in parts if w > 0)
    assert weighted == pytest.approx(float(full.detach()), rel=1e-12)


def test_tbptt_cuts_the_gradient_at_segment_boundaries() -> None:
    torch.manual_seed(0)
    model = OptGRU(CFG).double()
    x = torch.randint(0, 11, (1, 8))
    y = torch.full((1, 8), -100)
    y[0, -1] = 3  # only the last position is scored
    for loss, _, _, _, w in segment_losses(model, x, y, 4):
        (loss * w).backward() if w > 0 else None
    emb_grad = model.embed.weight.grad
    assert emb_grad is not None
    # tokens of the first segment get no gradient from a loss in the second segment
    first_only = set(x[0, :4].tolist()) - set(x[0, 4:].tolist())
    assert all(float(emb_grad[t].abs().sum()) == 0 for t in first_only)


def test_training_with_tbptt_runs_and_learns(tmp_path: Path) -> None:
    exp = load_experiment({"model": {"name": "gru", "embed_dim": 16, "hidden_dim": 32},
                           "task": {"name": "text", "files": ["tests/fixtures/tiny_corpus.txt"], "seq_len": 48},
                           "train": {"steps": 60, "batch_size": 8, "lr": 1e-2, "tbptt_length": 16,
                                     "eval_every": 60, "eval_batches": 1}})
    summary = train(exp, impl="optimized", device=torch.device("cpu"), out_dir=tmp_path, progress=False)
    assert summary["final_loss"] < 0.75 * summary["first_loss"]


def test_tbptt_with_a_stateless_model_is_a_clear_error() -> None:
    class Stateless(torch.nn.Module):
        def forward(self, ids: torch.Tensor, **_: object) -> torch.Tensor:
            return torch.zeros(*ids.shape, 5)

    with pytest.raises(ConfigError, match=r"tbptt_length > 0 needs a model whose forward"):
        list(segment_losses(Stateless(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2))


@pytest.mark.parametrize("cls", [RefGRU, OptGRU])
def test_gru_generation_with_carried_state_equals_recomputing_the_prefix(cls: type[RefGRU]) -> None:
    torch.manual_seed(1)
    model = cls(CFG).double()
    prompt = torch.randint(0, 11, (2, 3))

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(ids)

    a = generate(model, prompt, 6, temperature=1.0, seed=5)
    b = generate(Plain(model), prompt, 6, temperature=1.0, seed=5)
    assert torch.equal(a, b)


def test_tbptt_segments_without_scored_targets_keep_the_loss_finite(tmp_path: Path) -> None:
    """Needle task: only the last positions are scored, so the first TBPTT segments have no targets; a model
    with an auxiliary loss (HAMT) must still train with finite losses (the empty segment's mean is not used)."""
    exp = load_experiment({"model": {"name": "hamt", "hidden_dim": 16, "hcm_dim": 32, "num_layers": 1,
                                     "num_slots": 2, "max_seq_len": 64, "aux_loss_weight": 0.05},
                           "task": {"name": "needle", "n_needles": 2, "seq_len": 24, "num_keys": 8,
                                    "num_values": 8, "num_filler": 8},
                           "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "tbptt_length": 8,
                                     "eval_every": 4, "eval_batches": 1, "max_bad_steps": 1}})
    summary = train(exp, impl="optimized", device=torch.device("cpu"), out_dir=tmp_path, progress=False)
    assert summary["skipped_steps"] == 0
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
