"""Trainer options wired from the config: the episodic section, StableMax loss, ⊥Grad."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import training.optim
from reference.validation import ConfigError
from training import load_experiment
from training.episodic import EpisodicConfig
from training.loop import loss_and_accuracy, train
from training.optim import task_loss

CPU = torch.device("cpu")
MODULAR: dict[str, Any] = {
    "model": {"name": "atlas_omega", "dim": 16, "num_layers": 1, "num_heads": 2, "window": 4, "key_dim": 8,
              "value_dim": 8, "chunk_size": 2},
    "task": {"name": "modular", "p": 7},
    "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "eval_batches": 1},
}
NEEDLE: dict[str, Any] = {
    "model": {"name": "gru", "embed_dim": 8, "hidden_dim": 16},
    "task": {"name": "needle", "n_needles": 2, "seq_len": 12, "num_keys": 4, "num_values": 4, "num_filler": 4},
    "train": {"steps": 40, "batch_size": 16, "lr": 1e-2, "eval_every": 40, "eval_batches": 1},
}


def test_the_episodic_section_is_typed_validated_and_dispatches(tmp_path: Path) -> None:
    exp = load_experiment({**MODULAR, "episodic": {"storage_batches": 2, "retrieval_penalty": 3.0}})
    assert exp.episodic == EpisodicConfig(storage_batches=2, retrieval_penalty=3.0)
    assert exp.as_dict()["episodic"]["storage_batches"] == 2
    with pytest.raises(ConfigError, match=r"episodic\.storage_batch: unknown key"):
        load_experiment({**MODULAR, "episodic": {"storage_batch": 2}})
    summary = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    assert summary["steps"] == 3
    assert "math_accuracy" in (tmp_path / "metrics.jsonl").read_text()  # the episodic trainer's metric
    compiled = load_experiment({**MODULAR, "train": {**MODULAR["train"], "compile": "default"},
                                "episodic": {"storage_batches": 2}})
    with pytest.raises(ConfigError, match=r"train\.compile: default applies to the standard trainer"):
        train(compiled, impl="optimized", device=CPU, out_dir=tmp_path / "compiled", progress=False)
    with pytest.raises(ConfigError, match=r"train\.compile"):
        load_experiment({**MODULAR, "train": {**MODULAR["train"], "compile": "fast"}})


def test_stablemax_loss_is_selectable_and_trains(tmp_path: Path) -> None:
    logits, targets = torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([[1, -100, 4], [0, 2, -100]])
    a, b = loss_and_accuracy(logits, targets, "stablemax"), task_loss(logits, targets, "stablemax")
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[0], loss_and_accuracy(logits, targets)[0])
    exp = load_experiment({**NEEDLE, "train": {**NEEDLE["train"], "loss": "stablemax"}})
    summary = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    assert summary["final_loss"] < summary["first_loss"]


def test_perp_grad_is_applied_before_every_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = training.optim.apply_perp_grad_

    def spy(params: Any, *, min_dim: int = 2) -> None:
        calls.append(min_dim)
        real(params, min_dim=min_dim)

    monkeypatch.setattr(training.optim, "apply_perp_grad_", spy)
    exp = load_experiment({**NEEDLE, "train": {**NEEDLE["train"], "steps": 4, "perp_grad": True,
                                                "perp_grad_min_dim": 2}})
    train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    assert calls == [2, 2, 2, 2]
