"""The project's own rules: arrows between packages go one way (ARCHITECTURE.md), packages use
each other's public surface only, and the README tells the truth about the config and CI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from config import reference_markdown
from config.reference import END_MARKER, START_MARKER

ROOT = Path(__file__).resolve().parents[1]

#: Which project packages each package may import (ARCHITECTURE.md, "Arrows go one way").
ALLOWED = {
    "config": set(),
    "synthesis": {"config"},
    "planning": {"config", "synthesis"},
    "simulation": {"config", "synthesis"},
    "training": {"config", "synthesis", "planning"},
    "dicom_node": {"config", "synthesis", "planning"},
    "vcemri": {"config", "synthesis", "planning", "simulation", "training", "dicom_node"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by a file, with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_arrows_go_one_way(package):
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module, line in _imports(path):
            top = module.split(".")[0]
            if top in ALLOWED and top != package:
                where = f"{path.relative_to(ROOT)}:{line}"
                if top not in ALLOWED[package]:
                    problems.append(f"{where} imports {module}: {package} may not import {top}")
                elif "." in module:
                    problems.append(f"{where} imports {module}: use {top}'s public surface")
    assert problems == []


def test_readme_quick_start_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"```(?:sh|bash)\n(.*?)```", readme, re.DOTALL)
    assert match, "README has no quick-start code block"
    test_lines = [line.split("#")[0].strip() for line in match.group(1).splitlines()
                  if "pytest" in line]
    assert len(test_lines) == 1
    assert test_lines[0] in ci


def test_readme_configuration_reference_is_generated_from_the_models():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(START_MARKER) + len(START_MARKER)
    end = readme.index(END_MARKER)
    assert readme[start:end].strip() == reference_markdown().strip(), (
        "README's configuration reference is stale: paste `vcemri config reference` into it"
    )


def test_every_package_has_a_documented_public_surface():
    for package in ALLOWED:
        init = ROOT / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package} has no docstring"
