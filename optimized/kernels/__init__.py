"""Triton kernels. Each kernel module has a torch fallback beside its call site in `optimized/<name>.py`;
dispatch is explicit and reported by `scripts/bench.py`. Under `TRITON_INTERPRET=1` the kernels run on
CPU tensors (slowly), which is how CI exercises them."""

from __future__ import annotations

import importlib.util
import os

import torch

_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looked up once: dynamo cannot trace find_spec


def triton_available() -> bool:
    """True when Triton is importable (a constant, so that compiled code traces through the dispatch)."""
    return _TRITON_AVAILABLE


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_disabled() -> set[str]:
    """Kernel names switched off by `MEMARCH_DISABLE_KERNELS` (comma-separated, e.g. "omega,titans,liquid"; "all")."""
    return {name.strip() for name in os.environ.get("MEMARCH_DISABLE_KERNELS", "").split(",") if name.strip()}


def kernel_available(x: torch.Tensor, name: str = "") -> bool:
    """Whether the default dispatch sends `x` to the Triton kernel `name`: CUDA tensors with Triton importable,
    unless `MEMARCH_DISABLE_KERNELS` names the kernel (or says "all"), which sends it to the torch path (for
    A/B timing and for ruling a kernel out when debugging).

    CPU tensors always take the torch path by default (the interpreter is far too slow for real work);
    tests call the kernels directly on small CPU tensors under `TRITON_INTERPRET=1` (see
    `triton_interpreting`), so CI runs the same kernel code the GPU runs.
    """
    off = kernels_disabled()
    return x.is_cuda and triton_available() and not ({name, "all"} & off)
