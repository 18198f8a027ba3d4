"""The database's ceiling for `lab bench`: what it ingests with no tunnel at all.

The first peer writes rows of the bench's packet size with its uplink's own path and
settings (`pgvpn ceiling`, services/pgvpn/ceiling.py) into a scratch table of the
log's shape, which the owner makes for the run, lets that peer write, and drops
after it. A ceiling that cannot be measured is said in the result; it never costs
the tunnel's figures.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from lab.backends.base import LabError, Progress
from lab.controller import Lab
from pgvpn.admin import role_name
from pgvpn.tun import READ_BYTES  # an uplink batch holds about this much at most

# At most this many seconds of writing (a 1.3 Gbit/s database takes about 800 MB in
# 5 s, dropped right after), in batches like a loaded uplink's.
CEILING_SECONDS, CEILING_BATCH = 5.0, 256
SCHEMA = "pgvpn_bench"
TABLE = f"{SCHEMA}.ingest"
# A table of the log's shape (columns, defaults, checks, indexes, storage, partitioned by
# time) with ids of its own. A scratch schema left by a crash goes first.
SCRATCH_SQL = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE SEQUENCE {SCHEMA}.ids AS bigint;
CREATE TABLE {TABLE} (LIKE pgvpn.packets INCLUDING ALL) PARTITION BY RANGE (logged_at);
ALTER TABLE {TABLE} ALTER COLUMN id SET DEFAULT nextval('{SCHEMA}.ids');
CREATE TABLE {SCHEMA}.ingest_rows PARTITION OF {TABLE} DEFAULT;
"""
# What the writing peer may do there: exactly what its uplink does to the log.
GRANTS_SQL = (f"GRANT USAGE ON SCHEMA {SCHEMA} TO {{role}}; "
              f"GRANT USAGE ON SEQUENCE {SCHEMA}.ids TO {{role}}; "
              f"GRANT INSERT (seq, receiver, length, data, offload) ON {TABLE} TO {{role}}")
# A peer may hold a lock on the scratch table (an open transaction): never wait for it
# for ever; say who holds it instead.
LOCK_TIMEOUT = "10s"
HOLDERS_SQL = f"""
SELECT DISTINCT a.pid, a.usename, a.application_name
FROM pg_catalog.pg_locks l
JOIN pg_catalog.pg_class c ON c.oid = l.relation
JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE c.relnamespace = to_regnamespace('{SCHEMA}') AND l.granted
  AND a.pid <> pg_backend_pid()
"""


def _owner(lab: Lab, what: str, statement: str | sql.SQL | sql.Composed) -> None:
    """Run `statement` as the owner with a bounded lock wait; errors become LabErrors."""
    try:
        with lab.admin() as conn:
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            try:
                conn.execute(statement)
            except psycopg.errors.LockNotAvailable:
                holders = "; ".join(f"pid {pid} ({user}, {app or 'no name'})"
                                    for pid, user, app in conn.execute(HOLDERS_SQL))
                raise LabError(f"{what}: schema {SCHEMA} is locked by {holders or 'a session'}"
                               f" for more than {LOCK_TIMEOUT}; the next bench or 'lab down' "
                               "removes it") from None
    except psycopg.Error as exc:
        raise LabError(f"{what}: {exc}") from None


def sent_row_size(lab: Lab, since: datetime) -> int | None:
    """The mean size of the rows the bench's client logged since `since`: with offload,
    its super-packets' (the ceiling is measured with rows of that size)."""
    with lab.admin() as conn:
        row = conn.execute("SELECT round(avg(length)) FROM pgvpn.packets "
                           "WHERE sender = %s AND logged_at >= %s",
                           [lab.topology.agents[0].name, since]).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def measure_ceiling(lab: Lab, duration: float, progress: Progress,
                    size: int | None = None) -> dict[str, Any]:
    """`pgvpn ceiling`'s result (rows, bytes, seconds, mbps, ...), or {"error": why}, for
    rows of `size` bytes (default: the MTU)."""
    client = lab.topology.agents[0]
    seconds, size = min(duration, CEILING_SECONDS), size or lab.effective_mtu
    progress(f"ceiling: {client.name} writes {size}-byte rows into the database for "
             f"{seconds:g}s, no tunnel")
    errors = []
    result: dict[str, Any] = {}
    try:
        _owner(lab, "making the ceiling's scratch table", SCRATCH_SQL)
        _owner(lab, f"letting {client.name} write it",
               sql.SQL(GRANTS_SQL).format(role=sql.Identifier(role_name(client.name))))
        done = lab.backend.exec_pgvpn_as_agent(client.name, [
            "ceiling", TABLE, "--seconds", f"{seconds:g}", "--size", str(size),
            "--batch", str(max(1, min(CEILING_BATCH, READ_BYTES // size))), "--json"],
            timeout=seconds + 60)
        done.check(f"pgvpn ceiling on {client.name}")
        try:
            result = dict(json.loads(done.stdout))
        except ValueError:
            raise LabError(f"pgvpn ceiling on {client.name} printed no JSON: "
                           f"{done.stdout.strip()[:200]}") from None
    except LabError as exc:
        errors.append(str(exc))
    try:  # whatever happened: the grant and the rows go with the schema
        _owner(lab, "dropping the ceiling's scratch table", f"DROP SCHEMA IF EXISTS {SCHEMA} "
               "CASCADE")
    except LabError as exc:
        errors.append(str(exc))
    if errors:
        progress(f"ceiling not measured: {' / '.join(errors)}")
        return {"error": " / ".join(errors)}
    return result
