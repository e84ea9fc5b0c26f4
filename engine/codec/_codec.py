"""The codec: record objects to Confluent-framed Avro and back."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from engine.codec._catalogue import Entry, read_catalogue, read_schema
from engine.codec._compile import Converters, FromAvro, ToAvro
from engine.codec._errors import DecodeError, EncodeError, SchemaError
from engine.codec._registry import EMBEDDED, RecordType, core_records

HEADER = struct.Struct(">BI")
"""Confluent wire format: magic byte 0, then the schema id as a 4-byte big-endian int."""


class _Writer(NamedTuple):
    header: bytes
    schema: Any
    to_avro: ToAvro
    file: str


class _Reader(NamedTuple):
    writer: Any
    # None when the record was written with its class's own schema: fastavro then neither
    # resolves nor compares the two schemas (a deep comparison, on every call).
    reader: Any
    from_avro: FromAvro
    file: str


class Codec:
    """Encodes and decodes the records of ``records`` (by default every core record)
    with the schemas of the catalogue in ``schemas_dir``.

    Loading parses every schema once, checks that each record class still matches its
    schema, and compiles the converters; encoding and decoding then do no schema work.
    """

    def __init__(self, schemas_dir: Path, records: Iterable[RecordType] | None = None) -> None:
        self.schemas_dir = schemas_dir
        self._writers: dict[type, _Writer] = {}
        self._readers: dict[int, _Reader] = {}
        self._unreadable: dict[int, str] = {}
        self._missing: dict[type, str] = {}
        converters = Converters({base: (self.encode, self.decode) for base in EMBEDDED})
        self._load(list(core_records() if records is None else records), converters)

    def encode(self, record: object) -> bytes:
        """``record`` as magic byte, schema id and Avro body."""
        try:
            header, schema, to_avro, file = self._writers[type(record)]
        except KeyError:
            raise EncodeError(
                self._missing.get(type(record), f"{type(record).__qualname__} is not a record type")
            ) from None
        try:
            fields = to_avro(record)
            out = BytesIO()
            out.write(header)
            schemaless_writer(out, schema, fields)
        except EncodeError:
            raise
        except Exception as exc:
            raise EncodeError(
                f"{type(record).__qualname__} does not fit {file}: {type(exc).__name__}: {exc}"
            ) from exc
        return out.getvalue()

    def decode(self, data: bytes) -> object:
        """The record in ``data``; raises ``DecodeError`` for anything else."""
        sid = schema_id(data)
        reader = self._readers.get(sid)
        if reader is None:
            raise DecodeError(
                "unknown_schema",
                self._unreadable.get(
                    sid,
                    f"schema id {sid} is not in the catalogue at {self.schemas_dir}: the "
                    "record was written with a schema this engine does not know",
                ),
                sid,
            )
        body = BytesIO(data)
        body.seek(HEADER.size)
        try:
            fields = schemaless_reader(body, reader.writer, reader.reader)
        except Exception as exc:
            # A varint cut short fails as IndexError, not EOFError: having read every
            # byte is what tells truncation apart.
            if isinstance(exc, EOFError) or body.tell() >= len(data):
                raise DecodeError(
                    "truncated",
                    f"{reader.file} (schema id {sid}): the Avro "
                    f"body ends early ({len(data)} bytes in all)",
                    sid,
                ) from None
            raise DecodeError(
                "corrupt",
                f"{reader.file} (schema id {sid}): the Avro body "
                f"does not decode: {type(exc).__name__}: {exc}",
                sid,
            ) from None
        if body.tell() != len(data):
            raise DecodeError(
                "corrupt",
                f"{reader.file} (schema id {sid}): "
                f"{len(data) - body.tell()} bytes after the Avro body",
                sid,
            )
        try:
            return reader.from_avro(fields)
        except DecodeError:
            raise
        except json.JSONDecodeError as exc:
            raise DecodeError(
                "corrupt",
                f"{reader.file} (schema id {sid}): a JSON field is not valid JSON: {exc}",
                sid,
            ) from None
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise DecodeError(
                "corrupt",
                f"{reader.file} (schema id {sid}): a field does not "
                f"convert: {type(exc).__name__}: {exc}",
                sid,
            ) from None

    # -- loading ----------------------------------------------------------------------

    def _load(self, records: list[RecordType], converters: Converters) -> None:
        by_key: dict[tuple[str, int], RecordType] = {}
        current: dict[str, RecordType] = {}
        for record in records:
            key = (record.name, record.version)
            if key in by_key:
                raise SchemaError(
                    f"two record classes are {record.name} v{record.version}: "
                    f"{by_key[key].cls.__qualname__}, {record.cls.__qualname__}"
                )
            by_key[key] = record
            if record.name not in current or record.version > current[record.name].version:
                current[record.name] = record

        catalogue = read_catalogue(self.schemas_dir)
        own: dict[RecordType, tuple[dict[str, Any], Any, FromAvro]] = {}
        others: list[tuple[Entry, dict[str, Any]]] = []
        for entry in catalogue.entries:
            raw = read_schema(self.schemas_dir, entry)
            owner = by_key.get((entry.name, entry.version))
            if owner is None:
                others.append((entry, raw))
                continue
            if entry.file != owner.file:
                raise SchemaError(
                    f"{entry.file}: {owner.name} v{owner.version} belongs in {owner.file}"
                )
            _check_matches(self.schemas_dir / entry.file, raw, owner)
            parsed = _parse(self.schemas_dir / entry.file, raw)
            to_avro, from_avro = converters.pair(owner.cls)
            header = HEADER.pack(0, entry.id)
            self._writers[owner.cls] = _Writer(header, parsed, to_avro, entry.file)
            self._readers[entry.id] = _Reader(parsed, None, from_avro, entry.file)
            own[owner] = (raw, parsed, from_avro)

        for entry, raw in others:
            target = current.get(entry.name)
            problem = ""
            if target is None or target not in own:
                problem = "this engine has no record class for it"
            elif target.semantic_versions:
                problem = (
                    f"this engine has no class for {entry.name} v{entry.version}, and "
                    "an event version is never read as another"
                )
            elif entry.version > target.version:
                problem = (
                    f"newer than {entry.name} v{target.version}, the latest this engine "
                    "knows: written by a newer engine"
                )
            if problem:
                self._unreadable[entry.id] = f"schema id {entry.id} ({entry.file}): {problem}"
                continue
            assert target is not None
            reader_raw, reader, from_avro = own[target]
            _check_resolvable(entry.file, raw, target.file, reader_raw)
            writer = _parse(self.schemas_dir / entry.file, raw)
            self._readers[entry.id] = _Reader(writer, reader, from_avro, entry.file)

        for record in records:
            if record.cls not in self._writers:
                self._missing[record.cls] = (
                    f"{record.cls.__qualname__} ({record.name} v{record.version}) has no "
                    f"schema in the catalogue at {self.schemas_dir}: run "
                    f"`python -m engine.codec.generate` to add {record.file}"
                )


def schema_id(data: bytes) -> int:
    """The schema id in the header of ``data``; ``DecodeError`` if there is no header."""
    try:
        magic, sid = HEADER.unpack_from(data)
    except struct.error:
        raise DecodeError(
            "bad_magic",
            f"{len(data)} bytes are too short for a record (magic byte 0 and a 4-byte schema id)",
        ) from None
    if magic != 0:
        raise DecodeError(
            "bad_magic",
            f"the first byte is {magic}, not the magic byte 0: not a Confluent-framed Avro record",
        )
    return int(sid)


def _parse(path: Path, raw: dict[str, Any]) -> Any:
    try:
        return parse_schema(raw)
    except Exception as exc:
        raise SchemaError(f"{path} is not a valid Avro schema: {exc}") from exc


def _check_matches(path: Path, raw: dict[str, Any], record: RecordType) -> None:
    """Fail loading when a class and its published schema have drifted apart."""
    problem = record.drift(raw)
    if problem:
        raise SchemaError(
            f"{path} does not match {record.cls.__module__}.{record.cls.__qualname__}: "
            f"{problem}. A published schema never changes: give the class a new VERSION "
            "and run `python -m engine.codec.generate`."
        )


def _check_resolvable(
    writer_file: str,
    writer: dict[str, Any],
    reader_file: str,
    reader: dict[str, Any],
) -> None:
    """A field the reader has and an older writer lacks must have a default."""
    written = {f["name"] for f in writer.get("fields", [])}
    for f in reader.get("fields", []):
        names = {f["name"], *f.get("aliases", [])}
        if not names & written and "default" not in f:
            raise SchemaError(
                f"{writer_file} cannot be read as {reader_file}: field "
                f"{f['name']} is new and has no default"
            )
