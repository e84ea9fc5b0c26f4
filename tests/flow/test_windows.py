"""Budget windows follow the local calendar of their timezone, clock changes included."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from engine.core.windows import window_bounds


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_a_berlin_day_starts_at_local_midnight_in_summer_and_in_winter() -> None:
    assert window_bounds(ms("2026-07-01T21:30"), "day", "Europe/Berlin") == (
        ms("2026-06-30T22:00"),
        ms("2026-07-01T22:00"),
    )
    assert window_bounds(ms("2026-12-01T23:30"), "day", "Europe/Berlin") == (
        ms("2026-12-01T23:00"),
        ms("2026-12-02T23:00"),
    )


def test_the_day_the_clocks_go_forward_is_23_hours_long() -> None:
    start, end = window_bounds(ms("2026-03-29T12:00"), "day", "Europe/Berlin")
    assert (end - start) == 23 * 3_600_000


def test_weeks_start_on_monday_and_months_on_the_first() -> None:
    assert window_bounds(ms("2026-12-02T12:00"), "week", "UTC") == (
        ms("2026-11-30T00:00"),
        ms("2026-12-07T00:00"),
    )
    assert window_bounds(ms("2026-12-31T23:59"), "month", "UTC") == (
        ms("2026-12-01T00:00"),
        ms("2027-01-01T00:00"),
    )


def test_an_hour_is_an_hour_of_the_instant() -> None:
    assert window_bounds(ms("2026-12-02T05:59"), "hour", "Asia/Kolkata") == (
        ms("2026-12-02T05:30"),
        ms("2026-12-02T06:30"),
    )


def test_an_unknown_window_is_refused() -> None:
    with pytest.raises(ValueError, match="hour, day, week or month"):
        window_bounds(0, "fortnight", "UTC")
