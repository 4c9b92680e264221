"""Kernels: Triton, plus two compiled on first use (the CPU scan in C, HRR binding in CUDA C; `compile_library`).
Each kernel module has a torch fallback beside its call site in `optimized/<name>.py`; dispatch is explicit and
reported by `scripts/bench.py`. Under `TRITON_INTERPRET=1` the Triton kernels run on CPU tensors (slowly), which
is how CI exercises them."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

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


_F = TypeVar("_F", bound=Callable[..., Any])


def eager(fn: _F) -> _F:
    """`torch.compiler.disable`, typed: ctypes, files and a compiler run eagerly, outside any torch.compile graph
    (a graph break where a compiled model calls such a kernel)."""
    return cast(_F, torch.compiler.disable(fn))


def cache_dir() -> Path:
    """Where the compiled libraries live: `$MEMARCH_CACHE_DIR`, `$XDG_CACHE_HOME/memarch` or `~/.cache/memarch`."""
    if os.environ.get("MEMARCH_CACHE_DIR"):
        return Path(os.environ["MEMARCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memarch"


def compile_library(compiler: str, flags: list[str], source: Path, stem: str, timeout: float = 120,
                    depends: tuple[Path, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """`compiler *flags source -o <cache_dir>/<stem>-<hash>.so` unless that file exists (the hash covers the
    source, the files it includes (`depends`), the compiler and the flags, so a changed source or machine
    rebuilds), loaded with ctypes: the library, or None and why it could not be built or loaded. The file appears
    atomically, so concurrent builders never load half of one."""
    try:
        text = b"".join(path.read_bytes() for path in (source, *depends))
    except OSError as error:
        return None, f"cannot read {source} or what it includes: {error}"
    key = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}-{key}.so"
    if not target.exists():
        built, reason = _compile(compiler, flags, source, target, timeout)
        if not built:
            return None, reason
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as error:
        return None, f"loading {target} failed: {error}"


def _compile(compiler: str, flags: list[str], source: Path, target: Path, timeout: float) -> tuple[bool, str]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True,
                                    text=True, timeout=timeout)
            if result.returncode != 0:
                return False, f"{compiler} failed on {source.name}: {result.stderr.strip()[-500:]}"
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"building {source.name} in {target.parent} failed: {error}"
    return True, ""
