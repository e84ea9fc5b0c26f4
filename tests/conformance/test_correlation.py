"""Messages correlated by a business key, the same on every backend: a message reaches the
waits of its name and key and only those, is buffered for its TTL, is recorded when
nobody waits for it, and is one message however often it is published."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.core.commands import DeliverSignal
from engine.core.correlation import PublishMessage, summarize
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.core.state import RunState, Waiting
from engine.worker import ToolRegistry
from tests.conformance.drivers import Driver

SPECS = [
    load_spec(
        {
            "workflow": "order",
            "version": 1,
            "input": {"order": "string"},
            "steps": [
                {
                    "id": "pay",
                    "wait_event": {"name": "payment", "key": "input.order", "timeout": "30s"},
                }
            ],
        }
    ),
    load_spec(
        {
            "workflow": "looping",
            "version": 1,
            "input": {"order": "string"},
            "steps": [
                {
                    "id": "pay",
                    "wait_event": {
                        "name": "payment",
                        "key": "input.order",
                        "timeout": "100ms",
                        "on_timeout": {"goto": "pay"},
                    },
                }
            ],
        }
    ),
    load_spec(
        {
            "workflow": "short",
            "version": 1,
            "input": {"order": "string"},
            "steps": [
                {
                    "id": "pay",
                    "wait_event": {"name": "payment", "key": "input.order", "timeout": "300ms"},
                }
            ],
        }
    ),
]


@pytest.fixture
def d(driver: Driver) -> Iterator[Driver]:
    registry = ToolRegistry()
    registry.tool("c.unused")(lambda ctx: None)  # the drivers run a worker; none is called
    driver.start(SPECS, registry)
    try:
        yield driver
    finally:
        driver.stop()


def _start(d: Driver, order: str, workflow: str = "order") -> str:
    key = uuid.uuid4().hex
    d.submit(Trigger(workflow=workflow, idempotency_key=key, input={"order": order}))
    return run_id_for("default", key)


def _waiting(d: Driver, run_id: str) -> RunState:
    return d.wait(
        run_id,
        lambda s: s.current is not None and s.current.waiting is Waiting.SIGNAL,
        what="its keyed wait",
    )


def _message(
    key: str,
    data: Any,
    ttl_ms: int = 0,
    message_id: str | None = None,
) -> PublishMessage:
    return PublishMessage(
        message_id=message_id or uuid.uuid4().hex, name="payment", key=key, data=data, ttl_ms=ttl_ms
    )


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def _status(d: Driver, message_id: str) -> tuple[str, list[str]] | None:
    for m in summarize(d.message_events()):
        if m.message_id == message_id:
            return m.status, m.runs
    return None


def test_a_message_reaches_the_waits_of_its_key_and_no_other(d: Driver) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second, other = _start(d, f"A-{tag}"), _start(d, f"A-{tag}"), _start(d, f"B-{tag}")
    for run_id in (first, second, other):
        _waiting(d, run_id)
    paid = _message(f"A-{tag}", {"amount": 12})
    d.publish(paid)
    for run_id in (first, second):
        state = d.wait_status(run_id, "Completed")
        assert state.results["pay"] == {"amount": 12}
    _eventually(
        lambda: (
            _status(d, paid.message_id) == ("delivered", [first, second])
            or _status(d, paid.message_id) == ("delivered", [second, first])
        ),
        "the message recorded as delivered to both runs",
    )
    state = d.state(other)
    assert state is not None and state.status.value == "Waiting", "another key's wait"

    # A second publish with the same id is the same message: the later wait gets nothing.
    late = _start(d, f"A-{tag}")
    _waiting(d, late)
    d.publish(_message(f"A-{tag}", {"amount": 99}, message_id=paid.message_id))
    # and a message nobody waits for is recorded, not lost
    lost = _message(f"nobody-{tag}", {"amount": 1})
    d.publish(lost)
    _eventually(
        lambda: _status(d, lost.message_id) == ("unmatched", []), "the unmatched message recorded"
    )
    state = d.state(late)
    assert state is not None and state.status.value == "Waiting", "a duplicate delivered"
    d.publish(_message(f"B-{tag}", "for other"))
    assert d.wait_status(other, "Completed").results["pay"] == "for other"


def test_a_message_published_before_the_wait_is_kept_for_its_ttl(d: Driver) -> None:
    tag = uuid.uuid4().hex[:8]
    early = _message(f"E-{tag}", "early", ttl_ms=60_000)
    d.publish(early)
    _eventually(lambda: _status(d, early.message_id) == ("buffered", []), "the message buffered")
    run_id = _start(d, f"E-{tag}")
    assert d.wait_status(run_id, "Completed").results["pay"] == "early"
    # at most once per run: a second run gets it too, as it is still buffered
    again = _start(d, f"E-{tag}")
    assert d.wait_status(again, "Completed").results["pay"] == "early"


def test_a_wait_that_timed_out_gets_no_message_and_signals_by_run_id_still_work(d: Driver) -> None:
    tag = uuid.uuid4().hex[:8]
    gone = _start(d, f"T-{tag}", workflow="short")
    state = d.wait_status(gone, "Failed")
    assert state.error is not None and state.error["code"] == "SIGNAL_TIMEOUT"
    late = _message(f"T-{tag}", "too late")
    d.publish(late)
    _eventually(
        lambda: _status(d, late.message_id) == ("unmatched", []),
        "the late message recorded as unmatched (the timeout closed the wait)",
    )

    direct = _start(d, f"S-{tag}")
    _waiting(d, direct)
    d.submit(
        DeliverSignal(command_id=uuid.uuid4().hex, run_id=direct, name="payment", data="by run id")
    )
    assert d.wait_status(direct, "Completed").results["pay"] == "by run id"


def test_a_run_that_keeps_waiting_again_gets_the_message_once(d: Driver) -> None:
    """The wait times out every 100 ms and begins again: a message can reach a wait that
    has just ended; the run refuses that delivery, and its next wait takes the message."""
    tag = uuid.uuid4().hex[:8]
    run_id = _start(d, f"L-{tag}", workflow="looping")
    d.wait(run_id, lambda s: s.visits.get("pay", 0) >= 3, what="a few waits")
    paid = _message(f"L-{tag}", "at last", ttl_ms=60_000)
    d.publish(paid)
    state = d.wait_status(run_id, "Completed")
    assert state.results["pay"] == "at last"
    assert [e.TYPE for e in d.events(run_id)].count("SignalReceived") == 1
    _eventually(
        lambda: (_status(d, paid.message_id) or ("", []))[1] == [run_id],
        "the message counted as the run's once",
    )
