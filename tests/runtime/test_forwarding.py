"""The shared processor with a partition's view of ownership: triggers for runs that
live elsewhere are forwarded, not decided; the triggers source takes triggers only."""

from __future__ import annotations

from engine.codec import decode, encode
from engine.core.commands import StartRun
from engine.core.policies import run_id_for
from engine.core.records import Trigger
from engine.core.spec import load_spec
from engine.runtime.processor import (
    ORIGIN_INLINE_BYTES,
    Input,
    Processor,
    StateCache,
    dead_letter_of,
    forwarded_origin,
    origin_headers,
)
from engine.runtime.specs import SpecRegistry

SPEC = load_spec(
    {
        "workflow": "hold",
        "version": 1,
        "steps": [{"id": "wait", "wait_event": {"name": "go", "timeout": "1h"}}],
    }
)
NOW = 1_700_000_000_000


def _processor(owned: set[str]) -> Processor:
    specs = SpecRegistry()
    specs.add(SPEC)
    return Processor(specs, StateCache(), owns=owned.__contains__, triggers_source="triggers")


def test_a_trigger_for_a_run_owned_here_is_decided_and_one_owned_elsewhere_forwarded() -> None:
    mine, theirs = run_id_for("default", "mine"), run_id_for("default", "theirs")
    processor = _processor({mine})
    batch = processor.process(
        [
            Input("triggers", 2, 7, encode(Trigger(workflow="hold", idempotency_key="mine"))),
            Input("triggers", 2, 8, encode(Trigger(workflow="hold", idempotency_key="theirs"))),
        ],
        NOW,
    )
    assert set(batch.states) == {mine}
    assert {e.run_id for e in batch.events} == {mine}
    assert batch.recorded[0].command.command_id == "trigger:triggers/2/7"
    assert [f.run_id for f in batch.forwards] == [theirs]
    forwarded = batch.forwards[0]
    # The same StartRun the router would write: its id names where the trigger was read,
    # so the run's own partition decides it exactly as if it had landed there.
    assert forwarded.command_id == "trigger:triggers/2/8"
    assert decode(encode(forwarded)) == forwarded
    assert batch.inputs == 2 and not batch.dead_letters


def test_a_command_on_the_triggers_source_is_a_dead_letter() -> None:
    mine = run_id_for("default", "mine")
    processor = _processor({mine})
    command = encode(StartRun(command_id="c", run_id=mine, workflow="hold", version=1))
    batch = processor.process([Input("triggers", 0, 3, command)], NOW)
    assert not batch.states and not batch.events and not batch.forwards
    [dead] = batch.dead_letters
    assert (dead.source, dead.partition, dead.offset, dead.reason) == (
        "triggers",
        0,
        3,
        "unexpected_record",
    )
    assert "commands go to the run inputs topic" in dead.detail
    assert dead.payload == command
    # The same command on the run inputs is decided.
    batch = processor.process([Input("inputs", 0, 3, command)], NOW)
    assert set(batch.states) == {mine}


def test_without_ownership_every_trigger_is_decided() -> None:
    specs = SpecRegistry()
    specs.add(SPEC)
    processor = Processor(specs, StateCache())
    batch = processor.process(
        [
            Input("store", 0, i, encode(Trigger(workflow="hold", idempotency_key=f"k{i}")))
            for i in range(3)
        ],
        NOW,
    )
    assert len(batch.states) == 3 and not batch.forwards


def _forward(trigger: Trigger, workflow_owner: set[str], size_padding: int = 0) -> Input:
    """The run inputs record a forward of ``trigger`` read at triggers/1/5 becomes."""
    read = Input("triggers", 1, 5, encode(trigger))
    batch = _processor(workflow_owner).process([read], NOW)
    [start] = batch.forwards
    assert batch.forwarded_from == [read]
    value = encode(start)
    return Input("inputs", 0, 9, value, origin_headers(read, len(value) + size_padding))


def test_a_forward_that_cannot_start_is_dead_lettered_as_its_trigger() -> None:
    trigger = Trigger(workflow="nowhere", idempotency_key="k")
    forwarded = _forward(trigger, set())
    [dead] = _processor({run_id_for("default", "k")}).process([forwarded], NOW).dead_letters
    assert dead.reason == "unknown_workflow"
    assert (dead.source, dead.partition, dead.offset) == ("triggers", 1, 5)
    assert dead.payload == encode(trigger)
    assert "forwarded as a StartRun to inputs/0/9" in dead.detail


def test_a_forward_too_large_to_carry_its_trigger_names_where_the_trigger_is() -> None:
    forwarded = _forward(
        Trigger(workflow="nowhere", idempotency_key="k"), set(), size_padding=ORIGIN_INLINE_BYTES
    )
    assert "origin_payload" not in dict(forwarded.headers)
    dead = dead_letter_of(forwarded, "unknown_workflow", "not deployed", NOW)
    assert (dead.source, dead.partition, dead.offset) == ("triggers", 1, 5)
    assert dead.payload == forwarded.payload
    assert "too large to carry along" in dead.detail


def test_origin_headers_that_disagree_with_the_record_are_not_believed() -> None:
    forwarded = _forward(Trigger(workflow="nowhere", idempotency_key="k"), set())
    headers = dict(forwarded.headers)
    other_workflow = encode(Trigger(workflow="elsewhere", idempotency_key="k"))
    lies = {
        "another position": {**headers, "origin_offset": b"6"},
        "not a number": {**headers, "origin_partition": b"one"},
        "a payload that is no trigger": {**headers, "origin_payload": b"junk"},
        "another workflow's trigger": {**headers, "origin_payload": other_workflow},
        "no topic": {k: v for k, v in headers.items() if k != "origin_topic"},
    }
    for why, claimed in lies.items():
        item = Input("inputs", 0, 9, forwarded.payload, list(claimed.items()))
        assert forwarded_origin(item) is None, why
        dead = dead_letter_of(item, "unknown_workflow", "not deployed", NOW)
        assert (dead.source, dead.partition, dead.offset, dead.payload) == (
            "inputs",
            0,
            9,
            forwarded.payload,
        ), why
    # A StartRun written by hand, with the headers copied from a real forward.
    hand = encode(StartRun(command_id="c", run_id="r", workflow="nowhere", version=1))
    assert forwarded_origin(Input("inputs", 0, 9, hand, forwarded.headers)) is None
    assert forwarded_origin(forwarded) is not None


def test_a_command_for_a_run_owned_elsewhere_is_a_dead_letter_naming_its_partition() -> None:
    theirs = run_id_for("default", "theirs")
    specs = SpecRegistry()
    specs.add(SPEC)
    processor = Processor(
        specs,
        StateCache(),
        owns=lambda run_id: False,
        triggers_source="triggers",
        partition_of=lambda run_id: 4,
    )
    start = encode(StartRun(command_id="c", run_id=theirs, workflow="hold", version=1))
    batch = processor.process([Input("inputs", 1, 0, start)], NOW)
    assert not batch.states and not batch.events
    [dead] = batch.dead_letters
    assert (dead.reason, dead.run_id, dead.partition) == ("wrong_partition", theirs, 1)
    assert "reached partition 1 of inputs, but that run lives on partition 4" in dead.detail
