"""GRU baseline, fast path: the fused torch.nn.GRU kernel (cuDNN on CUDA, oneDNN/ATen on CPU).

Implements `reference.gru.GRUModel.recurrence` (same parameters, by subclassing). Tolerance vs the float64
reference: float32 1e-5 relative per step, accumulated over L (tests use the model tolerances).
"""

from __future__ import annotations

import torch

from reference.gru import GRUConfig
from reference.gru import GRUModel as ReferenceGRUModel

__all__ = ["GRUConfig", "GRUModel"]


class GRUModel(ReferenceGRUModel):
    def recurrence(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, last = self.rnn(x, h0)
        return out, last
