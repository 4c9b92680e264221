"""The spec cross-reference: every equation ID defined in specs/*.md is cited by a docstring in reference/
(or, for shared non-model definitions such as tasks, metrics and schedules, in training/), and every ID such a
docstring cites is defined in exactly one spec."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ID = r"[A-Z][A-Z0-9]*-\d+[a-z]?"
DEFINITION = re.compile(rf"\*\*\[({ID})\]\*\*")
CITATION = re.compile(rf"\[({ID})\]")


def spec_definitions() -> dict[str, list[str]]:
    defs: dict[str, list[str]] = {}
    for path in sorted((ROOT / "specs").glob("*.md")):
        if path.name == "README.md":  # explains the format with example IDs
            continue
        for match in DEFINITION.finditer(path.read_text(encoding="utf-8")):
            defs.setdefault(match.group(1), []).append(path.name)
    return defs


def reference_citations() -> dict[str, list[str]]:
    cites: dict[str, list[str]] = {}
    paths = sorted((ROOT / "reference").rglob("*.py")) + sorted((ROOT / "training").rglob("*.py"))
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                for match in CITATION.finditer(doc):
                    cites.setdefault(match.group(1), []).append(f"{path.relative_to(ROOT)}")
    return cites


def test_specs_define_equations() -> None:
    assert spec_definitions(), "no equation IDs found in specs/*.md (format: **[PREFIX-N]**)"


def test_every_id_is_defined_once() -> None:
    dupes = {k: v for k, v in spec_definitions().items() if len(v) > 1}
    assert not dupes, f"equation IDs defined more than once: {dupes}"


def test_every_spec_id_is_cited_in_reference() -> None:
    missing = sorted(set(spec_definitions()) - set(reference_citations()))
    assert not missing, f"IDs defined in specs/ but cited by no docstring in reference/ or training/: {missing}"


def test_every_cited_id_is_defined() -> None:
    cites = reference_citations()
    unknown = {k: cites[k] for k in sorted(set(cites) - set(spec_definitions()))}
    assert not unknown, f"docstrings cite IDs that no spec defines: {unknown}"
