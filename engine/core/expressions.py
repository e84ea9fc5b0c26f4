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


_CHAINED = frozenset(
    {
        "subexpression",
        "index_expression",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
    }
)
"""AST nodes whose first child is evaluated where the node is, the others on its result."""


def root_paths(text: str) -> list[tuple[str, ...]]:
    """The leading field names of every part of ``text`` evaluated against the document
    itself (not against an element of a projection or a filter): ``steps.a.result.x >
    input.limit`` gives ``("steps", "a", "result", "x")`` and ``("input", "limit")``.
    Deploy-time checks use them to refuse unknown roots and unknown step references."""
    found: list[tuple[str, ...]] = []
    tree: dict[str, Any] = dict(compile_expression(text).parsed)
    _visit(tree, True, found)
    return found


def _chain(node: dict[str, Any]) -> list[str]:
    kind = node["type"]
    if kind == "field":
        return [str(node["value"])]
    if kind == "subexpression":
        out: list[str] = []
        for child in node["children"]:
            if child["type"] != "field":
                out += _chain(child)
                break
            out.append(str(child["value"]))
        return out
    if kind in _CHAINED:
        return _chain(node["children"][0])
    return []


def _visit(node: dict[str, Any], at_root: bool, found: list[tuple[str, ...]]) -> None:
    kind = node["type"]
    children: list[dict[str, Any]] = node.get("children") or []
    if kind == "field":
        if at_root:
            found.append((str(node["value"]),))
    elif kind in _CHAINED:
        if at_root and (chain := _chain(node)):
            found.append(tuple(chain))
        first, *rest = children
        if first["type"] not in ("field", *_CHAINED):
            _visit(first, at_root, found)
        elif first["type"] in _CHAINED:
            _visit_inner(first, at_root, found)
        for child in rest:
            _visit(child, False, found)
    elif kind == "pipe":
        _visit(children[0], at_root, found)
        _visit(children[1], False, found)
    elif kind == "expref":
        for child in children:
            _visit(child, False, found)
    else:  # comparators, and/or/not, functions, multi-selects: children where the node is
        for child in children:
            _visit(child, at_root, found)


def _visit_inner(node: dict[str, Any], at_root: bool, found: list[tuple[str, ...]]) -> None:
    """A chained node inside a chain already recorded: only its nested contexts."""
    first, *rest = node["children"]
    if first["type"] in _CHAINED:
        _visit_inner(first, at_root, found)
    elif first["type"] != "field":
        _visit(first, at_root, found)
    for child in rest:
        _visit(child, False, found)
