"""Avro encoding of every Terranoha record, in the Confluent wire format.

A record on the wire is the magic byte 0, the 4-byte big-endian id of its schema, then
the Avro binary body. The schemas are the ``.avsc`` files in the ``schemas/`` folder and
``schemas/catalogue.json`` gives each its id; any language can read and write the
records from them. Fields holding arbitrary values (task input, results, signal data)
are Avro strings carrying JSON.

    data = encode(event)
    assert decode(data) == event

``encode`` and ``decode`` use a codec loaded on first use from the repository's
``schemas/`` folder, or from the folder named by ``TERRANOHA_SCHEMAS``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from engine.codec._codec import Codec, schema_id
from engine.codec._errors import DecodeError, EncodeError, SchemaError

__all__ = [
    "Codec",
    "DecodeError",
    "EncodeError",
    "SchemaError",
    "decode",
    "default_codec",
    "encode",
    "schema_id",
    "schemas_dir",
]


def schemas_dir() -> Path:
    """The schemas folder: ``$TERRANOHA_SCHEMAS``, else ``schemas/`` at the repo root (a
    source checkout), else the copy installed with the package (``terranoha_schemas``)."""
    override = os.environ.get("TERRANOHA_SCHEMAS")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[2] / "schemas"
    if (checkout / "catalogue.json").exists():
        return checkout
    installed = importlib.util.find_spec("terranoha_schemas")
    if installed is not None and installed.submodule_search_locations:
        return Path(next(iter(installed.submodule_search_locations)))
    return checkout


@functools.cache
def default_codec() -> Codec:
    """The codec of every core record, loaded once from ``schemas_dir()``."""
    return Codec(schemas_dir())


def encode(record: object) -> bytes:
    """``record`` (an event, command, task command, notification, trigger, recorded
    command, dead letter or run state) as a framed Avro record."""
    return default_codec().encode(record)


def decode(data: bytes) -> object:
    """The record framed in ``data``. Raises ``DecodeError`` (with a ``reason``) for bytes
    that are not one."""
    return default_codec().decode(data)
