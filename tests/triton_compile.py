"""Compile Triton kernels for a GPU on a machine without one (shared by the kernel tests).

Triton's CPU interpreter runs a kernel's Python, not Triton's compiler, so a kernel that fails to compile passes
every interpreter test. `assert_compiles` runs a script that compiles kernels (each kernel module's
`compile_for_gpu`) in a subprocess without `TRITON_INTERPRET`, which changes how Triton builds kernels.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def assert_compiles(script: str, *, timeout: float = 600) -> None:
    """Run `script` (which asserts on the compiled kernels) in a fresh interpreter; skip on a Triton whose
    `ASTSource` predates the `constexprs` argument the kernels' `compile_for_gpu` uses."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource predates the `constexprs` argument compile_for_gpu uses")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
