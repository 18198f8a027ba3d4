"""Versioned schema migrations from sql/NNN_name.sql, applied once each, in order."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from pgvpn.errors import DatabaseError

log = logging.getLogger(__name__)
FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 0x7067_7670_6E00  # advisory lock: one migrator at a time


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with this agent, in version order."""
    found = []
    for entry in resources.files("pgvpn.migrations").iterdir():
        match = FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


def applied_version(conn: psycopg.Connection) -> int:
    """The highest migration applied to this database, 0 for an empty one."""
    exists = conn.execute("SELECT to_regclass('pgvpn.schema_migrations')").fetchone()
    if not exists or exists[0] is None:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM pgvpn.schema_migrations"
                       ).fetchone()
    return int(row[0]) if row else 0


def newer_than_this_pgvpn(current: int, latest: int) -> DatabaseError:
    """A schema from a newer pgvpn: this one must be upgraded, nothing migrated."""
    return DatabaseError(f"schema is at version {current}, newer than this pgvpn (which "
                         f"knows up to {latest}): upgrade it")


def migrate(conn: psycopg.Connection) -> int:
    """Apply every missing migration, each in its own transaction; return the version."""
    migrations = available()
    latest = migrations[-1].version
    applied = applied_version(conn)
    if applied > latest:
        raise newer_than_this_pgvpn(applied, latest)
    if applied == latest:
        log.info("schema at version %d (up to date)", latest)
        return latest
    conn.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
    try:
        current = applied_version(conn)  # again: another migrator may have won the race
        for migration in migrations:
            if migration.version <= current:
                continue
            try:
                with conn.transaction():
                    # Names in a migration resolve in the catalog or are qualified:
                    # nothing in a schema of the migrator's, or in its pg_temp,
                    # can stand in for them (a BEGIN ATOMIC body binds them here).
                    conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
                    conn.execute(sql.SQL(migration.sql))
                    conn.execute("INSERT INTO pgvpn.schema_migrations (version, name) "
                                 "VALUES (%s, %s)", [migration.version, migration.name])
            except psycopg.errors.InsufficientPrivilege as exc:
                primary, hint = exc.diag.message_primary, exc.diag.message_hint
                why = (f"migration {migration.version:03d}_{migration.name} refused: "
                       f"{primary}; {hint}" if hint  # a migration's own check says who acts
                       else f"this role may not migrate it ({primary}); run 'pgvpn db "
                       "migrate' as the database owner")
                raise DatabaseError(f"schema is at version {current}, {latest} is needed, "
                                    f"and {why}") from None
            except psycopg.Error as exc:
                raise DatabaseError(f"migration {migration.version:03d}_{migration.name} "
                                    f"failed: {exc.diag.message_primary or exc}") from None
            current = migration.version
        log.info("schema at version %d (migrated)", current)
        return current
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


def require_current(conn: psycopg.Connection) -> int:
    """Check, without changing anything, that the schema is the one this agent speaks."""
    latest = available()[-1].version
    current = applied_version(conn)
    if current > latest:
        raise newer_than_this_pgvpn(current, latest)
    if current != latest:
        raise DatabaseError(f"schema is at version {current} but this agent needs {latest}: "
                            "run 'pgvpn db migrate' as the database owner")
    log.info("schema at version %d", current)
    return current
