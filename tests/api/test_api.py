"""The API over a real uvicorn on loopback, on both backends: every endpoint's happy path,
bad input, another tenant's runs, a missing role and missing credentials."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.api.backends import KafkaApiBackend
from engine.kafka.topics import Topics
from tests.api.conftest import PAYOUT
from tests.api.server import Api, serve_api

ENDPOINTS = [
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/r1"),
    ("GET", "/v1/runs/r1/timeline"),
    ("POST", "/v1/runs/r1/cancel"),
    ("POST", "/v1/runs/r1/signals/docs"),
    ("GET", "/v1/runs/r1/stream"),
    ("GET", "/v1/approvals"),
    ("POST", "/v1/approvals/r1/sign_off"),
    ("POST", "/v1/workflows"),
    ("GET", "/v1/workflows"),
    ("GET", "/v1/workflows/x"),
    ("GET", "/v1/dead-letters"),
    ("GET", "/v1/hooks"),
    ("GET", "/v1/no-such-thing"),
    ("DELETE", "/v1/runs"),
    ("GET", "/v1"),
]


def _deploy(api: Api) -> None:
    admin = api.client(api.key("root", ["*"], ["admin"]))
    answer = admin.post("/v1/workflows", json={"spec": PAYOUT})
    assert answer.status_code in (200, 201), answer.text


def _eventually(fetch: Any, until: Any, timeout_s: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    answer = fetch()
    while not until(answer) and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = fetch()
    return answer


def _waiting_at(api: Api, client: httpx.Client, run_id: str, step: str) -> dict[str, Any]:
    answer = _eventually(
        lambda: client.get(f"/v1/runs/{run_id}"),
        lambda a: a.status_code == 200 and (a.json().get("current") or {}).get("step") == step,
    )
    body: dict[str, Any] = answer.json()
    assert (body.get("current") or {}).get("step") == step, body
    return body


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_a_request_without_valid_credentials(
    embedded_api: Api, method: str, path: str
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer tnh_0000_nope"},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Basic eDp5"},
    ):
        answer = httpx.request(method, embedded_api.url + path, headers=headers, json={})
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["status"] == 401
    assert embedded_api.ctx.unauthorized >= 4


def test_a_run_starts_once_per_key_and_a_different_input_conflicts(api: Api) -> None:
    _deploy(api)
    alice = api.client(api.key("alice", ["acme"], ["trigger", "read"]))
    body = {"workflow": "api-payout", "input": {"amount": 10}}
    first = alice.post("/v1/runs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    run = first.json()
    assert run["tenant"] == "acme" and run["requested_by"] == "alice"
    assert first.headers["location"] == f"/v1/runs/{run['run_id']}"
    again = alice.post("/v1/runs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200, again.text
    assert again.json()["run_id"] == run["run_id"]
    other = alice.post(
        "/v1/runs", json={**body, "input": {"amount": 11}}, headers={"Idempotency-Key": "k1"}
    )
    assert other.status_code == 409, other.text
    problem = other.json()
    assert problem["field"] == "header.Idempotency-Key" and "input.amount" in problem["detail"]
    got = _waiting_at(api, alice, run["run_id"], "docs")
    assert got["status"] == "Waiting"


def test_bad_input_is_a_problem_naming_the_field(api: Api) -> None:
    _deploy(api)
    alice = api.client(api.key("alice", ["acme"], ["trigger"]))
    cases = [
        ({"workflow": "api-payout", "input": {"amount": "ten"}}, "body.input.amount"),
        ({"workflow": "nope"}, "body.workflow"),
        ({"workflow": "api-payout", "input": {"amount": 1}, "colour": "red"}, "body.colour"),
        ({"input": {}}, "body.workflow"),
    ]
    for body, field in cases:
        answer = alice.post("/v1/runs", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["field"] == field, answer.json()
    not_json = alice.post("/v1/runs", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["field"].startswith("body")


def test_another_tenants_runs_are_not_found_and_it_may_not_start_them(api: Api) -> None:
    _deploy(api)
    alice = api.client(
        api.key("alice", ["acme"], ["trigger", "read", "operate", "approve:finance"])
    )
    mallory = api.client(
        api.key("mallory", ["evil"], ["trigger", "read", "operate", "approve:finance"])
    )
    run = alice.post(
        "/v1/runs",
        json={"workflow": "api-payout", "input": {"amount": 1}},
        headers={"Idempotency-Key": "t1"},
    ).json()
    run_id = run["run_id"]
    _waiting_at(api, alice, run_id, "docs")
    for method, path, body in [
        ("GET", f"/v1/runs/{run_id}", None),
        ("GET", f"/v1/runs/{run_id}/timeline", None),
        ("GET", f"/v1/runs/{run_id}/stream", None),
        ("POST", f"/v1/runs/{run_id}/cancel", {}),
        ("POST", f"/v1/runs/{run_id}/signals/docs", {"data": 1}),
        ("POST", f"/v1/approvals/{run_id}/sign_off", {"approve": True}),
    ]:
        answer = mallory.request(method, path, json=body)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["detail"] == f"no run {run_id}"
    assert run_id not in {r["run_id"] for r in mallory.get("/v1/runs").json()["runs"]}
    assert mallory.get("/v1/approvals").json() == {"approvals": []}
    foreign = mallory.post(
        "/v1/runs", json={"workflow": "api-payout", "tenant": "acme", "input": {"amount": 1}}
    )
    assert foreign.status_code == 403 and foreign.json()["field"] == "body.tenant"
    assert alice.get(f"/v1/runs/{run_id}").json()["status"] == "Waiting"


def test_each_endpoint_needs_its_role(api: Api) -> None:
    _deploy(api)
    reader = api.client(api.key("rita", ["acme"], ["read"]))
    trigger = api.client(api.key("tom", ["acme"], ["trigger"]))
    run_id = trigger.post(
        "/v1/runs", json={"workflow": "api-payout", "input": {"amount": 1}}
    ).json()["run_id"]
    assert trigger.get(f"/v1/runs/{run_id}").status_code == 403
    assert trigger.get("/v1/runs").status_code == 403
    for path, body in [
        (f"/v1/runs/{run_id}/cancel", {}),
        (f"/v1/runs/{run_id}/signals/docs", {}),
        ("/v1/workflows", {"spec": PAYOUT}),
    ]:
        answer = reader.post(path, json=body)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["type"].endswith("/forbidden")
    assert reader.post("/v1/runs", json={"workflow": "api-payout"}).status_code == 403
    assert reader.get("/v1/dead-letters").status_code == 403
    _waiting_at(api, reader, run_id, "docs")
    denied = reader.post(f"/v1/approvals/{run_id}/docs", json={"approve": True})
    assert denied.status_code == 404  # no approval waits there


def test_list_filters_and_pages_with_a_cursor(api: Api) -> None:
    _deploy(api)
    alice = api.client(api.key("alice", ["acme"], ["trigger", "read"]))
    started = {
        alice.post(
            "/v1/runs",
            json={"workflow": "api-payout", "input": {"amount": n}},
            headers={"Idempotency-Key": f"p{n}"},
        ).json()["run_id"]
        for n in range(5)
    }
    for run_id in started:
        _waiting_at(api, alice, run_id, "docs")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "status": "Waiting", "workflow": "api-payout"}
        if cursor:
            params["cursor"] = cursor
        page = alice.get("/v1/runs", params=params)
        assert page.status_code == 200, page.text
        seen += [r["run_id"] for r in page.json()["runs"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(started) and len(seen) == 5
    assert alice.get("/v1/runs", params={"status": "Completed"}).json()["runs"] == []
    bad = alice.get("/v1/runs", params={"cursor": "!!"})
    assert bad.status_code == 422 and bad.json()["field"] == "query.cursor"
    bad = alice.get("/v1/runs", params={"status": "Sleeping"})
    assert bad.status_code == 422 and bad.json()["field"] == "query.status"


def test_four_eyes_counts_verified_subjects(api: Api) -> None:
    _deploy(api)
    carol = api.client(
        api.key("carol", ["acme"], ["trigger", "read", "operate", "approve:finance"])
    )
    dave = api.client(api.key("dave", ["acme"], ["read", "approve:finance"]))
    dave_again = api.client(api.key("dave", ["acme"], ["approve:finance"]))
    erin = api.client(api.key("erin", ["acme"], ["approve:finance"]))
    outsider = api.client(api.key("oscar", ["acme"], ["read", "approve:legal"]))
    run_id = carol.post("/v1/runs", json={"workflow": "api-payout", "input": {"amount": 5}}).json()[
        "run_id"
    ]
    _waiting_at(api, carol, run_id, "docs")
    signalled = carol.post(f"/v1/runs/{run_id}/signals/docs", json={"data": {"ok": True}})
    assert signalled.status_code == 200, signalled.text
    _waiting_at(api, carol, run_id, "sign_off")

    inbox = dave.get("/v1/approvals").json()["approvals"]
    [item] = [i for i in inbox if i["run_id"] == run_id]
    assert item["quorum"] == 2 and item["approvals"] == 0 and item["may_decide"]
    assert item["requested_by"] == "carol"
    [own] = [i for i in carol.get("/v1/approvals").json()["approvals"] if i["run_id"] == run_id]
    assert not own["may_decide"] and "requested" in own["why_not"]
    assert outsider.get("/v1/approvals").json()["approvals"] == []

    refused = carol.post(f"/v1/approvals/{run_id}/sign_off", json={"approve": True})
    assert refused.status_code == 403 and refused.json()["reason"] == "self-approval"
    assert (
        outsider.post(f"/v1/approvals/{run_id}/sign_off", json={"approve": True}).status_code == 403
    )
    first = dave.post(f"/v1/approvals/{run_id}/sign_off", json={"approve": True, "comment": "ok"})
    assert first.status_code == 200, first.text
    assert first.json()["events"] == ["ApprovalVoted"]
    twice = dave_again.post(f"/v1/approvals/{run_id}/sign_off", json={"approve": True})
    assert twice.status_code == 409 and twice.json()["reason"] == "duplicate approval"
    [item] = [i for i in erin.get("/v1/approvals").json()["approvals"] if i["run_id"] == run_id]
    assert item["approvals"] == 1 and item["approved_by"] == ["dave"]
    second = erin.post(f"/v1/approvals/{run_id}/sign_off", json={"approve": True})
    assert second.status_code == 200, second.text
    done = _eventually(
        lambda: carol.get(f"/v1/runs/{run_id}"), lambda a: a.json()["status"] == "Completed"
    )
    assert done.json()["status"] == "Completed"
    assert done.json()["results"]["sign_off"] == {"approved_by": ["dave", "erin"]}
    timeline = carol.get(f"/v1/runs/{run_id}/timeline")
    assert timeline.status_code == 200 and timeline.json()["status"] == "Completed"


def test_cancel_and_the_stream_of_a_run(api: Api) -> None:
    _deploy(api)
    ops = api.client(api.key("olga", ["acme"], ["trigger", "read", "operate"]))
    start = {"workflow": "api-payout", "input": {"amount": 1}}
    run_id = ops.post("/v1/runs", json=start, headers={"Idempotency-Key": "c1"}).json()["run_id"]
    _waiting_at(api, ops, run_id, "docs")
    with ops.stream("GET", f"/v1/runs/{run_id}/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        first = _next_event(lines)
        assert first[0] == "state" and first[1]["status"] == "Waiting"
        cancelled = ops.post(f"/v1/runs/{run_id}/cancel", json={"reason": "test"})
        assert cancelled.status_code == 200, cancelled.text
        assert "RunCancelled" in cancelled.json()["events"]
        kinds = []
        while not kinds or kinds[-1] != "end":
            kinds.append(_next_event(lines)[0])
    assert kinds[-2:] == ["state", "end"]
    again = ops.post(f"/v1/runs/{run_id}/cancel", json={})
    assert again.status_code == 409, again.text
    # An ended run is still the run of its key, with its input.
    repeat = ops.post("/v1/runs", json=start, headers={"Idempotency-Key": "c1"})
    assert repeat.status_code == 200, repeat.text
    assert repeat.json()["status"] == "Cancelled" and repeat.json()["input"] == {"amount": 1}
    other = ops.post(
        "/v1/runs", json={**start, "input": {"amount": 2}}, headers={"Idempotency-Key": "c1"}
    )
    assert other.status_code == 409, other.text


def _next_event(lines: Any) -> tuple[str, Any]:
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            return kind, json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended")


def test_workflows_deploy_list_get_and_refuse_a_bad_spec(api: Api) -> None:
    admin = api.client(api.key("root", ["*"], ["admin"]))
    created = admin.post("/v1/workflows", json={"spec": PAYOUT})
    assert created.status_code == 201, created.text
    assert created.json() == {"workflow": "api-payout", "version": 1, "created": True}
    assert admin.post("/v1/workflows", json={"spec": PAYOUT}).status_code == 200
    listed = admin.get("/v1/workflows").json()["workflows"]
    assert [(w["workflow"], w["version"]) for w in listed] == [("api-payout", 1)]
    assert admin.get("/v1/workflows/api-payout").json()["workflows"][0]["steps"] == 2
    assert admin.get("/v1/workflows/nope").status_code == 404
    bad = admin.post(
        "/v1/workflows", json={"spec": {"workflow": "w", "version": 1, "steps": [{"id": "a"}]}}
    )
    assert bad.status_code == 422 and bad.json()["field"].startswith("body.spec.steps")
    assert admin.get("/v1/dead-letters").json() == {"dead_letters": []}


def test_an_oversize_body_is_refused_with_413(embedded_api: Api) -> None:
    alice = embedded_api.client(embedded_api.key("alice", ["acme"], ["trigger"]))
    big = {"workflow": "x", "input": {"blob": "x" * (2 << 20)}}
    answer = alice.post("/v1/runs", json=big)
    assert answer.status_code == 413 and answer.json()["field"] == "body"

    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    streamed = alice.post(
        "/v1/runs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


def test_the_openapi_document_is_3_1_and_public(embedded_api: Api) -> None:
    doc = httpx.get(embedded_api.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/runs" in doc["paths"] and "/v1/approvals/{run_id}/{step}" in doc["paths"]
    decide = doc["paths"]["/v1/approvals/{run_id}/{step}"]["post"]
    body = decide["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert set(schema["properties"]) == {"approve", "comment"}  # no approver field


def test_a_backend_that_is_down_is_a_503_and_credentials_are_still_checked(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    backend = KafkaApiBackend(dead, Topics(prefix="nowhere", partitions=1))
    with serve_api(backend, tmp_path / "keys.db", ready=False) as api:
        key = api.key("alice", ["acme"], ["trigger", "read"])
        alice = api.client(key)
        for method, path in [
            ("POST", "/v1/runs"),
            ("GET", "/v1/runs"),
            ("GET", "/v1/runs/r1"),
            ("GET", "/v1/workflows"),
        ]:
            answer = alice.request(method, path, json={"workflow": "w"})
            assert answer.status_code == 503, (path, answer.text)
            assert answer.headers["retry-after"] and dead in answer.json()["detail"]
            assert httpx.request(method, api.url + path, json={}).status_code == 401
        health = httpx.get(api.url + "/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "backend unavailable"}
