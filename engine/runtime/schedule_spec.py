"""Schedule documents at the edge: validation, and the cron calendar the core is given.

Cron expressions are evaluated by ``cronsim`` (the evaluator healthchecks.io runs): it
is small, typed, has no dependencies, takes an optional leading seconds field, and
follows Debian cron across daylight-saving changes, which is what operators expect:

* spring forward: a time that does not exist that day (02:30 in Europe/Berlin on the
  last Sunday of March) fires once, at the first instant after the gap (03:00);
* fall back: a time that happens twice (02:30 on the last Sunday of October) fires
  once, at its first occurrence; expressions with a wildcard or a step in the hour
  field (``*/30 * * * *``) fire in both hours, as the wall clock shows them.

(croniter, the other candidate, has a larger surface, a history of DST bugs, and
changed hands after its maintainer announced its end in 2024.) Time-zone data comes from
the standard library's ``zoneinfo`` (the system database, else the ``tzdata`` package).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cronsim import CronSim, CronSimError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from engine.core.durations import parse_duration
from engine.core.errors import TerranohaError
from engine.core.schedule_records import OverlapPolicy, ScheduleSpec

Duration = Annotated[int, BeforeValidator(parse_duration)]
SCHEDULE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MIN_INTERVAL_MS = 1000


class ScheduleSpecError(TerranohaError):
    """A schedule document was refused. ``issues`` lists (field, message) pairs."""

    def __init__(self, schedule_id: str, issues: list[tuple[str, str]]) -> None:
        self.schedule_id = schedule_id
        self.issues = issues
        lines = "\n".join(f"  {path}: {message}" for path, message in issues)
        super().__init__(f"schedule {schedule_id or '<unnamed>'} is invalid:\n{lines}")


class CronCalendar:
    """Nominal times of cron expressions in IANA time zones (``engine.core.schedules``
    takes it as its ``Calendar``)."""

    def next_cron(self, expr: str, timezone: str, after: int) -> int | None:
        start = datetime.fromtimestamp(after / 1000, tz=_zone(timezone))
        # cronsim starts from whole seconds: the first tick it yields is >= start.
        start = start.replace(microsecond=0)
        for moment in CronSim(expr, start):
            at = int(moment.timestamp() * 1000)
            if at > after:
                return at
        return None


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def parse_time(value: object) -> int:
    """Milliseconds since the epoch from an ISO 8601 time (a time without an offset is
    UTC) or an integer of milliseconds."""
    if isinstance(value, bool):
        raise ValueError("write an ISO 8601 time such as 2026-03-29T02:30:00+02:00")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO 8601 time; write e.g. 2026-03-29T02:30:00+02:00"
            ) from None
    else:
        raise ValueError("write an ISO 8601 time such as 2026-03-29T02:30:00+02:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


Instant = Annotated[int, BeforeValidator(parse_time)]


class ScheduleDocument(BaseModel):
    """A schedule as users write it (YAML or JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SCHEDULE_ID.pattern)
    workflow: str = Field(min_length=1)
    version: int = Field(default=0, ge=0)
    tenant: str = Field(default="default", min_length=1)
    input: Any = Field(default_factory=dict)
    cron: str | None = None
    interval: Duration | None = None
    start_at: Instant = 0
    timezone: str = "UTC"
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    catch_up_window: Duration = 3_600_000
    jitter: Duration = 0
    paused: bool = False


def load_schedule(data: Mapping[str, Any]) -> ScheduleSpec:
    """Validate a schedule document; raise ``ScheduleSpecError`` naming every offending
    field at once."""
    schedule_id = str(data.get("id", "")) if isinstance(data, Mapping) else ""
    try:
        doc = ScheduleDocument.model_validate(data)
    except ValidationError as exc:
        issues = [
            (".".join(str(p) for p in err["loc"]) or "$", _message(err)) for err in exc.errors()
        ]
        issues += [i for i in _cross_field_issues(data) if i[0] not in {p for p, _ in issues}]
        raise ScheduleSpecError(schedule_id, issues) from None
    issues = _cross_field_issues(doc.model_dump())
    if issues:
        raise ScheduleSpecError(doc.id, issues)
    return ScheduleSpec(
        schedule_id=doc.id,
        workflow=doc.workflow,
        version=doc.version,
        tenant=doc.tenant,
        input=doc.input,
        cron=(doc.cron or "").strip(),
        interval=doc.interval or 0,
        anchor=doc.start_at,
        timezone=doc.timezone,
        overlap=doc.overlap,
        catch_up_window=doc.catch_up_window,
        jitter=doc.jitter,
        paused=doc.paused,
    )


def load_schedule_yaml(text: str) -> ScheduleSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScheduleSpecError("", [("$", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, Mapping):
        raise ScheduleSpecError(
            "", [("$", "a schedule is a mapping with id, workflow and cron or interval")]
        )
    return load_schedule(data)


def schedule_to_data(spec: ScheduleSpec) -> dict[str, Any]:
    """The document form of a validated schedule (what ``show`` prints)."""
    data: dict[str, Any] = {"id": spec.schedule_id, "workflow": spec.workflow}
    if spec.version:
        data["version"] = spec.version
    data["tenant"] = spec.tenant
    data["input"] = spec.input
    if spec.cron:
        data["cron"] = spec.cron
        data["timezone"] = spec.timezone
    else:
        data["interval"] = f"{spec.interval}ms"
        if spec.anchor:
            data["start_at"] = spec.anchor
    data["overlap"] = spec.overlap.value
    data["catch_up_window"] = f"{spec.catch_up_window}ms"
    data["jitter"] = f"{spec.jitter}ms"
    return data


def _cross_field_issues(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    cron, interval = data.get("cron"), data.get("interval")
    if not cron and not interval:
        issues.append(
            ("cron", "give a cron expression (e.g. '0 9 * * MON-FRI') or an interval (e.g. 15m)")
        )
    if cron and interval:
        issues.append(("interval", "give cron or interval, not both"))
    timezone = data.get("timezone", "UTC")
    zone_ok = isinstance(timezone, str)
    try:
        if zone_ok:
            _zone(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        zone_ok = False
    if not zone_ok:
        issues.append(
            (
                "timezone",
                f"{timezone!r} is not an IANA time zone; write e.g. "
                "Europe/Berlin or America/New_York",
            )
        )
    if isinstance(cron, str) and cron.strip():
        fields = cron.split()
        if len(fields) not in (5, 6):
            issues.append(
                (
                    "cron",
                    f"{cron!r} has {len(fields)} fields; write 5 (minute hour "
                    "day month weekday) or 6 (seconds first)",
                )
            )
        else:
            try:
                CronSim(cron, datetime(2000, 1, 1, tzinfo=UTC))
            except CronSimError as exc:
                issues.append(("cron", f"{cron!r}: {exc}"))
    if (
        isinstance(interval, int)
        and not isinstance(interval, bool)
        and 0 <= interval < MIN_INTERVAL_MS
    ):
        issues.append(("interval", "must be at least 1s"))
    if data.get("interval") is not None and data.get("timezone", "UTC") != "UTC" and not cron:
        issues.append(
            (
                "timezone",
                "an interval counts elapsed time; a time zone applies to cron expressions only",
            )
        )
    return issues


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return "unknown field; the fields are " + ", ".join(ScheduleDocument.model_fields)
    if err.get("type") == "string_pattern_mismatch":
        return (
            "use letters, digits, '_', '.' and '-' (at most 128), starting with a letter or digit"
        )
    return msg.removeprefix("Value error, ")
