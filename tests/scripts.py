"""Loading the CLIs in `scripts/` as modules, so tests call their `main(argv)` in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a fresh module (its top level runs once per call)."""
    spec = importlib.util.spec_from_file_location(f"memarch_script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
