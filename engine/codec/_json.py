"""JSON text for the fields that hold arbitrary values, without per-call setup.

``json.dumps`` with options builds a new encoder on every call and ``json.loads`` adds
type checks and whitespace scans around the parser; on a record with five JSON fields
that is most of the conversion cost. These call the C encoder and scanner directly,
configured once, with the same output and the same errors as
``json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` and
``json.loads(text)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from json import scanner as _scanner
from typing import Any


def _refuse(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not a JSON value")


_SLOW_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_refuse
)
_C_ENCODER: Callable[[object, int], Any] | None = None
_make_encoder = getattr(_encoder, "c_make_encoder", None)  # None without the C accelerator
if _make_encoder is not None:
    # markers=None skips the cycle check: a cyclic value raises RecursionError instead.
    _C_ENCODER = _make_encoder(
        None, _refuse, _encoder.encode_basestring, None, ":", ",", False, False, False
    )

_SCAN: Callable[[str, int], tuple[Any, int]] = _scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed types the argument oddly


def dumps(value: object) -> str:
    """Compact JSON text of ``value``; NaN and infinities are refused (not JSON)."""
    if _C_ENCODER is None:
        return _SLOW_ENCODER.encode(value)
    return "".join(_C_ENCODER(value, 0))


def loads(text: str) -> Any:
    """The value of JSON ``text``; ``json.JSONDecodeError`` if it is not JSON."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace, or not JSON: json.loads says why
    if end != len(text):
        return json.loads(text)  # trailing whitespace, or trailing garbage
    return value
