"""The architecture's arrows point one way: gateway → runs → storage, and the simulator stands apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each top-level package must never import (HOUSE_STYLE conventions 1 and 9).
FORBIDDEN = {
    "gateway": {"storage"},
    "runs": {"gateway"},
    "storage": {"runs", "gateway"},
    "simulator": {"gateway", "runs", "storage"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """For each top-level package `package`'s modules import (anywhere, TYPE_CHECKING blocks included), where."""
    found: dict[str, set[str]] = {}
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources, f"no sources found for {package}"
    for path in sources:
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), filename=where)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
                names = [node.module]
            else:
                continue  # relative imports stay inside the package
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(f"{where}:{node.lineno}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    imports = imported_packages(package)
    wrong = {name: sorted(imports[name]) for name in FORBIDDEN[package] & imports.keys()}
    assert wrong == {}, f"{package} imports what it must not: {wrong}"


def test_the_scan_sees_imports() -> None:
    """The arrows that must exist are found, so an empty scan cannot pass the test above."""
    assert "runs" in imported_packages("gateway")
    assert "storage" in imported_packages("runs")
