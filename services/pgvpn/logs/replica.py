"""Reading the log from a hot standby (`--replica`), so that analysing it does not load
the primary that the tunnel writes to.

The connection asks libpq for `target_session_attrs=standby`: with a multi-host
connection string (every node of the cluster) libpq skips the primary, and with a
single host that is not a standby it fails, as the user asked for a standby, not
"a standby if convenient" (prefer-standby). What is read is as old as the standby's
replay: one line on stderr says which node answered and how far behind it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import timedelta

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn import db
from pgvpn.errors import PgvpnError
from pgvpn.logs.render import human_bytes
from pgvpn.timespec import format_duration

REPLICA_URL = "PGVPN_REPLICA_URL"
CONNECT_TIMEOUT = 5  # seconds per host, as db.connect, unless the conninfo says otherwise
NO_STANDBY = ("a standby must answer for --replica: drop --replica to read the primary, or "
              f"give a standby's (or every node's) address in ${REPLICA_URL} or --database-url")
# libpq's 'connection to server on socket "..." failed: REASON' (or 'at "host" (address),
# port N failed: REASON'), once per host tried
_REASON = re.compile(r'(?:socket|at) "[^"\n]*"(?: \([^)\n]*\))?(?:, port \d+)? failed: ([^\n]*)')
STATUS = """
SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(),
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()),
       now() - pg_last_xact_replay_timestamp(), pg_is_wal_replay_paused(),
       EXISTS (SELECT FROM pg_stat_wal_receiver)
"""


def refusal(args: argparse.Namespace) -> str | None:
    """Why this command may not run with --replica (it writes), or None."""
    if not getattr(args, "replica", False):
        return None
    command = getattr(args, "command", None)
    if command == "prune":
        return ("pgvpn prune drops partitions: it writes, so it runs on the primary; drop "
                "--replica (which is for log, stats, export and replay: they only read)")
    if command == "retention" and any(getattr(args, name, None) is not None
                                      for name in ("keep", "partition_step", "ahead")):
        return ("changing the retention policy writes, so it runs on the primary: drop "
                "--replica (with it, 'pgvpn retention' only shows the policy)")
    if command == "replay" and getattr(args, "input", None):
        return "--replica chooses the database to read; with --input the file is read instead"
    return None


def replica_url(args: argparse.Namespace) -> str:
    """Where --replica reads: --database-url when typed, else $PGVPN_REPLICA_URL, else the
    database URL ($DATABASE_URL, the PG* variables)."""
    if getattr(args, "database_url_given", False):
        return str(args.database_url)
    url = os.environ.get(REPLICA_URL, "")
    if not url:
        return str(args.database_url)
    try:
        conninfo_to_dict(url)
    except psycopg.Error:
        raise PgvpnError(f"${REPLICA_URL} is not a valid libpq connection string or URL (not "
                         "shown, as it may hold a password)") from None
    return url


def standby_conninfo(conninfo: str) -> str:
    """The conninfo with target_session_attrs=standby (replacing any other value)."""
    return make_conninfo(conninfo, target_session_attrs="standby")


def hosts_tried(conninfo: str) -> list[str]:
    """host:port of every node libpq tries for `conninfo`, as it pairs them."""
    params = conninfo_to_dict(conninfo)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    addresses = str(params.get("hostaddr") or os.environ.get("PGHOSTADDR") or "").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    count = max(len(hosts), len(addresses))
    if len(ports) == 1:
        ports *= count
    names = []
    for index in range(count):
        host = hosts[index] if index < len(hosts) else ""
        address = addresses[index] if index < len(addresses) else ""
        where = host or address or "the default socket"
        if host and address:
            where = f"{host} ({address})"
        names.append(f"{where}:{ports[index] if index < len(ports) else '?'}")
    return names


def connect_standby(conninfo: str, application_name: str) -> psycopg.Connection:
    """An autocommit connection to a hot standby, or one line naming the hosts tried."""
    target = standby_conninfo(conninfo)
    if "connect_timeout" not in conninfo_to_dict(target) and not os.environ.get(
            "PGCONNECT_TIMEOUT"):
        target = make_conninfo(target, connect_timeout=CONNECT_TIMEOUT)
    try:
        conn = psycopg.connect(target, autocommit=True, application_name=application_name)
    except psycopg.OperationalError as exc:
        reasons = list(dict.fromkeys(r.strip() for r in _REASON.findall(str(exc))))
        why = "; ".join(reasons) if reasons else db.explain(exc)
        raise PgvpnError(f"no standby answered: tried {', '.join(hosts_tried(target))} "
                         f"({why}): {NO_STANDBY}") from None
    try:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if not row or not row[0]:  # promoted between libpq's check and now
            raise PgvpnError(f"{node_name(conn)} is a primary now, not a standby: {NO_STANDBY}")
    except BaseException:
        conn.close()
        raise
    return conn


def node_name(conn: psycopg.Connection) -> str:
    """The node as the client reached it: host (a socket directory or a name) and port."""
    return f"{conn.info.host}:{conn.info.port}"


def standby_line(conn: psycopg.Connection, command: str) -> str:
    """One line: which standby was read, the WAL it has replayed, and how old its newest
    replayed commit is (on an idle primary that age grows with no lag at all)."""
    row = conn.execute(STATUS).fetchone()
    assert row is not None
    recovering, received, replayed, unreplayed, age, paused, streaming = row
    if not recovering:
        return f"{command}: read from {node_name(conn)}, a primary now, not a standby"
    parts = [f"WAL replayed to {replayed}"]
    if received is not None:
        parts[0] += f" ({human_bytes(float(unreplayed or 0))} received, not yet replayed)"
    parts.append(f"last replayed commit {_age(age)} ago" if age is not None
                 else "no commit replayed since the standby started")
    if paused:
        parts.append("replay PAUSED (pg_wal_replay_resume() resumes it)")
    if not streaming:
        parts.append("NOT streaming from a primary now: it may be far behind")
    return f"{command}: reading standby {node_name(conn)}: {', '.join(parts)}"


def _age(age: timedelta) -> str:
    seconds = age.total_seconds()
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    return format_duration(age)


def report(conn: psycopg.Connection, command: str) -> None:
    print(standby_line(conn, command), file=sys.stderr, flush=True)


CANCELLED = ("the standby cancelled this read: replaying the primary's changes conflicted "
             "with it (a 'pgvpn prune' dropping a partition being read, or vacuum) and "
             "max_standby_streaming_delay ran out; run it again, read a narrower window, or "
             "raise max_standby_streaming_delay on the standby")


def is_recovery_conflict(exc: psycopg.Error) -> bool:
    """A hot standby's cancel of a query that blocked WAL replay (SQLSTATE 40001)."""
    return "conflict with recovery" in str(exc)
