"""schemas/ is the source of truth: every record has a schema, and no class drifts from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from engine.codec import Codec, SchemaError, schemas_dir
from engine.codec._catalogue import CATALOGUE, read_catalogue
from engine.codec._registry import RecordType, core_records
from engine.codec.generate import generate, main
from engine.core.commands import COMMAND_TYPES
from engine.core.events import EVENT_TYPES
from engine.core.outbox import Notification, TaskCommand
from engine.core.records import DeadLetter, RecordedCommand, Trigger
from engine.core.state import RunState

SCHEMAS = schemas_dir()
OTHER_RECORDS = [TaskCommand, Notification, Trigger, RecordedCommand, DeadLetter, RunState]
ALL_CLASSES = [*EVENT_TYPES.values(), *COMMAND_TYPES.values(), *OTHER_RECORDS]
RECORDS = core_records()


def catalogue_files() -> dict[str, int]:
    return {entry.file: entry.id for entry in read_catalogue(SCHEMAS).entries}


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_record_class_has_a_schema_in_the_catalogue(cls: type) -> None:
    record = next((r for r in RECORDS if r.cls is cls), None)
    assert record is not None, f"{cls.__name__} is not registered in engine/codec/_registry.py"
    assert record.file in catalogue_files(), f"{record.file} missing: run generate"
    assert (SCHEMAS / record.file).is_file()


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.file)
def test_every_dataclass_matches_its_schema(record: RecordType) -> None:
    schema = json.loads((SCHEMAS / record.file).read_text())
    assert record.drift(schema) == "", (
        f"{record.file} and {record.cls.__qualname__} differ: give the class a new VERSION "
        "and run `python -m engine.codec.generate`"
    )


def test_the_generator_finds_nothing_to_add_or_fix() -> None:
    assert generate(SCHEMAS, check=True) == ([], [])
    assert main(["--check"]) == 0


def test_every_schema_file_is_catalogued_and_belongs_to_a_record() -> None:
    on_disk = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.avsc")}
    assert on_disk == set(catalogue_files())
    current = {r.file for r in RECORDS}
    assert current <= on_disk
    # An older revision of a record that is not an event stays, so old records still read.
    latest = {(r.kind, r.name): r.version for r in RECORDS if not r.semantic_versions}
    for file in on_disk - current:
        folder, name, version = file.split("/")[0], *file.split("/")[1].split(".v")
        assert int(version.removesuffix(".avsc")) < latest.get((folder, name), 0), file


def test_schema_ids_are_unique_and_below_next_id() -> None:
    catalogue = read_catalogue(SCHEMAS)
    ids = [entry.id for entry in catalogue.entries]
    assert len(ids) == len(set(ids))
    assert all(0 < i < catalogue.next_id for i in ids)


def test_schemas_are_named_records_in_the_terranoha_namespace() -> None:
    for record in RECORDS:
        schema = json.loads((SCHEMAS / record.file).read_text())
        assert (schema["type"], schema["name"], schema["namespace"]) == (
            "record",
            record.name,
            "terranoha",
        )


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.file)
def test_any_fields_are_documented_json_strings_and_optionals_default_to_null(
    record: RecordType,
) -> None:
    schema = json.loads((SCHEMAS / record.file).read_text())
    hints = get_type_hints(record.cls)
    for field in schema["fields"]:
        if hints[field["name"]] is Any:
            assert field["type"] == "string"
            assert "JSON" in field["doc"]
        if isinstance(field["type"], list):
            assert field["type"][0] == "null" and field["default"] is None, field


def test_a_drifted_schema_fails_loading(tmp_path: Path) -> None:
    folder = _copy_schemas(tmp_path)
    path = folder / "events/TaskCompleted.v1.avsc"
    schema = json.loads(path.read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "confidence"]
    path.write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match=r"TaskCompleted\.v1\.avsc .*field confidence"):
        Codec(folder)
    assert generate(folder, check=True)[1] == [
        "events/TaskCompleted.v1.avsc: field confidence is not in the schema"
    ]
    assert main(["--schemas", str(folder), "--check"]) == 1


def test_the_generator_writes_every_schema_into_an_empty_folder(tmp_path: Path) -> None:
    added, drifted = generate(tmp_path)
    assert (len(added), drifted) == (len(RECORDS), [])
    catalogue = read_catalogue(tmp_path)
    assert sorted(e.id for e in catalogue.entries) == list(range(1, len(RECORDS) + 1))
    assert catalogue.next_id == len(RECORDS) + 1
    for file in added:
        assert (tmp_path / file).read_text() == (SCHEMAS / file).read_text()
    assert generate(tmp_path) == ([], [])


@pytest.mark.parametrize(
    "catalogue, problem",
    [
        (
            {
                "next_id": 3,
                "schemas": [{"id": 1, "file": "a/A.v1.avsc"}, {"id": 1, "file": "a/B.v1.avsc"}],
            },
            "used twice",
        ),
        ({"next_id": 2, "schemas": [{"id": 2, "file": "a/A.v1.avsc"}]}, "not below next_id"),
        ({"next_id": 2, "schemas": [{"id": 1, "file": "a/A.avsc"}]}, r"<Name>\.v<N>\.avsc"),
        ({"schemas": []}, "needs next_id"),
    ],
)
def test_a_broken_catalogue_is_refused(
    tmp_path: Path,
    catalogue: dict[str, Any],
    problem: str,
) -> None:
    (tmp_path / CATALOGUE).write_text(json.dumps(catalogue))
    with pytest.raises(SchemaError, match=problem):
        Codec(tmp_path)


def test_a_missing_catalogue_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="TERRANOHA_SCHEMAS"):
        Codec(tmp_path)


def test_the_schemas_folder_can_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERRANOHA_SCHEMAS", "/elsewhere/schemas")
    assert schemas_dir() == Path("/elsewhere/schemas")
    monkeypatch.delenv("TERRANOHA_SCHEMAS")
    assert schemas_dir() == Path(__file__).resolve().parents[2] / "schemas"


def _copy_schemas(tmp_path: Path) -> Path:
    folder = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, folder)
    return folder
