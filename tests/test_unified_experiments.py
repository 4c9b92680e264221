"""The Unified model's training API and experiments: UnifiedTrainingObjective (one copy of the objective with the
model's forward), UnifiedModelTrainer (curriculum, clipping, checkpointing, memory LR group), ConvergenceValidator,
EnergyLandscapeAnalyzer PNGs, AssociativeRecallExperiment and ContinualLearningExperiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import optimized.unified as opt
from reference.validation import ConfigError
from training.experiments import (
    AssociativeRecallExperiment,
    ContinualLearningExperiment,
    ConvergenceValidator,
    EnergyLandscapeAnalyzer,
)
from training.tasks.needle import NeedleConfig, NeedleTask
from training.unified_training import UnifiedModelTrainer, UnifiedTrainingObjective, memory_param_groups

TASK = NeedleConfig(n_needles=2, seq_len=6, num_keys=4, num_values=8, num_filler=2)


def small_model(**kw: Any) -> opt.UnifiedMambaHopfieldDEQ:
    torch.manual_seed(0)
    return opt.UnifiedMambaHopfieldDEQ(vocab_size=NeedleTask(TASK).vocab_size, d_model=16, d_state=4, n_layers=1,
                                       memory_size=8, max_iterations=10, init_std=0.1, **kw)


def loader(n: int, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    task = NeedleTask(TASK)
    return [task.batch(split, i, 16, 0) for i in range(n)]


def test_objective_matches_the_objective_in_forward() -> None:
    model = small_model(objective_in_forward=True, energy_weight=0.1, convergence_weight=0.05)
    x, y = loader(1, "train")[0]
    objective = UnifiedTrainingObjective(task_weight=1.0, energy_weight=0.1, convergence_weight=0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, metrics, _ = objective(model, x, y)
    model.load_state_dict(state)  # training mode advances W̃'s power-iteration vector; replay the same forward
    out = model(x)
    ce = torch.nn.functional.cross_entropy(out["logits"].reshape(-1, out["logits"].shape[-1]), y.reshape(-1),
                                           ignore_index=-100)
    torch.testing.assert_close(loss, ce + out["aux_loss"])
    assert {"energy", "convergence", "task_loss", "accuracy"} <= set(metrics)
    with pytest.raises(ConfigError, match="energy_weight"):
        UnifiedTrainingObjective(energy_weight=-1.0)


def test_trainer_runs_the_curriculum_and_lowers_the_loss() -> None:
    model = small_model()
    optimizer = torch.optim.AdamW(memory_param_groups(model, 1e-2, 1e-3), lr=1e-2)
    assert optimizer.param_groups[1]["lr"] == 1e-3 and optimizer.param_groups[1]["params"][0] is model.memory_patterns
    trainer = UnifiedModelTrainer(model, optimizer, loader(8, "train"), loader(2, "val"),
                                  UnifiedTrainingObjective(stability_weight=0.01), curriculum_start=2,
                                  curriculum_epochs=2, gradient_checkpointing=True)
    history = trainer.train(num_epochs=3)
    assert [h.max_iter for h in history] == [2, 6, 10]
    assert history[-1].train_loss < history[0].train_loss
    assert model.dynamics.mamba.gradient_checkpointing and model.solver.max_iter == 10
    with pytest.raises(ConfigError, match="mixed_precision"):
        UnifiedModelTrainer(model, optimizer, [], mixed_precision="fp8")


def test_convergence_validator_reports_a_contractive_model() -> None:
    result = ConvergenceValidator(small_model(), seq_len=6).run_all_tests()
    assert result.converged_fraction == 1.0 and result.uniqueness_gap < 1e-2
    assert 0 < result.lipschitz_max and 0 <= result.rate < 1
    text = result.report()
    assert "contraction" in text and "uniqueness" in text and ("PASS" in text or "FAIL" in text)


def test_energy_analyzer_writes_png_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    analyzer = EnergyLandscapeAnalyzer(small_model(), tmp_path, resolution=9)
    z = torch.zeros(16)
    c = torch.randn(16, generator=torch.Generator().manual_seed(0))
    paths = [analyzer.visualize_2d_slice(z, c), analyzer.visualize_convergence_trajectories(c, steps=5),
             analyzer.visualize_basin_of_attraction(z, c)]
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    E = analyzer.trajectories(c, 4, 10)
    assert E.shape == (4, 11)


def test_recall_experiment_counts_correct_answers() -> None:
    model = small_model()
    result = AssociativeRecallExperiment(model, task=TASK).evaluate(num_trials=40)
    assert result.num_trials == 40 and 0.0 <= result.accuracy <= 1.0
    assert "Associative recall" in result.report()


def test_continual_learning_returns_matrix_and_forgetting() -> None:
    exp = ContinualLearningExperiment(small_model(), num_tasks=2, task=TASK, steps_per_task=5, eval_trials=16)
    result = exp.run_continual_learning()
    assert len(result.accuracy_matrix) == 2 and all(len(r) == 2 for r in result.accuracy_matrix)
    assert -1.0 <= result.average_forgetting <= 1.0
    x1, y1 = exp.batch(1, "test", 0, 4)
    x, y = exp.task.batch("test", 0, 4, exp.seed + 1000)
    off = exp.task.value_offset
    assert torch.equal(x1, x) and torch.equal(y1[:, -1], off + (y[:, -1] - off + 1) % TASK.num_values)
