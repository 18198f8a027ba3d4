"""Connections to PostgreSQL: retries with backoff and errors that say what to check."""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn import dbhosts
from pgvpn.errors import DatabaseError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.5
# Short enough that a connection is back within seconds of a path's return, long
# enough that a server that is down sees one attempt per connection every few seconds.
BACKOFF_MAX = 3.0


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


# psycopg's report when every host of a list failed: one "- host: ..." line per attempt,
# each followed by libpq's tab-indented hints.
_ATTEMPTS = "Multiple connection attempts failed. All failures were:"
_ATTEMPT = re.compile(r"- host: (?:'(?P<host>[^']*)'|None), port: (?:'(?P<port>[^']*)'|None), "
                      r"hostaddr: (?:'[^']*'|None): (?P<error>.*)")


def _attempts(message: str) -> str | None:
    """`host:port: error; ...` of a multi-host failure, or None for any other message."""
    if _ATTEMPTS not in message:
        return None
    failures = []
    for line in message.split(_ATTEMPTS, 1)[1].splitlines():
        found = _ATTEMPT.fullmatch(line)
        if found:  # libpq's indented hint lines say what the caller's hint says
            error = _LIBPQ_PREFIX.sub("", " ".join(found["error"].split()))
            failures.append(f"{found['host']}:{found['port'] or '5432'}: {error}")
    return f"every host failed: {'; '.join(failures)}" if failures else None


def explain(exc: psycopg.Error) -> str:
    """One line on what went wrong and what to check."""
    # the server's own message, without the CONTEXT lines of the function that raised it
    text = (_attempts(str(exc)) or " ".join((exc.diag.message_primary or str(exc)).split())
            or type(exc).__name__)
    text = _LIBPQ_PREFIX.sub("", text) or text
    lowered = str(exc).lower()
    if (exc.sqlstate == "25006" or "session is read-only" in lowered
            or "server is in hot standby mode" in lowered):  # libpq's target_session_attrs
        return (f"{text} (a read-only server such as a hot standby: the agent writes, so it "
                "needs the primary; name every node in PGHOST)")
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return f"{text} (check the user name and password / PGPASSFILE)"
    if "does not exist" in lowered and "database" in lowered:
        return f"{text} (check the database name)"
    if "timed out" in lowered:  # an established connection: keepalive or user timeout
        return f"{text} (the server stopped answering: check the network path to it)"
    if any(cut in lowered for cut in ("unexpected eof", "server closed the connection",
                                      "closed unexpectedly", "eof detected")):
        return text  # cut, not misconfigured: TLS and the address were fine until now
    if exc.sqlstate is None and ("connection refused" in lowered or "timeout" in lowered
                                 or "no route" in lowered):
        return (f"{text} (check that the server runs and that DATABASE_URL or "
                "PGHOST/PGPORT point at it)")
    if "ssl" in lowered or "certificate" in lowered:
        return (f"{text} (check sslmode and sslrootcert (PGSSLMODE, PGSSLROOTCERT) and the "
                "server's certificate)")
    return text


def connect(conninfo: str, *, autocommit: bool = True, attempts: int = 1,
            application_name: str = "pgvpn", libpq: Mapping[str, int] | None = None,
            hosts: dbhosts.HostOrder | None = None) -> psycopg.Connection:
    """Connect, retrying with backoff; raise DatabaseError after the last attempt.

    `libpq` adds connection parameters (the agent's TCP keepalives and user timeout).
    The user's connect_timeout (conninfo or PGCONNECT_TIMEOUT) holds for each host,
    DEFAULT_CONNECT_TIMEOUT if none. `hosts` orders a list of hosts (dbhosts.HostOrder).
    """
    if libpq:
        conninfo = make_conninfo(conninfo, **libpq)
    target = describe_target(conninfo)
    try:
        given = dbhosts.connect_timeout(conninfo)
        dbhosts.HostList.of(conninfo)  # lists libpq could not pair: said once, not retried
    except ValueError as exc:
        raise DatabaseError(f"cannot connect to {target}: {exc}") from None
    if given is None:
        conninfo = make_conninfo(conninfo, connect_timeout=dbhosts.DEFAULT_CONNECT_TIMEOUT)
    # Several hosts (a replicated database): the new primary is wanted the moment it is
    # promoted, and a dead host's connect_timeout already paces the attempts.
    longest = BACKOFF_FIRST if len(dbhosts.HostList.of(conninfo)) > 1 else BACKOFF_MAX
    delay = BACKOFF_FIRST
    for attempt in range(1, attempts + 1):
        try:
            if hosts is None:
                return psycopg.connect(conninfo, autocommit=autocommit,
                                       application_name=application_name)
            arranged, listed = hosts.arrange(conninfo)
            conn = dbhosts.AgentConnection.connect(arranged, autocommit=autocommit,
                                                   application_name=application_name)
            hosts.connected(conn, listed)
            return conn
        except psycopg.OperationalError as exc:
            reason = explain(exc)
            if attempt == attempts:
                raise DatabaseError(f"cannot connect to {target} after {attempts} "
                                    f"attempt(s): {reason}") from None
            log.warning("cannot connect to %s (attempt %d/%d): %s; retrying in %.1fs",
                        target, attempt, attempts, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, longest)
    raise AssertionError("unreachable")


