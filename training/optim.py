"""Trainer options from the grokking literature: ⊥Grad as a gradient hook and StableMax cross-entropy.

Proposed config keys (the lead wires them into `TrainConfig`):

    train:
      loss: cross_entropy | stablemax   # default cross_entropy; `task_loss(logits, targets, kind)` computes it
      perp_grad: false                  # true: `apply_perp_grad_(model.parameters())` after backward, before
                                        # clipping and the optimizer step
      perp_grad_min_dim: 2              # only tensors with at least this many dims (default: matrices/embeddings)

The math is `reference.stablemax` ([TITANS-16]–[TITANS-18], Prieto et al., 2025).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.stablemax import perp_grad, stablemax_cross_entropy
from reference.validation import ConfigError
from training.tasks.needle import IGNORE_INDEX

__all__ = ["LOSSES", "PerpGrad", "apply_perp_grad_", "task_loss"]

LossKind = Literal["cross_entropy", "stablemax"]
LOSSES: tuple[str, ...] = ("cross_entropy", "stablemax")


def task_loss(logits: Tensor, targets: Tensor, kind: str = "cross_entropy") -> tuple[Tensor, Tensor]:
    """Mean loss over positions whose target is not IGNORE_INDEX, and accuracy (argmax is the same for
    softmax and StableMax, both monotone). Drop-in for `training.loop.loss_and_accuracy`."""
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V).float() if logits.dtype in (torch.float16, torch.bfloat16) \
        else logits.reshape(-1, V)
    flat_targets = targets.reshape(-1)
    if kind == "cross_entropy":
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    elif kind == "stablemax":
        loss = stablemax_cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    else:
        raise ConfigError(f"train.loss: must be one of {', '.join(LOSSES)}, got {kind!r}")
    mask = flat_targets != IGNORE_INDEX
    correct = (flat_logits.argmax(dim=-1) == flat_targets) & mask
    return loss, correct.sum().to(flat_logits.dtype) / mask.sum().clamp_min(1).to(flat_logits.dtype)


@torch.no_grad()
def apply_perp_grad_(params: Iterable[nn.Parameter], *, min_dim: int = 2) -> None:
    """Replace each gradient by its component orthogonal to the weight ([TITANS-18]), in place."""
    for p in params:
        if p.grad is not None and p.ndim >= min_dim:
            p.grad.copy_(perp_grad(p.detach(), p.grad))


class PerpGrad:
    """A thin optimizer wrapper: `step()` projects the gradients (⊥Grad) and then steps the wrapped optimizer.

    Use it where a loop only knows `optimizer.step()`; state_dict/zero_grad/param_groups pass through.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, min_dim: int = 2) -> None:
        self.optimizer = optimizer
        self.min_dim = min_dim

    @property
    def param_groups(self) -> list[dict[str, object]]:
        groups: list[dict[str, object]] = self.optimizer.param_groups
        return groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            apply_perp_grad_(group["params"], min_dim=self.min_dim)
        self.optimizer.step()

    def state_dict(self) -> dict[str, object]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state)
