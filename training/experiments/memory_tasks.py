"""Memory tasks: `AssociativeRecallExperiment(model).evaluate(num_trials)` and
`ContinualLearningExperiment(model, num_tasks).run_continual_learning()` (seed "Experiments" 3 and 4).

Associative recall is the needle task with seq_len = 2·n_needles + 2 (keys and values in context, a query at the
end; specs/tasks.md). Continual learning trains the model on `num_tasks` recall tasks in sequence, each with its
own answer code (the recalled value shifted by k), and measures every task after every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.tasks.needle import IGNORE_INDEX, NeedleConfig, NeedleTask

__all__ = ["AssociativeRecallExperiment", "ContinualLearningExperiment", "ContinualLearningResult", "RecallResult"]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, dict):
        out = out["logits"]
    assert isinstance(out, Tensor)
    return out


@dataclass
class RecallResult:
    accuracy: float  # fraction of queries answered with the right value
    num_trials: int
    n_pairs: int
    mean_iterations: float
    converged_fraction: float

    def report(self) -> str:
        return (f"Associative recall: {100 * self.accuracy:.1f}% of {self.num_trials} queries over {self.n_pairs} "
                f"pairs; equilibrium {self.mean_iterations:.2f} iterations on average, "
                f"{100 * self.converged_fraction:.1f}% converged")


class AssociativeRecallExperiment:
    """Recall accuracy on fresh (test-split) key–value sequences. `task` is a NeedleConfig (default: 4 pairs)."""

    def __init__(self, model: nn.Module, task: NeedleConfig | None = None, *, batch_size: int = 64,
                 seed: int = 0) -> None:
        self.model, self.batch_size, self.seed = model, batch_size, seed
        if task is None:
            vocab: int = cast(Any, model).config.vocab_size
            task = NeedleConfig(n_needles=4, seq_len=10, num_keys=16, num_values=16, num_filler=4)
            if NeedleTask(task).vocab_size > vocab:
                raise ValueError(f"AssociativeRecallExperiment: the default task needs vocab_size >= "
                                 f"{NeedleTask(task).vocab_size}, the model has {vocab}; pass task=")
        self.task_config = task
        self.task = NeedleTask(task)

    @torch.no_grad()
    def evaluate(self, num_trials: int = 100) -> RecallResult:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct = total = 0
        iters, conv = [], []
        index = 0
        while total < num_trials:
            bs = min(self.batch_size, num_trials - total)
            x, y = self.task.batch("test", index, bs, self.seed)
            logits, diag = model(x.to(device), return_diagnostics=True)
            pred = logits[:, -1].argmax(-1).cpu()
            correct += int((pred == y[:, -1]).sum())
            total += bs
            iters.append(float(diag["solver_info"]["iterations"].float().mean()))
            conv.append(float(diag["solver_info"]["converged"].float().mean()))
            index += 1
        model.train(was_training)
        return RecallResult(correct / total, total, self.task_config.n_needles, sum(iters) / len(iters),
                            sum(conv) / len(conv))


@dataclass
class ContinualLearningResult:
    accuracy_matrix: list[list[float]]  # [after stage i][task j]
    average_forgetting: float  # mean over tasks j < T−1 of max_i acc[i][j] − acc[T−1][j]
    final_average_accuracy: float

    def report(self) -> str:
        rows = ["after task " + str(i) + ": " + " ".join(f"{a:.2f}" for a in row)
                for i, row in enumerate(self.accuracy_matrix)]
        return "\n".join(["Continual learning (accuracy per task)", *rows,
                          f"average forgetting {self.average_forgetting:.3f}, "
                          f"final average accuracy {self.final_average_accuracy:.3f}"])


class ContinualLearningExperiment:
    """Train on `num_tasks` recall tasks in sequence (task k answers the recalled value shifted by k), then report
    the accuracy matrix and the average forgetting (Chaudhry et al. 2018)."""

    def __init__(self, model: nn.Module, num_tasks: int = 5, *, task: NeedleConfig | None = None,
                 steps_per_task: int = 100, batch_size: int = 32, lr: float = 3e-3, eval_trials: int = 128,
                 seed: int = 0) -> None:
        if num_tasks < 1:
            raise ValueError(f"ContinualLearningExperiment: num_tasks must be >= 1, got {num_tasks}")
        self.model, self.num_tasks, self.steps_per_task = model, num_tasks, steps_per_task
        self.batch_size, self.lr, self.eval_trials, self.seed = batch_size, lr, eval_trials, seed
        self.base = task or NeedleConfig(n_needles=2, seq_len=6, num_keys=4, num_values=8, num_filler=2)
        self.task = NeedleTask(self.base)
        vocab: int = cast(Any, model).config.vocab_size
        if self.task.vocab_size > vocab:
            raise ValueError(f"ContinualLearningExperiment: the tasks need vocab_size >= {self.task.vocab_size}, "
                             f"the model has {vocab}")

    def batch(self, k: int, split: str, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Task k's batch: recall the queried key's value shifted by k (mod num_values), so tasks conflict."""
        x, y = self.task.batch(split, index, batch_size, self.seed + 1000 * k)
        off, V = self.task.value_offset, self.base.num_values
        last = y[:, -1]
        y = y.clone()
        y[:, -1] = off + (last - off + k) % V
        return x, y

    @torch.no_grad()
    def accuracy(self, k: int) -> float:
        self.model.eval()
        device = next(self.model.parameters()).device
        x, y = self.batch(k, "test", 0, self.eval_trials)
        pred = _logits(self.model, x.to(device))[:, -1].argmax(-1).cpu()
        return float((pred == y[:, -1]).float().mean())

    def run_continual_learning(self) -> ContinualLearningResult:
        model = self.model
        device = next(model.parameters()).device
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr)
        matrix: list[list[float]] = []
        for k in range(self.num_tasks):
            model.train()
            for step in range(self.steps_per_task):
                x, y = self.batch(k, "train", step, self.batch_size)
                logits = _logits(model, x.to(device))
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                       ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            matrix.append([self.accuracy(j) for j in range(self.num_tasks)])
        T = self.num_tasks
        drops = [max(matrix[i][j] for i in range(j, T)) - matrix[T - 1][j] for j in range(T - 1)]
        forgetting = sum(drops) / len(drops) if drops else 0.0
        return ContinualLearningResult(matrix, forgetting, sum(matrix[T - 1]) / T)


def summary(result: Any) -> str:
    return str(result.report())
