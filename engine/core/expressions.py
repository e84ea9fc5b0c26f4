"""Safe expressions over run data: JMESPath, compiled once and cached. No ``eval``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from engine.core.errors import ExpressionError


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> ParsedResult:
    """Compile a JMESPath expression or raise ``ExpressionError`` saying what is wrong."""
    try:
        return jmespath.compile(text)
    except JMESPathError as exc:
        raise ExpressionError(f"bad expression {text!r}: {exc}") from exc


def evaluate(text: str, data: Any) -> Any:
    """Evaluate ``text`` against ``data``; errors become ``ExpressionError``.

    jmespath lets a TypeError out of mixed-type comparisons (a tool's ``"high"`` against
    `` `0.8` ``): that is bad run data, not an engine fault, so it is reported the same way.
    """
    try:
        return compile_expression(text).search(data)
    except (JMESPathError, TypeError, ValueError) as exc:
        raise ExpressionError(f"expression {text!r} failed: {exc}") from exc


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, empty string/list/object are false."""
    return value not in (None, False, "", [], {})


def map_input(mapping: Any, data: Any) -> Any:
    """Evaluate an input mapping: strings are expressions, dicts and lists recurse,
    other values are literals."""
    if isinstance(mapping, str):
        return evaluate(mapping, data)
    if isinstance(mapping, dict):
        return {key: map_input(value, data) for key, value in mapping.items()}
    if isinstance(mapping, list):
        return [map_input(value, data) for value in mapping]
    return mapping
