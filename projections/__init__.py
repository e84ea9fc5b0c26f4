"""Projections: timelines, run and step rows, an event index and SLA figures, folded
from the run events by pure functions (``project``, ``timeline``, ``sla``), redacted
(``redaction``), and kept in PostgreSQL (``postgres``), SQLite (``sqlite``) and on
compacted topics (``topics``)."""
