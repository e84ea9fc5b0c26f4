"""Running the ``terranoha`` command in-process and checking what it printed."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from engine.cli import main


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``cli("status", run_id, "--db", path)`` runs the command and returns its exit code,
    stdout and stderr."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        out = io.StringIO()
        code = main(list(argv), out=out)
        return Result(code, out.getvalue(), capsys.readouterr().err)

    return run
