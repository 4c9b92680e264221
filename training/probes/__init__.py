"""Probes: extra measurements run at every evaluation (e.g. a needle-in-a-haystack retrieval probe).

A probe is a function `(model, exp, device) -> dict[str, float]`, registered by import path in `PROBES` and
named in `train.probes`. Its results are merged into the evaluation record of metrics.jsonl.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

PROBES: dict[str, str] = {
    "niah": "training.probes.niah:niah",
}


def run_probes(names: Sequence[str], model: nn.Module, exp: Any, device: torch.device) -> dict[str, float]:
    results: dict[str, float] = {}
    for name in names:
        module, _, attr = PROBES[name].partition(":")
        fn = getattr(importlib.import_module(module), attr)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            results.update({f"{name}/{k}": float(v) for k, v in fn(model, exp, device).items()})
        model.train(was_training)
    return results
