"""The layers import downward only (``shared/DESIGN.md``): the core, codec, runtime, the
two backends and the worker SDK never import ``engine.observability`` (the backends reach
it through a callable hook), and neither ``engine.observability`` nor any of those imports
``projections`` (the read models sit above them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("core", "codec", "runtime", "kafka", "embedded", "worker")


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / "engine" / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(*LOWER), ids=lambda p: str(p.relative_to(ROOT)))
def test_lower_layers_never_import_observability_or_projections(path: Path) -> None:
    bad = [
        f"line {line}: {name}"
        for line, name in _imports(path)
        if name.split(".")[0] == "projections" or name.startswith("engine.observability")
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports upward: {', '.join(bad)}"


@pytest.mark.parametrize("path", _modules("observability"), ids=lambda p: p.name)
def test_observability_never_imports_projections(path: Path) -> None:
    bad = [f"line {line}: {n}" for line, n in _imports(path) if n.split(".")[0] == "projections"]
    assert not bad, f"{path.relative_to(ROOT)} imports projections: {', '.join(bad)}"
