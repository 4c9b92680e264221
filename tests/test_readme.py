"""The README's code snippets run as documented (the Unified model's seed API with our import paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-snippet: {name} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match is not None, f"README.md has no python block after '<!-- readme-snippet: {name} -->'"
    return match.group(1)


def test_readme_snippet_marker_is_found() -> None:
    assert "UnifiedMambaHopfieldDEQ" in snippet("unified")
    with pytest.raises(AssertionError, match="no python block"):
        snippet("no-such-snippet")


@pytest.mark.slow
def test_unified_readme_snippet_runs_as_documented(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    exec(compile(snippet("unified"), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"Converged: ", out) and re.search(r"Iterations: ", out)
    assert re.search(r"Final energy: -?\d+\.\d{4}", out)
    assert "torch.Size([1, 16])" in out
