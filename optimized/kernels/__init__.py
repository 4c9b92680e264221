"""Triton kernels. Each kernel module has a torch fallback beside its call site in `optimized/<name>.py`;
dispatch is explicit and reported by `scripts/bench.py`. Under `TRITON_INTERPRET=1` the kernels run on
CPU tensors (slowly), which is how CI exercises them."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """True when Triton is importable."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `x`: CUDA tensors with Triton, or CPU tensors under the interpreter."""
    if not triton_available():
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and triton_interpreting()
