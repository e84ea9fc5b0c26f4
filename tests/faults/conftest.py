"""Options and fixtures of the fault suite.

``--seconds`` (env ``TERRANOHA_FAULT_SECONDS``) is how long each scenario drives load and
faults; ``--seed`` (env ``TERRANOHA_SEED``) makes the fault schedule repeatable. The suite
starts its own broker and PostgreSQL cluster on other ports and stops them at the end.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Fleet
from tests.faults.infra import FaultInfra


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults")
    group.addoption(
        "--seconds",
        type=float,
        default=None,
        help="seconds of load and faults per fault scenario (default 4)",
    )
    group.addoption("--seed", type=int, default=None, help="seed of the fault schedule")
    group.addoption(
        "--seeds",
        type=str,
        default=None,
        help="run each scenario once per seed of this list (e.g. '1-20' or "
        "'3 7 11'), against one broker and PostgreSQL: the long profile",
    )


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.replace(",", " ").split():
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    seeds = metafunc.config.getoption("--seeds", default=None)
    if seeds and "rng" in metafunc.fixturenames:
        metafunc.parametrize(
            "rng", _seeds(seeds), indirect=True, ids=[f"seed{s}" for s in _seeds(seeds)]
        )


@pytest.fixture(scope="session")
def fault_seconds(request: pytest.FixtureRequest) -> float:
    value = request.config.getoption("--seconds", default=None)
    if value is None:
        value = float(os.environ.get("TERRANOHA_FAULT_SECONDS", "4"))
    return float(value)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = getattr(request, "param", None)
    if seed is None:
        seed = request.config.getoption("--seed", default=None)
    if seed is None:
        env = os.environ.get("TERRANOHA_SEED")
        seed = int(env) if env else random.randrange(1 << 30)
    print(f"\n{request.node.name}: seed {seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def fault_infra() -> Iterator[FaultInfra]:
    infra = FaultInfra()
    try:
        infra.up()
        yield infra
    finally:
        infra.down()


@pytest.fixture
def fleet(fault_infra: FaultInfra, tmp_path: Path) -> Iterator[Fleet]:
    fault_infra.resume_broker()
    if fault_infra.broker_pid() is None:
        fault_infra.start()
    fleet = Fleet(fault_infra, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()
