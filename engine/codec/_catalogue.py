"""The schema catalogue: ``catalogue.json`` gives every schema file a stable integer id.

The id is what a record carries in its header. An id is never reused: ``next_id`` only
grows, and a new schema (a new record type or a new version) gets the next one. A
published schema file never changes; a record that changes gets a new version file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.codec._errors import SchemaError

CATALOGUE = "catalogue.json"
MAX_ID = 2**31 - 1

_FILE = re.compile(
    r"(?:[a-z_]+/)*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)"
    r"\.avsc"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One schema: its id, its file relative to the schemas folder, and the record name
    and version the file name states."""

    id: int
    file: str

    @property
    def name(self) -> str:
        return self._parts()[0]

    @property
    def version(self) -> int:
        return self._parts()[1]

    def _parts(self) -> tuple[str, int]:
        match = _FILE.fullmatch(self.file)
        assert match is not None  # checked by read_catalogue
        return match["name"], int(match["version"])


@dataclass(frozen=True, slots=True)
class Catalogue:
    entries: tuple[Entry, ...]
    next_id: int

    def with_entry(self, file: str) -> tuple[Catalogue, Entry]:
        entry = Entry(self.next_id, file)
        return Catalogue((*self.entries, entry), self.next_id + 1), entry


def read_catalogue(folder: Path) -> Catalogue:
    """Read and check ``folder/catalogue.json``."""
    path = folder / CATALOGUE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(
            f"no schema catalogue at {path}: point TERRANOHA_SCHEMAS at the "
            "schemas folder, or run `python -m engine.codec.generate`"
        ) from None
    except ValueError as exc:
        raise SchemaError(f"{path} is not valid JSON: {exc}") from None
    try:
        next_id = raw["next_id"]
        entries = tuple(Entry(item["id"], item["file"]) for item in raw["schemas"])
    except (KeyError, TypeError) as exc:
        raise SchemaError(
            f"{path} needs next_id and a schemas list of {{id, file}} objects ({exc!r})"
        ) from None
    _check(path, entries, next_id)
    return Catalogue(entries, next_id)


def write_catalogue(folder: Path, catalogue: Catalogue) -> None:
    body = {
        "doc": "Schema ids: every schema file's id is stable and never reused; a new "
        "schema takes next_id. Records carry the id after the magic byte.",
        "next_id": catalogue.next_id,
        "schemas": [
            {"id": e.id, "file": e.file} for e in sorted(catalogue.entries, key=lambda e: e.id)
        ],
    }
    (folder / CATALOGUE).write_text(_dump(body) + "\n", encoding="utf-8")


def read_schema(folder: Path, entry: Entry) -> dict[str, Any]:
    path = folder / entry.file
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"schema id {entry.id}: {path} is missing") from None
    except ValueError as exc:
        raise SchemaError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict) or schema.get("name") != entry.name:
        raise SchemaError(f"{path} must hold a record schema named {entry.name}")
    return schema


def write_schema(folder: Path, file: str, schema: dict[str, Any]) -> None:
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dump(schema) + "\n", encoding="utf-8")


def _check(path: Path, entries: tuple[Entry, ...], next_id: object) -> None:
    if not isinstance(next_id, int) or isinstance(next_id, bool) or not 0 < next_id <= MAX_ID:
        raise SchemaError(f"{path}: next_id must be a positive integer, not {next_id!r}")
    ids: set[int] = set()
    files: set[str] = set()
    for entry in entries:
        if not isinstance(entry.id, int) or isinstance(entry.id, bool) or entry.id <= 0:
            raise SchemaError(f"{path}: schema id {entry.id!r} is not a positive integer")
        if entry.id >= next_id:
            raise SchemaError(f"{path}: schema id {entry.id} is not below next_id {next_id}")
        if entry.id in ids:
            raise SchemaError(f"{path}: schema id {entry.id} is used twice")
        if not isinstance(entry.file, str) or not _FILE.fullmatch(entry.file):
            raise SchemaError(f"{path}: {entry.file!r} is not a <Name>.v<N>.avsc path")
        if entry.file in files:
            raise SchemaError(f"{path}: {entry.file} is listed twice")
        ids.add(entry.id)
        files.add(entry.file)


def _dump(value: Any, indent: int = 0, width: int = 100) -> str:
    """JSON with each value on one line when it fits ``width``, else one item per line."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(flat) + indent <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k)}: {_dump(v, indent + 2, width).lstrip()}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _dump(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
