"""Schema versions: older revisions of a record read into its current class; each event
version is its own class and stays readable."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from engine.codec import Codec, DecodeError, SchemaError, default_codec, schema_id
from engine.codec._catalogue import read_catalogue
from engine.codec._registry import RecordType, core_records
from engine.codec.generate import generate
from engine.core import events as ev
from engine.core.records import Trigger

T0 = 1_700_000_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerV2:
    """Trigger as it would be with two new fields (both with defaults)."""

    TYPE: ClassVar[str] = "Trigger"
    VERSION: ClassVar[int] = 2
    workflow: str
    version: int = 0
    tenant: str = "default"
    idempotency_key: str = ""
    input: Any = field(default_factory=dict)
    priority: int = 0
    correlation_id: str = ""
    requested_by: str = ""
    labels: tuple[str, ...] = ()
    not_before: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerV2WithoutDefault:
    TYPE: ClassVar[str] = "Trigger"
    VERSION: ClassVar[int] = 2
    workflow: str
    version: int = 0
    tenant: str = "default"
    idempotency_key: str = ""
    input: Any = field(default_factory=dict)
    priority: int = 0
    correlation_id: str = ""
    requested_by: str = ""
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCompletedV2(ev.Event):
    """A new version of an event: a class of its own, with its own evolver."""

    TYPE: ClassVar[str] = "TaskCompleted"
    VERSION: ClassVar[int] = 2
    step: str
    attempt: int
    task_id: str
    result: Any
    model: str


def schemas_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "schemas"
    shutil.copytree(default_codec().schemas_dir, folder)
    return folder


def with_trigger_v2(tmp_path: Path, cls: type = TriggerV2) -> tuple[Path, list[RecordType]]:
    """The repo's schemas plus records/Trigger.v2.avsc, and records where Trigger is v2."""
    folder = schemas_copy(tmp_path)
    records = [*(r for r in core_records() if r.cls is not Trigger), RecordType.of(cls, "records")]
    added, drifted = generate(folder, records)
    assert (added, drifted) == (["records/Trigger.v2.avsc"], [])
    return folder, records


def test_a_new_version_gets_the_next_id_and_the_old_id_stays(tmp_path: Path) -> None:
    before = read_catalogue(default_codec().schemas_dir)
    folder, _ = with_trigger_v2(tmp_path)
    after = read_catalogue(folder)
    ids = {e.file: e.id for e in after.entries}
    assert ids["records/Trigger.v2.avsc"] == before.next_id
    assert after.next_id == before.next_id + 1
    assert {e.file: e.id for e in before.entries}.items() <= ids.items()


def test_a_record_written_with_the_older_schema_reads_into_the_current_class(
    tmp_path: Path,
) -> None:
    old = Trigger(
        workflow="refund",
        version=3,
        tenant="acme",
        idempotency_key="k",
        input={"order_id": "o-1"},
        priority=2,
        requested_by="alice",
    )
    written_by_v1 = default_codec().encode(old)

    folder, records = with_trigger_v2(tmp_path)
    upgraded = Codec(folder, records)
    decoded = upgraded.decode(written_by_v1)

    assert decoded == TriggerV2(
        workflow="refund",
        version=3,
        tenant="acme",
        idempotency_key="k",
        input={"order_id": "o-1"},
        priority=2,
        requested_by="alice",
        labels=(),
        not_before=None,
    )
    new = TriggerV2(workflow="refund", labels=("vip",), not_before=T0)
    data = upgraded.encode(new)
    assert schema_id(data) != schema_id(written_by_v1)
    assert upgraded.decode(data) == new


def test_a_newer_schema_than_the_class_is_refused_not_truncated(tmp_path: Path) -> None:
    folder, records = with_trigger_v2(tmp_path)
    written_by_v2 = Codec(folder, records).encode(TriggerV2(workflow="refund"))

    with pytest.raises(DecodeError, match="not in the catalogue") as caught:
        default_codec().decode(written_by_v2)  # the catalogue has no id for v2 at all
    assert caught.value.reason == "unknown_schema"

    with pytest.raises(DecodeError, match="written by a newer engine") as caught:
        Codec(folder).decode(written_by_v2)  # the catalogue knows v2, the class is v1
    assert caught.value.reason == "unknown_schema"


