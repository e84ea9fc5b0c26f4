"""``POST /v1/messages``: a message correlated by its key reaches the run of the caller's
tenant that waits for it; bad fields and other tenants are refused."""

from __future__ import annotations

from tests.api.server import Api
from tests.api.test_api import _eventually, _waiting_at

SPEC = """\
workflow: api-payment
version: 1
input: {order_id: string}
steps:
  - id: await_payment
    wait_event: {name: payment, key: input.order_id, timeout: 1h}
"""


def test_a_published_message_reaches_the_run_waiting_for_its_key(api: Api) -> None:
    admin = api.client(api.key("root", ["*"], ["admin"]))
    assert admin.post("/v1/workflows", json={"spec": SPEC}).status_code == 201
    bank = api.client(api.key("bank", ["acme"], ["trigger", "read"]))
    run_id = bank.post(
        "/v1/runs", json={"workflow": "api-payment", "input": {"order_id": "ord-7"}}
    ).json()["run_id"]
    _waiting_at(api, bank, run_id, "await_payment")
    published = bank.post(
        "/v1/messages",
        json={
            "name": "payment",
            "key": "ord-7",
            "data": {"amount": 42.5},
            "ttl": "10m",
            "message_id": "bank-tx-1",
        },
    )
    assert published.status_code == 202, published.text
    assert published.json() == {
        "message_id": "bank-tx-1",
        "name": "payment",
        "key": "ord-7",
        "tenant": "acme",
        "ttl_ms": 600_000,
    }
    done = _eventually(
        lambda: bank.get(f"/v1/runs/{run_id}"), lambda a: a.json()["status"] == "Completed"
    )
    assert done.json()["results"]["await_payment"] == {"amount": 42.5}

    assert (
        bank.post(
            "/v1/messages", json={"name": "payment", "key": "k", "tenant": "evil"}
        ).status_code
        == 403
    )
    bad = bank.post("/v1/messages", json={"name": "pay/ment", "key": "k"})
    assert bad.status_code == 422 and bad.json()["field"] == "body.name"
    bad = bank.post("/v1/messages", json={"name": "payment", "key": "k", "ttl": "soon"})
    assert bad.status_code == 422 and bad.json()["field"] == "body.ttl"
    reader = api.client(api.key("rita", ["acme"], ["read"]))
    assert reader.post("/v1/messages", json={"name": "payment", "key": "k"}).status_code == 403
