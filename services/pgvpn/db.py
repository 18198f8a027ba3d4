"""Connections to PostgreSQL: retries with backoff and errors that say what to check."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgvpn.errors import DatabaseError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0


def describe_target(conninfo: str) -> str:
    """user@host:port/dbname of a connection string, without its password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise DatabaseError(f"invalid database URL: {exc}") from None

    host = str(params.get("host") or os.environ.get("PGHOST", "local socket"))
    port = str(params.get("port") or os.environ.get("PGPORT", "5432"))
    user = str(params.get("user") or os.environ.get("PGUSER", ""))
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE", ""))
    return f"{user + '@' if user else ''}{host}:{port}/{dbname}"


# libpq's "connection to server at "h" (a), port p failed: " repeats what
# describe_target says already.
_LIBPQ_PREFIX = re.compile(r'^(connection failed: |connection is bad: )?'
                           r'(connection to server (at|on) "[^"]*"( \([^)]*\))?(, port \d+)? '
                           r'failed: )?')


def explain(exc: psycopg.Error) -> str:
    """One line on what went wrong and what to check."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _LIBPQ_PREFIX.sub("", text) or text
    lowered = str(exc).lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return f"{text} (check the user name and password / PGPASSFILE)"
    if "does not exist" in lowered and "database" in lowered:
        return f"{text} (check the database name)"
    if "connection refused" in lowered or "timeout" in lowered or "no route" in lowered:
        return (f"{text} (check that the server runs and that DATABASE_URL or "
                "PGHOST/PGPORT point at it)")
    if "ssl" in lowered or "certificate" in lowered:
        return (f"{text} (check sslmode and sslrootcert (PGSSLMODE, PGSSLROOTCERT) and the "
                "server's certificate)")
    return text


def connect(conninfo: str, *, autocommit: bool = True, attempts: int = 1,
            application_name: str = "pgvpn") -> psycopg.Connection:
    """Connect, retrying with backoff; raise DatabaseError after the last attempt."""
    target = describe_target(conninfo)
    delay = BACKOFF_FIRST
    for attempt in range(1, attempts + 1):
        try:
            return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=5,
                                   application_name=application_name)
        except psycopg.OperationalError as exc:
            reason = explain(exc)
            if attempt == attempts:
                raise DatabaseError(f"cannot connect to {target} after {attempts} "
                                    f"attempt(s): {reason}") from None
            log.warning("cannot connect to %s (attempt %d/%d): %s; retrying in %.1fs",
                        target, attempt, attempts, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
    raise AssertionError("unreachable")


def is_connection_lost(exc: BaseException) -> bool:
    """True for errors that a reconnect can cure (server restart, network cut)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown)


def retry_forever(action: Callable[[], T], *, what: str, should_stop: Callable[[], bool],
                  on_lost: Callable[[], None]) -> T | None:
    """Run `action` until it succeeds, reconnecting (via `on_lost`) on lost connections.

    Returns None if `should_stop` turns true first. Other errors propagate.
    """
    delay = BACKOFF_FIRST
    while not should_stop():
        try:
            return action()
        except psycopg.Error as exc:
            if not is_connection_lost(exc):
                raise
            log.warning("%s: database connection lost (%s); reconnecting in %.1fs",
                        what, explain(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                on_lost()
            except (psycopg.Error, DatabaseError) as again:
                log.warning("%s: reconnect failed: %s", what, again)
    return None
