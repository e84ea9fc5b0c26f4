from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.drivers import Driver, EmbeddedDriver, KafkaDriver
from tests.infra import kafka_bootstrap, postgres_dsn

BACKENDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("kafka", id="kafka", marks=[pytest.mark.kafka, pytest.mark.postgres]),
]


@pytest.fixture(params=BACKENDS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    if request.param == "embedded":
        yield EmbeddedDriver(tmp_path)
    else:
        yield KafkaDriver(kafka_bootstrap(), postgres_dsn())
