"""Calendar windows in a timezone: the hour, day, week or month a budget counts in.

A budget "per day in Europe/Berlin" resets at local midnight, which is 23:00 or 22:00
UTC depending on the season, and a local day is 23 or 25 hours long when the clocks
change. ``zoneinfo`` (the IANA database) knows those rules; this module only asks it where
the local window around an instant starts and ends.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


def window_bounds(now_ms: int, per: str, timezone: str) -> tuple[int, int]:
    """The [start, end) of the ``per`` window (hour, day, week from Monday, month) that
    holds ``now_ms``, in UTC milliseconds, as the clocks of ``timezone`` read."""
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(zone)
    if per == "hour":
        # Hours are counted on the UTC timeline: a repeated local hour is two windows.
        start = local.replace(minute=0, second=0, microsecond=0)
        begin = int(start.timestamp() * 1000)
        return begin, begin + 3_600_000
    day = local.date()
    if per == "day":
        first, after = day, day + timedelta(days=1)
    elif per == "week":
        first = day - timedelta(days=day.weekday())
        after = first + timedelta(days=7)
    elif per == "month":
        first = day.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown window {per!r}: use hour, day, week or month")
    return _midnight(first.year, first.month, first.day, zone), _midnight(
        after.year, after.month, after.day, zone
    )


def _midnight(year: int, month: int, day: int, zone: ZoneInfo) -> int:
    """The first instant of a local date (a zone whose clocks skip midnight starts the
    day at the first local time that exists)."""
    wall = datetime(year, month, day, tzinfo=zone)
    instant = wall.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None):
        instant = datetime(year, month, day, 1, tzinfo=zone).astimezone(UTC)
    return int(instant.timestamp() * 1000)


def format_instant(ms: int, timezone: str) -> str:
    """``2026-12-03 00:00 Europe/Berlin``: an instant as the clocks of ``timezone`` read."""
    local = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(ZoneInfo(timezone))
    return f"{local:%Y-%m-%d %H:%M} {timezone}"
