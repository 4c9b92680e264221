"""Shared pytest setup: Hypothesis profiles, offline hub, gpu skipping."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `ci`: quick and deterministic enough for 2 cores; `thorough`: many more examples, run by `tox -e thorough`.
# Only the deadline is lifted (torch's first call per shape is slow); no health check is silenced wholesale.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=5, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread per process: `pytest -n auto` already runs one worker per core, and small ops slow down badly
# when several multi-threaded workers share two cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu marker); run `tox -e gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# fp32 equivalence on CUDA means IEEE fp32: PyTorch lets cuDNN (the fused GRU, convolutions) use TF32 by default,
# whose 10-bit mantissa alone gives ~1e-3 relative error. The gpu tests turn TF32 off; what TF32 changes is
# stated in README "GPU notes".
if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
