"""The state records: the fast ``replace`` used by ``evolve`` agrees with ``dataclasses``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.state import (
    Approval,
    RunState,
    RunStatus,
    StepState,
    Timer,
    Waiting,
    _compile_replace,
    replace,
)

SAMPLES: list[Any] = [
    Timer(timer_id="retry@3", kind="retry", step="a", ref="a#1", due_at=5),
    Approval(
        approval_id="x",
        reason="approval",
        approvers=("g",),
        quorum=2,
        exclude_requester=True,
        requested_at=1,
        expires_at=None,
        votes=("bob",),
    ),
    StepState(step="a", visit=2, kind="task", started_at=3, waiting=Waiting.TASK, task_id="t"),
    RunState(
        run_id="r",
        tenant="t",
        correlation_id="c",
        workflow="w",
        version=1,
        results={"a": 1},
        timers={},
        outcome=RunStatus.COMPLETED,
    ),
]
values = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.booleans())


@settings(max_examples=100, deadline=None)
@given(sample=st.sampled_from(SAMPLES), data=st.data())
def test_replace_agrees_with_dataclasses_replace(sample: Any, data: st.DataObject) -> None:
    names = [f.name for f in dataclasses.fields(sample)]
    changes = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=4))
    fast = replace(sample, **changes)
    slow = dataclasses.replace(sample, **changes)
    assert type(fast) is type(slow)
    assert all(getattr(fast, n) == getattr(slow, n) for n in names)
    assert fast == slow


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_replace_keeps_records_frozen_and_rejects_unknown_fields(sample: Any) -> None:
    copy = replace(sample)
    assert copy == sample and copy is not sample
    first = dataclasses.fields(sample)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(copy, first, "changed")
    with pytest.raises(TypeError):
        replace(sample, no_such_field=1)


def test_replace_falls_back_for_other_dataclasses() -> None:
    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: int = 0

    assert replace(Point(1, 2), y=5) == Point(1, 5)
    with pytest.raises(TypeError):
        _compile_replace(Point)
