"""Property-based fuzzing of the API from its own OpenAPI document: whatever schemathesis
sends, with or without valid credentials, the API never answers with a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from engine.api import ApiContext, create_app
from engine.api.backends import EmbeddedApiBackend
from tests.api.conftest import PAYOUT
from tests.api.server import Api, serve_api

schema = schemathesis.openapi.from_dict(
    create_app(ApiContext(EmbeddedApiBackend(":memory:"))).openapi()
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, str]]]:
    where: Path = tmp_path_factory.mktemp("fuzz")
    with serve_api(EmbeddedApiBackend(where / "store.db"), where / "keys.db") as api:
        key = api.key("fuzzer", ["*", "default"], ["admin", "approve:finance"])
        client = api.client(key)
        assert client.post("/v1/workflows", json={"spec": PAYOUT}).status_code == 201
        assert (
            client.post(
                "/v1/runs",
                json={"workflow": "api-payout", "tenant": "default", "input": {"amount": 1}},
            ).status_code
            == 201
        )
        yield api, {"Authorization": f"Bearer {key}"}


@schema.exclude(path_regex=r".*/stream$").parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_request_makes_the_api_fail(
    case: schemathesis.Case, fuzzed: tuple[Api, dict[str, str]]
) -> None:
    api, auth = fuzzed
    for headers in (auth, {}):
        response = case.call(base_url=api.url, headers=headers, timeout=30)
        assert response.status_code < 500, (
            case.method,
            case.formatted_path,
            response.status_code,
            response.text[:500],
        )