def test_a_new_field_without_a_default_cannot_read_old_records(tmp_path: Path) -> None:
    folder, records = with_trigger_v2(tmp_path, TriggerV2WithoutDefault)
    with pytest.raises(SchemaError, match="field labels is new and has no default"):
        Codec(folder, records)


def test_each_event_version_is_its_own_class_and_both_stay_readable(tmp_path: Path) -> None:
    folder = schemas_copy(tmp_path)
    records = [*core_records(), RecordType.of(TaskCompletedV2, "events")]
    assert generate(folder, records) == (["events/TaskCompleted.v2.avsc"], [])
    codec = Codec(folder, records)
    envelope: dict[str, Any] = dict(
        run_id="r",
        seq=4,
        ts=T0,
        tenant="t",
        correlation_id="",
        causation_id="c",
        step="s",
        attempt=1,
        task_id="t1",
        result={"ok": True},
    )
    v1 = ev.TaskCompleted(phase="task", cost=0.5, **envelope)
    v2 = TaskCompletedV2(model="small", **envelope)

    assert codec.decode(codec.encode(v1)) == v1
    assert codec.decode(codec.encode(v2)) == v2
    assert codec.decode(default_codec().encode(v1)) == v1
    assert schema_id(codec.encode(v1)) != schema_id(codec.encode(v2))


def test_an_event_version_without_its_class_is_unknown_not_read_as_another(
    tmp_path: Path,
) -> None:
    folder = schemas_copy(tmp_path)
    records = [*core_records(), RecordType.of(TaskCompletedV2, "events")]
    generate(folder, records)
    data = Codec(folder, records).encode(
        TaskCompletedV2(
            run_id="r",
            seq=4,
            ts=T0,
            tenant="t",
            correlation_id="",
            causation_id="c",
            step="s",
            attempt=1,
            task_id="t1",
            result=None,
            model="small",
        )
    )
    with pytest.raises(DecodeError, match="no class for TaskCompleted v2") as caught:
        Codec(folder).decode(data)
    assert caught.value.reason == "unknown_schema"


def test_a_run_state_snapshot_of_v1_reads_into_v2_with_no_signal_key() -> None:
    """Snapshots on a changelog written before keyed waits recorded their key still
    restore: RunState v1 reads into v2 with ``signal_key`` unset."""
    import io
    import json
    import struct

    from fastavro import parse_schema, schemaless_reader, schemaless_writer

    from engine.core.state import RunState, StepState, Waiting

    codec = default_codec()
    state = RunState(
        run_id="r",
        tenant="t",
        correlation_id="c",
        workflow="w",
        version=1,
        seq=3,
        current=StepState(
            step="s",
            visit=1,
            kind="wait_event",
            started_at=T0,
            waiting=Waiting.SIGNAL,
            signal="payment",
        ),
    )
    entries = {e.file: e.id for e in read_catalogue(codec.schemas_dir).entries}
    v1 = parse_schema(json.loads((codec.schemas_dir / "state/RunState.v1.avsc").read_text()))
    current = f"state/RunState.v{RunState.VERSION}.avsc"
    latest = parse_schema(json.loads((codec.schemas_dir / current).read_text()))
    body = codec.encode(state)[5:]
    as_v1 = schemaless_reader(io.BytesIO(body), latest, v1)
    out = io.BytesIO()
    out.write(struct.pack(">BI", 0, entries["state/RunState.v1.avsc"]))
    schemaless_writer(out, v1, as_v1)
    decoded = codec.decode(out.getvalue())
    assert decoded == state
    assert decoded.current is not None and decoded.current.signal_key is None
