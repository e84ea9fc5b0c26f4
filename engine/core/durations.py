"""Durations written as ``500ms``, ``30s``, ``5m``, ``4h``, ``2d`` (or ``1h30m``),
held as milliseconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: object) -> int:
    """Return milliseconds; raise ``ValueError`` with a hint on anything else.

    Integers are taken as milliseconds. Strings are one or more number+unit parts.
    """
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}: write e.g. 30s, 5m, 2h, 1d or 500ms")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"bad duration {value!r}: must not be negative")
        return value
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, total = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            return int(total)
    raise ValueError(
        f"bad duration {value!r}: write a number with a unit ms, s, m, h or d (e.g. 30s, 5m, 2h)"
    )


def format_duration(ms: int | None) -> str:
    """Human form for timelines: ``850ms``, ``1.2s``, ``3m05s``, ``2h10m``."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    if ms < 3_600_000:
        minutes, seconds = divmod(ms // 1000, 60)
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(ms // 60_000, 60)
    return f"{hours}h{minutes:02d}m"
