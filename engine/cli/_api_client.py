"""The CLI as a client of the HTTP API, for what must carry a verified identity: on Kafka
a decision goes through the API, whose key names the approver."""

from __future__ import annotations

import os
from typing import Any

import httpx

from engine.cli._shared import CliError

API_ENV = "TERRANOHA_API"
KEY_ENV = "TERRANOHA_API_KEY"


def api_url(given: str | None) -> str | None:
    return given or os.environ.get(API_ENV) or None


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` with the key of ``$TERRANOHA_API_KEY``; the status and JSON answer."""
    key = os.environ.get(KEY_ENV)
    if not key:
        raise CliError(
            f"set ${KEY_ENV} to an API key (terranoha api-keys create) to talk to the API at {url}"
        )
    try:
        answer = httpx.post(
            url.rstrip("/") + path,
            json=body,
            timeout=30.0,
            headers={"Authorization": f"Bearer {key}"},
        )
    except httpx.HTTPError as exc:
        raise CliError(
            f"cannot reach the API at {url} ({exc}); start it with `terranoha api` or check --api"
        ) from None
    try:
        doc: dict[str, Any] = answer.json()
    except ValueError:
        doc = {"detail": answer.text}
    if answer.status_code == 401:
        raise CliError(f"the API at {url} refused the key in ${KEY_ENV}: {doc.get('detail')}")
    if answer.status_code >= 500:
        raise CliError(f"the API at {url} failed ({answer.status_code}): {doc.get('detail')}")
    return answer.status_code, doc
