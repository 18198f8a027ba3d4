"""Keeping the log's size under control: whole partitions dropped, never rows deleted.

`pgvpn prune` (this module, as the owner) drops the partitions wholly older than a
cutoff, given or the retention policy in pgvpn.log_settings, by the rule of
pgvpn.expired_partitions (migration 003): DETACH PARTITION ... CONCURRENTLY then
DROP TABLE. The detach takes only a SHARE UPDATE EXCLUSIVE lock, so agents keep
inserting and reading throughout, and the drop touches a table that is no longer
part of the log. Only the owner prunes: agents applied the policy themselves until
migration 008, through a function whose drop locked the whole log, a lock a hostile
peer could hold. The partition holding now() and those ahead of it are never
candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from psycopg import sql

from pgvpn.errors import PgvpnError

PRUNE_LOCK = "pgvpn.prune"
OWNER_ONLY = ("pgvpn prune must run as the owner of the pgvpn schema (the only role that "
              "drops partitions)")


@dataclass(frozen=True)
class LogSettings:
    """The owner's policy for the log, one row of pgvpn.log_settings."""

    partition_step: timedelta
    partitions_ahead: timedelta
    retention: timedelta | None


@dataclass(frozen=True)
class Partition:
    name: str
    range_from: datetime
    range_to: datetime
    bytes: int = 0
    estimated_rows: int | None = None
    keep_reason: str | None = None


@dataclass
class PruneReport:
    cutoff: datetime
    dropped: list[Partition] = field(default_factory=list)
    kept: list[Partition] = field(default_factory=list)  # expired but kept, with a reason
    created_ahead: int = 0
    dry_run: bool = False


def load_settings(conn: psycopg.Connection) -> LogSettings:
    row = conn.execute("SELECT partition_step, partitions_ahead, retention "
                       "FROM pgvpn.log_settings").fetchone()
    if row is None:
        raise PgvpnError("pgvpn.log_settings is empty: run 'pgvpn db migrate'")
    return LogSettings(*row)


def update_settings(conn: psycopg.Connection, *, partition_step: timedelta | None = None,
                    partitions_ahead: timedelta | None = None,
                    retention: timedelta | None = None, keep_forever: bool = False
                    ) -> LogSettings:
    """Change the given settings (the others stay) and make partitions for the new ones."""
    changes: list[sql.Composable] = []
    params: list[object] = []
    for column, value in (("partition_step", partition_step),
                          ("partitions_ahead", partitions_ahead), ("retention", retention)):
        if value is not None:
            changes.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if keep_forever:
        changes.append(sql.SQL("retention = NULL"))
    if not changes:
        return load_settings(conn)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("UPDATE pgvpn.log_settings SET {}, updated_at = now()").format(
                sql.SQL(", ").join(changes)), params)
            conn.execute("SELECT pgvpn.ensure_partitions()")
    except psycopg.errors.InsufficientPrivilege:
        raise PgvpnError("only the database owner may change the log's settings") from None
    except psycopg.errors.CheckViolation:
        raise PgvpnError(
            "settings refused: the partition step must be a divisor of a day (e.g. 1h, 15m) "
            "or whole days up to 31d; partitions ahead at least 2h and at least one step; "
            "retention at least 1m") from None
    return load_settings(conn)


def prune(conn: psycopg.Connection, older_than: timedelta | None, *, dry_run: bool = False,
          progress: Callable[[str], None] = lambda _: None) -> PruneReport:
    """Drop every partition wholly older than `older_than` (default: the retention policy).

    Needs an autocommit owner connection: DETACH ... CONCURRENTLY cannot run inside
    a transaction block.
    """
    if not conn.autocommit:
        raise PgvpnError("prune needs an autocommit connection")
    if older_than is None:
        older_than = load_settings(conn).retention
        if older_than is None:
            raise PgvpnError("give --older-than, or set a retention policy first "
                             "(pgvpn retention --keep 7d)")
    if older_than <= timedelta(0):
        raise PgvpnError("--older-than must be longer than zero")
    try:  # in pgvpn's database only the owner may take advisory locks (sql/007)
        locked = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                              [PRUNE_LOCK]).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        raise PgvpnError(OWNER_ONLY) from None
    if not locked or not locked[0]:
        raise PgvpnError("another 'pgvpn prune' is at work on this database: try again "
                         "in a moment")
    try:
        return _prune_locked(conn, older_than, dry_run, progress)
    except psycopg.errors.InsufficientPrivilege:
        raise PgvpnError(OWNER_ONLY) from None
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [PRUNE_LOCK])


EXPIRED = """
SELECT e.partition::text, e.range_from, e.range_to, coalesce(l.bytes, 0), l.estimated_rows,
       e.keep_reason, coalesce(l.detach_pending, false)
FROM pgvpn.expired_partitions(%s) e
LEFT JOIN pgvpn.log_partitions l ON l.partition = e.partition
"""


def _prune_locked(conn: psycopg.Connection, older_than: timedelta, dry_run: bool,
                  progress: Callable[[str], None]) -> PruneReport:
    row = conn.execute("SELECT now() - %s", [older_than]).fetchone()
    assert row is not None
    report = PruneReport(cutoff=row[0], dry_run=dry_run)
    rows = conn.execute(EXPIRED, [report.cutoff]).fetchall()
    for name, range_from, range_to, size, estimate, reason, pending in rows:
        partition = Partition(name, range_from, range_to, int(size), estimate, reason)
        if reason:
            report.kept.append(partition)
            continue
        report.dropped.append(partition)
        if dry_run:
            continue
        table = sql.SQL(name)  # regclass text: already quoted and schema-qualified
        if pending:
            # An earlier prune was interrupted between its two detach transactions.
            progress(f"finishing the interrupted detach of {name}")
            conn.execute(sql.SQL("ALTER TABLE pgvpn.packets DETACH PARTITION {} FINALIZE")
                         .format(table))
        else:
            progress(f"detaching {name} ({range_from:%Y-%m-%d %H:%M} .. "
                     f"{range_to:%Y-%m-%d %H:%M})")
            conn.execute(sql.SQL("ALTER TABLE pgvpn.packets DETACH PARTITION {} CONCURRENTLY")
                         .format(table))
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
    if not dry_run:
        row = conn.execute("SELECT pgvpn.ensure_partitions()").fetchone()
        report.created_ahead = int(row[0]) if row else 0
    return report
