"""The command line's modules import downward only, and each command has one body."""

from __future__ import annotations

import ast
from pathlib import Path

import engine.cli
from engine.cli import _projections, build_parser

CLI = Path(engine.cli.__file__).parent


def _cli_imports(path: Path) -> set[str]:
    """The ``engine.cli`` modules ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine.cli."):
            found.add(str(node.module).removeprefix("engine.cli."))
    return found


def test_the_cli_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: _cli_imports(p) for p in CLI.glob("_*.py") if p.stem != "__main__"}

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n}))
            for n in graph.get(start, ())
        )

    cycles = sorted(name for name in graph if reaches(name, name))
    assert not cycles, f"import cycle through {', '.join(cycles)}: {graph}"


def test_every_command_function_is_defined_once() -> None:
    names: dict[str, list[str]] = {}
    for path in CLI.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_"):
                names.setdefault(node.name, []).append(path.name)
    twice = {name: files for name, files in names.items() if len(files) > 1}
    assert not twice, f"defined more than once: {twice}"


def test_project_runs_the_projections_command_and_takes_otel() -> None:
    args = build_parser().parse_args(["project", "--db", "x.db", "--otel", "console"])
    assert args.fn is _projections.cmd_project
    assert args.otel == "console"
