"""Errors raised by the codec."""

from __future__ import annotations

from typing import Literal

from engine.core.errors import TerranohaError

DecodeReason = Literal["bad_magic", "unknown_schema", "truncated", "corrupt"]


class DecodeError(TerranohaError):
    """Bytes that are not a record this engine can read.

    ``reason`` is a short machine code a caller branches on (a dead-letter record keeps
    it): ``bad_magic`` (too short, or not the Confluent framing), ``unknown_schema`` (no
    schema with that id in the catalogue, or one written by a newer engine),
    ``truncated`` (the Avro body ends early) or ``corrupt`` (the body does not decode,
    has trailing bytes, or a JSON field is not valid JSON). Retrying never helps.
    """

    def __init__(self, reason: DecodeReason, message: str, schema_id: int | None = None) -> None:
        self.reason: DecodeReason = reason
        self.schema_id = schema_id
        super().__init__(message)


class EncodeError(TerranohaError):
    """A record the codec cannot encode: a class with no schema in the catalogue, or a
    value that does not fit its schema (a non-JSON value in a JSON field, NaN in JSON, an
    int beyond 64 bits, a wrong type)."""


class SchemaError(TerranohaError):
    """The schema catalogue is unusable: a missing or unparsable file, a duplicate id, or
    a record class whose fields no longer match its schema."""
