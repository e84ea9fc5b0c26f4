"""The PostgreSQL projection schema: ordered migrations and the statements the projector
runs. Migrations are append-only: a released one never changes, a change is a new one."""

from __future__ import annotations

from projections.project import Column

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "projection tables",
        """
CREATE TABLE runs (
    run_id text PRIMARY KEY,
    workflow text NOT NULL,
    version bigint NOT NULL,
    tenant text NOT NULL,
    correlation_id text NOT NULL,
    requested_by text NOT NULL,
    status text NOT NULL,
    started_at bigint NOT NULL,
    ended_at bigint,
    duration_ms bigint,
    attempts bigint NOT NULL,
    cost double precision NOT NULL,
    escalations bigint NOT NULL,
    sla_due_at bigint,
    sla_breached boolean NOT NULL,
    sla_breaches bigint NOT NULL,
    rejected_commands bigint NOT NULL,
    approval_since bigint,
    approval_due_at bigint,
    error jsonb,
    input jsonb,
    output jsonb,
    last_seq bigint NOT NULL,
    updated_at bigint NOT NULL,
    events bigint NOT NULL,
    state jsonb NOT NULL
);
CREATE INDEX runs_by_start ON runs (workflow, tenant, started_at);
CREATE INDEX runs_by_status ON runs (status, updated_at);
CREATE INDEX runs_waiting_for_approval ON runs (approval_due_at)
    WHERE approval_since IS NOT NULL;

CREATE TABLE steps (
    run_id text NOT NULL,
    idx bigint NOT NULL,
    step text NOT NULL,
    visit bigint NOT NULL,
    kind text NOT NULL,
    status text NOT NULL,
    started_at bigint NOT NULL,
    ended_at bigint,
    duration_ms bigint,
    attempts bigint NOT NULL,
    waited_ms bigint NOT NULL,
    cost double precision NOT NULL,
    note text NOT NULL,
    decisions jsonb,
    errors jsonb,
    input jsonb,
    payload jsonb,
    signal jsonb,
    result jsonb,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE run_events (
    run_id text NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    ts bigint NOT NULL,
    "partition" bigint NOT NULL,
    "offset" bigint NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE projector_offsets (
    projector text NOT NULL,
    topic text NOT NULL,
    "partition" bigint NOT NULL,
    "offset" bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, topic, "partition")
);
""",
    ),
    (
        2,
        "sla_metrics function and views",
        """
CREATE FUNCTION sla_metrics(
    window_ms bigint,
    now_ms bigint DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
RETURNS TABLE (
    workflow text, tenant text, bucket_start bigint, started bigint, completed bigint,
    failed bigint, cancelled bigint, mean_ms double precision, p95_ms double precision,
    cost_sum double precision, escalated bigint, approvals_waiting bigint,
    approvals_overdue bigint, sla_breaches bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.workflow, r.tenant, r.started_at / window_ms * window_ms,
           count(*),
           count(*) FILTER (WHERE r.status = 'Completed'),
           count(*) FILTER (WHERE r.status = 'Failed'),
           count(*) FILTER (WHERE r.status = 'Cancelled'),
           (avg(r.duration_ms) FILTER (WHERE r.status = 'Completed'
                                        AND r.duration_ms IS NOT NULL))::double precision,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)
               FILTER (WHERE r.status = 'Completed' AND r.duration_ms IS NOT NULL),
           sum(r.cost),
           count(*) FILTER (WHERE r.escalations > 0),
           count(*) FILTER (WHERE r.approval_since IS NOT NULL),
           count(*) FILTER (WHERE r.approval_since IS NOT NULL
                             AND r.approval_due_at <= now_ms),
           count(*) FILTER (WHERE r.sla_breached)
    FROM runs r
    WHERE r.workflow <> ''
    GROUP BY 1, 2, 3
$$;
COMMENT ON FUNCTION sla_metrics(bigint, bigint) IS
    'SLA counts per (workflow, tenant, bucket of window_ms by run start); rates: '
    'projections.sla.metrics_of';
CREATE VIEW sla_1m AS SELECT * FROM sla_metrics(60000);
CREATE VIEW sla_1h AS SELECT * FROM sla_metrics(3600000);
""",
    ),
)

PG_TYPES = {
    "text": "text",
    "int": "bigint",
    "float": "double precision",
    "bool": "boolean",
    "json": "jsonb",
}

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def q(name: str) -> str:
    return f'"{name}"'


def upsert(
    table: str, columns: tuple[Column, ...], key: tuple[str, ...], update: bool = True
) -> str:
    """One statement for a whole batch: one array parameter per column, unnested.
    JSON columns travel as text and are cast on the server."""
    names = ", ".join(q(c.name) for c in columns)
    # Binary parameters (%b): text-format arrays cost psycopg an escaping pass per element.
    arrays = ", ".join(f"%b::{'text' if c.kind == 'json' else PG_TYPES[c.kind]}[]" for c in columns)
    select = ", ".join(
        f"u.{q(c.name)}::jsonb" if c.kind == "json" else f"u.{q(c.name)}" for c in columns
    )
    sql = (
        f"INSERT INTO {table} ({names}) SELECT {select} FROM unnest({arrays}) "
        f"AS u({names}) ON CONFLICT ({', '.join(q(k) for k in key)}) "
    )
    if not update:
        return sql + "DO NOTHING"
    sets = ", ".join(f"{q(c.name)} = excluded.{q(c.name)}" for c in columns if c.name not in key)
    return sql + f"DO UPDATE SET {sets}"


OFFSETS_UPSERT = """
INSERT INTO projector_offsets (projector, topic, "partition", "offset")
SELECT %s, %s, u.p, u.o FROM unnest(%b::bigint[], %b::bigint[]) AS u(p, o)
ON CONFLICT (projector, topic, "partition") DO UPDATE
SET "offset" = GREATEST(projector_offsets."offset", excluded."offset"), updated_at = now()
"""

CHECKSUM_TABLES = ("runs", "steps", "run_events")