class Outcome(enum.Enum):
    """What a database error calls for (`classify`)."""

    LOST = "reconnect"  # the connection is gone: a new one cures it
    RETRY = "retry"  # transient, the connection is fine: run the statement again
    BACKOFF = "back off"  # the server lacks resources: wait, say so loudly, try again
    FATAL = "fatal"  # neither a reconnect nor a retry can fix it: stop, loudly


# SQLSTATEs (Appendix A of the PostgreSQL manual) that end the session server-side:
# admin_shutdown, crash_shutdown, cannot_connect_now, idle_session_timeout,
# idle_in_transaction_session_timeout; and read_only_sql_transaction: a write on a hot
# standby (a demoted primary, or a host reached without target_session_attrs), which
# only a connection to the primary cures.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "25006"})
# query_canceled (a statement or lock bound of ours, or a cancel), serialization
# failure, deadlock, lock_not_available (lock_timeout): the same statement may succeed.
_TRANSIENT = frozenset({"57014", "40001", "40P01", "55P03"})


def classify(exc: BaseException) -> Outcome:
    """Sort an error by SQLSTATE: only a lost connection is cured by reconnecting.

    An OperationalError without SQLSTATE comes from libpq itself (socket closed,
    timed out, TLS failure, connection already closed): the connection is lost.
    """
    if not isinstance(exc, psycopg.Error):
        return Outcome.FATAL
    state = exc.sqlstate
    if state is None:
        return Outcome.LOST if isinstance(exc, psycopg.OperationalError) else Outcome.FATAL
    if state.startswith("08") or state in _SESSION_ENDED:
        return Outcome.LOST
    if state in _TRANSIENT:
        return Outcome.RETRY
    if state.startswith("53"):  # insufficient resources: disk full, out of memory, ...
        return Outcome.BACKOFF
    return Outcome.FATAL


def is_connection_lost(exc: BaseException) -> bool:
    """True for errors that a reconnect can cure (server restart, network cut)."""
    return classify(exc) is Outcome.LOST


_SAYS = {Outcome.LOST: ("database connection lost", "reconnecting"),
         Outcome.RETRY: ("transient database error", "retrying"),
         Outcome.BACKOFF: ("the database lacks resources", "retrying")}


def retry_forever(action: Callable[[], T], *, what: str, should_stop: Callable[[], bool],
                  on_lost: Callable[[], None]) -> T | None:
    """Run `action` until it succeeds, as `classify` says: reconnect (via `on_lost`)
    after a lost connection, run it again after a transient error, back off while
    the server lacks resources. The first retry is at once (a cut connection is
    usually one blip), later ones back off so that a server that is down is not hammered.

    Returns None if `should_stop` turns true first. Fatal errors propagate.
    """
    delay = 0.0
    while not should_stop():
        try:
            return action()
        except psycopg.Error as exc:
            outcome = classify(exc)
            if outcome is Outcome.FATAL:
                raise
            if outcome is Outcome.BACKOFF:  # never at once: the server needs a moment
                delay = max(delay, BACKOFF_FIRST)
            says, does = _SAYS[outcome]
            log.log(logging.ERROR if outcome is Outcome.BACKOFF else logging.WARNING,
                    "%s: %s (%s); %s %s", what, says, explain(exc), does,
                    f"in {delay:.1f}s" if delay else "at once")
            time.sleep(delay)
            delay = min(max(delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
            if outcome is Outcome.LOST:
                try:
                    on_lost()
                except (psycopg.Error, DatabaseError) as again:
                    log.warning("%s: reconnect failed: %s", what, again)
    return None


def server_address(conn: psycopg.Connection
                   ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The database server's IP address as this connection reached it; None over a
    Unix socket."""
    try:
        return ipaddress.ip_address(conn.info.hostaddr)
    except ValueError:
        return None


def notified(conn: psycopg.Connection, timeout: float) -> set[str]:
    """The channels notified on `conn`: waits up to `timeout` s for one notification
    (0: no wait), then takes every one already queued, so that one read serves them
    all (and psycopg's queue stays short under a flood)."""
    channels = {n.channel for n in conn.notifies(timeout=timeout, stop_after=1)
                } if timeout > 0 else set()
    return channels | {n.channel for n in conn.notifies(timeout=0)}
