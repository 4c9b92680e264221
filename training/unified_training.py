"""The seed's training API for the Unified Mamba–Hopfield–DEQ model (specs/unified.md [UNI-7], [UNI-8]).

`UnifiedTrainingObjective` is the loss; `UnifiedModelTrainer` the seed's epoch trainer (curriculum on max_iter,
gradient clipping, bf16/fp16 mixed precision, gradient checkpointing of the Mamba stack, a separate learning rate
for the memory patterns). The shared step trainer (`scripts/train.py`) reaches the same objective through the
model config's `objective_in_forward`; both call `model.objective_terms`, the one copy of the math.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.validation import ConfigError
from training.tasks.needle import IGNORE_INDEX

__all__ = ["EpochStats", "UnifiedModelTrainer", "UnifiedTrainingObjective", "memory_param_groups"]

log = logging.getLogger(__name__)


class UnifiedTrainingObjective:
    """[UNI-7] L = w_task CE + w_E mean E_hop(z*) + w_C mean ‖T(z*) − z*‖² + w_S stability (seed weights)."""

    def __init__(self, task_weight: float = 1.0, energy_weight: float = 0.1, convergence_weight: float = 0.05,
                 stability_weight: float = 0.0, contraction_target: float = 0.8) -> None:
        for name, value in (("task_weight", task_weight), ("energy_weight", energy_weight),
                            ("convergence_weight", convergence_weight), ("stability_weight", stability_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"UnifiedTrainingObjective: {name} must be a finite number >= 0, got {value!r}")
        if not contraction_target > 0:
            raise ConfigError(f"UnifiedTrainingObjective: contraction_target must be > 0, got {contraction_target!r}")
        self.task_weight, self.energy_weight = task_weight, energy_weight
        self.convergence_weight, self.stability_weight = convergence_weight, stability_weight
        self.contraction_target = contraction_target

    def __call__(self, model: nn.Module, input_ids: Tensor, targets: Tensor,
                 z_init: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        """(loss, metrics (0-dim tensors), diagnostics) for one batch; targets (B, L) with -100 = ignored."""
        logits, diagnostics = model(input_ids, z_init=z_init, return_diagnostics=True)
        V = logits.shape[-1]
        task = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        aux, metrics = cast(Any, model).objective_terms(diagnostics, energy_weight=self.energy_weight,
                                             convergence_weight=self.convergence_weight,
                                             stability_weight=self.stability_weight,
                                             contraction_target=self.contraction_target)
        mask = targets != IGNORE_INDEX
        accuracy = ((logits.argmax(-1) == targets) & mask).sum().float() / mask.sum().clamp_min(1).float()
        metrics = {**metrics, "task_loss": task.detach(), "accuracy": accuracy.detach()}
        return self.task_weight * task + aux, metrics, diagnostics


def memory_param_groups(model: nn.Module, lr: float, memory_lr: float) -> list[dict[str, Any]]:
    """The seed's two optimizer groups: every parameter but the memory patterns at `lr`, the patterns at
    `memory_lr`."""
    patterns = cast(Any, model).memory_patterns
    rest = [p for n, p in model.named_parameters() if "memory" not in n]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr}]
    if isinstance(patterns, nn.Parameter):
        groups.append({"params": [patterns], "lr": memory_lr})
    return groups


@dataclass
class EpochStats:
    epoch: int
    max_iter: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)


class UnifiedModelTrainer:
    """The seed's trainer: `UnifiedModelTrainer(model, optimizer, train_loader, val_loader, objective).train(n)`.

    Loaders yield (input_ids, targets) pairs. Options: `curriculum` (max_iter from `curriculum_start` at epoch 0
    up to the model's `max_iterations` over `curriculum_epochs`), `grad_clip` (1.0), `mixed_precision`
    ("none" | "bf16" | "fp16"; fp16 uses a GradScaler), `gradient_checkpointing` (the Mamba stack).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable[Any],
                 val_loader: Iterable[Any] | None = None, objective: UnifiedTrainingObjective | None = None, *,
                 grad_clip: float = 1.0, curriculum_start: int = 5, curriculum_epochs: int = 3,
                 mixed_precision: str = "none", gradient_checkpointing: bool = False,
                 device: torch.device | str | None = None) -> None:
        if mixed_precision not in ("none", "bf16", "fp16"):
            raise ConfigError(f"UnifiedModelTrainer: mixed_precision must be 'none', 'bf16' or 'fp16', "
                              f"got {mixed_precision!r}")
        self.model, self.optimizer = model, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.objective = objective or UnifiedTrainingObjective()
        self.grad_clip, self.mixed_precision = grad_clip, mixed_precision
        self.curriculum_start, self.curriculum_epochs = curriculum_start, curriculum_epochs
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_iterations: int = cast(Any, model).config.max_iterations
        if gradient_checkpointing:
            model.dynamics.mamba.gradient_checkpointing_enable()  # type: ignore[union-attr, operator]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mixed_precision == "fp16")
        self.history: list[EpochStats] = []

    def max_iter_at(self, epoch: int) -> int:
        """[UNI-8] The curriculum per epoch."""
        from reference.unified import curriculum_max_iter

        start = min(self.curriculum_start, self.max_iterations)
        return curriculum_max_iter(epoch, start, self.max_iterations, self.curriculum_epochs)

    def _autocast(self) -> Any:
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.mixed_precision != "none")

    def train_epoch(self) -> tuple[float, dict[str, float]]:
        self.model.train()
        total, count, sums = 0.0, 0, dict[str, float]()
        for input_ids, targets in self.train_loader:
            input_ids, targets = input_ids.to(self.device), targets.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, metrics, _ = self.objective(self.model, input_ids, targets)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total, count = total + float(loss.detach()), count + 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return total / max(count, 1), {k: v / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        if self.val_loader is None:
            return math.nan, math.nan
        self.model.eval()
        losses, accs = [], []
        for input_ids, targets in self.val_loader:
            logits, _ = self.model(input_ids.to(self.device), return_diagnostics=True)
            targets = targets.to(self.device)
            V = logits.shape[-1]
            losses.append(float(F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX)))
            mask = targets != IGNORE_INDEX
            accs.append(float(((logits.argmax(-1) == targets) & mask).sum() / mask.sum().clamp_min(1)))
        return sum(losses) / max(len(losses), 1), sum(accs) / max(len(accs), 1)

    def train(self, num_epochs: int) -> list[EpochStats]:
        """Train `num_epochs` epochs with the max_iter curriculum; returns (and keeps) the per-epoch stats."""
        for epoch in range(num_epochs):
            self.model.solver.max_iter = self.max_iter_at(epoch)  # type: ignore[union-attr]
            train_loss, metrics = self.train_epoch()
            val_loss, val_acc = self.evaluate()
            stats = EpochStats(epoch, self.model.solver.max_iter, train_loss, val_loss, val_acc,  # type: ignore
                               metrics)
            log.info("epoch %d: max_iter %d, train %.4f, val %.4f, acc %.3f", epoch, stats.max_iter, train_loss,
                     val_loss, val_acc)
            self.history.append(stats)
        self.model.solver.max_iter = self.max_iterations  # type: ignore[union-attr]
        return self.history
