"""Bytes that are not a record raise DecodeError with a reason, and nothing else."""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec import DecodeError, EncodeError, decode, encode, schema_id, schemas_dir
from engine.codec._catalogue import read_catalogue
from engine.codec._registry import core_records
from engine.core import commands as cmd
from engine.core import events as ev
from engine.core.errors import TerranohaError
from engine.core.records import RecordedCommand
from engine.core.state import RunState

T0 = 1_700_000_000_000
DISPATCHED = ev.TaskDispatched(
    run_id="run-1",
    seq=3,
    ts=T0,
    tenant="acme",
    correlation_id="c",
    causation_id="cmd-1",
    step="lookup",
    phase="task",
    attempt=1,
    task_id="run-1/lookup/1/1",
    queue="crm.get_order",
    idempotency_key="run-1/lookup/1",
    input={"order_id": "o-1"},
    timeout_at=T0 + 30_000,
)
DATA = encode(DISPATCHED)
CATALOGUE = {e.file: e.id for e in read_catalogue(schemas_dir()).entries}


def reason(data: bytes) -> str:
    with pytest.raises(DecodeError) as caught:
        decode(data)
    assert isinstance(caught.value, TerranohaError) and not caught.value.retriable
    return caught.value.reason


def written(record_type: type, fields: dict[str, Any]) -> bytes:
    """``fields`` framed and written with the schema of ``record_type`` by fastavro alone,
    past the codec's own checks."""
    record = next(r for r in core_records() if r.cls is record_type)
    schema = parse_schema(json.loads((schemas_dir() / record.file).read_text()))
    out = io.BytesIO()
    out.write(struct.pack(">BI", 0, CATALOGUE[record.file]))
    schemaless_writer(out, schema, fields)
    return out.getvalue()


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00\x00"])
def test_too_short_is_bad_magic(data: bytes) -> None:
    assert reason(data) == "bad_magic"
    with pytest.raises(DecodeError, match="too short"):
        schema_id(data)


@pytest.mark.parametrize("data", [b"\x01" + DATA[1:], b'{"json": true}', b"\xff" * 40])
def test_wrong_magic_byte_is_bad_magic(data: bytes) -> None:
    assert reason(data) == "bad_magic"


def test_unknown_schema_id() -> None:
    data = struct.pack(">BI", 0, 999_999) + DATA[5:]
    with pytest.raises(DecodeError, match="999999") as caught:
        decode(data)
    assert (caught.value.reason, caught.value.schema_id) == ("unknown_schema", 999_999)
    assert schema_id(data) == 999_999


@pytest.mark.parametrize("cut", range(5, len(DATA)))
def test_every_truncation_is_truncated(cut: int) -> None:
    assert reason(DATA[:cut]) == "truncated"


def test_trailing_bytes_are_corrupt() -> None:
    with pytest.raises(DecodeError, match="1 bytes after the Avro body") as caught:
        decode(DATA + b"\x00")
    assert caught.value.reason == "corrupt"


def test_a_json_field_that_is_not_json_is_corrupt() -> None:
    text = b'{"order_id":"o-1"}'
    assert text in DATA
    with pytest.raises(DecodeError, match="JSON field is not valid JSON") as caught:
        decode(DATA.replace(text, b'{"order_id":"o-1"]'))
    assert caught.value.reason == "corrupt"


def test_invalid_utf8_is_corrupt() -> None:
    bad = DATA.replace(b"crm.get_order", b"crm.get_\xff\xfeer")
    assert reason(bad) == "corrupt"


def test_a_command_field_holding_another_record_is_corrupt() -> None:
    with pytest.raises(DecodeError, match="Command field holds a TaskDispatched") as caught:
        decode(_recorded_with_payload(DATA))
    assert caught.value.reason == "corrupt"


def test_a_command_field_holding_garbage_is_a_decode_error() -> None:
    assert reason(_recorded_with_payload(b"garbage")) == "bad_magic"


def _recorded_with_payload(payload: bytes) -> bytes:
    return written(
        RecordedCommand,
        {"run_id": "r", "command": payload, "now": T0, "first_seq": 1, "last_seq": 1},
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(sid=st.sampled_from(sorted(CATALOGUE.values())), body=st.binary(max_size=200))
def test_a_known_schema_id_with_a_random_body_raises_only_decode_error(
    sid: int,
    body: bytes,
) -> None:
    with contextlib.suppress(DecodeError):
        decode(struct.pack(">BI", 0, sid) + body)


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(min_value=5, max_value=len(DATA) - 1),
    value=st.integers(min_value=0, max_value=255),
)
def test_a_damaged_byte_never_escapes_as_another_error(position: int, value: int) -> None:
    damaged = bytearray(DATA)
    damaged[position] = value
    with contextlib.suppress(DecodeError):
        decode(bytes(damaged))


# -- encoding errors


@pytest.mark.parametrize("value", [math.nan, math.inf, {"when": object()}, {1j}])
def test_a_non_json_value_in_a_json_field_is_an_encode_error(value: Any) -> None:
    completed = cmd.CompleteTask(command_id="c", run_id="r", step="s", task_id="t", result=value)
    with pytest.raises(EncodeError, match="CompleteTask"):
        encode(completed)


def test_an_int_beyond_64_bits_is_an_encode_error() -> None:
    with pytest.raises(EncodeError):
        encode(
            ev.TimerFired(
                run_id="r",
                seq=2**63,
                ts=T0,
                tenant="t",
                correlation_id="",
                causation_id="c",
                timer_id="t",
                kind="retry",
            )
        )


def test_an_object_that_is_not_a_record_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="not a record type"):
        encode(object())


def test_an_event_where_a_command_belongs_is_an_encode_error() -> None:
    recorded = RecordedCommand(
        run_id="r",
        command=DISPATCHED,
        now=T0,  # type: ignore[arg-type]
        first_seq=1,
        last_seq=1,
    )
    with pytest.raises(EncodeError, match="Command field holds a TaskDispatched"):
        encode(recorded)


def test_a_wrong_type_is_an_encode_error() -> None:
    state = RunState(run_id="r", tenant="t", correlation_id="", seq="nine")  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="RunState"):
        encode(state)
