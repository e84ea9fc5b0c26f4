from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.drivers import Driver, EmbeddedDriver

BACKENDS = [pytest.param("embedded", id="embedded")]


@pytest.fixture(params=BACKENDS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    if request.param == "embedded":
        yield EmbeddedDriver(tmp_path)
