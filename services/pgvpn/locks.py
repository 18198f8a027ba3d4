"""Advisory locks: who holds one, and taking over a session lock from our own lost session.

A peer's uplink and downlink each hold a session advisory lock (`pgvpn.sender.NAME`,
`pgvpn.receiver.NAME`) so that one process alone sends or receives as that peer.
Only that peer's role can take them: peers lock through pgvpn.lock_own(), which
names the lock after the session's own peer (sql/007_own_locks.sql).
When only the client sees its connection die (a black-holed path, a NAT that
forgot the flow), the server's backend lives on, holding the lock, until the
server's own keepalive gives up on it; every reconnect would be refused meanwhile.

Why taking over cannot steal the lock from a live agent: a session is ended only
if its application_name is exactly the new session's own. That name carries the
peer, the connection's job and a random mark made once per process
(transports.base.Session.instance), and one process holds one connection per job,
closing the old one before it opens the next: a session with our name that is not
ours is therefore one this process has given up on. It must also be logged in
as the same role (PostgreSQL lets a role end only its own role's sessions anyway).
Another agent, even for the same peer and role, has another mark: it is refused
with one line that names its session, as is a previous run of this process (a
restart gets a new mark); the server's keepalive ends such a session if it is dead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pgvpn.errors import DatabaseError

log = logging.getLogger(__name__)

#: The lock sql/003's pgvpn.ensure_partitions() takes for the length of its transaction.
MAINTENANCE_LOCK = "pgvpn.ensure_partitions"
TERMINATE_WAIT_MS = 5000  # how long to wait for an ended session to let go of its locks

# An advisory lock on a bigint key shows in pg_locks as classid (high 32 bits),
# objid (low 32 bits) and objsubid 1.
HOLDERS = """
SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.backend_start, a.state,
       a.state_change,
       a.usename = session_user AND a.application_name = current_setting('application_name')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)
  AND l.pid <> pg_backend_pid()
ORDER BY a.backend_start
"""


@dataclass(frozen=True)
class Holder:
    """A session holding an advisory lock, as pg_stat_activity shows it to us."""

    pid: int
    application_name: str
    user: str
    client: str | None
    since: datetime | None
    state: str | None
    state_change: datetime | None
    ours: bool  # our role and our own application_name: a session this process lost

    def __str__(self) -> str:
        where = f" from {self.client}" if self.client else ""
        since = f", connected {self.since:%Y-%m-%d %H:%M:%S %Z}" if self.since else ""
        state = (f", {self.state} since {self.state_change:%H:%M:%S}"
                 if self.state and self.state_change else "")
        return (f"pid {self.pid}, {self.user}{where}, application_name "
                f"{self.application_name!r}{since}{state}")


def holders(conn: psycopg.Connection, key: str) -> list[Holder]:
    """Other sessions holding the advisory lock `key` (hashtextextended of it)."""
    return [Holder(*row) for row in conn.execute(HOLDERS, [key]).fetchall()]


def _try_lock(conn: psycopg.Connection, purpose: str) -> bool:
    """The database names the lock after the session's peer (sql/007_own_locks.sql):
    a peer may take no other advisory lock, so none can hold another peer's."""
    row = conn.execute("SELECT pgvpn.lock_own(%s)", [purpose]).fetchone()
    return bool(row and row[0])


def take_own_lock(conn: psycopg.Connection, purpose: str, peer: str) -> None:
    """Hold the session lock that makes `conn` the `purpose` ('sender' or 'receiver')
    for `peer` (the session's own), ending our own lost session that holds it.

    Raises DatabaseError, naming the holder, if another agent holds it.
    """
    key, what = f"pgvpn.{purpose}.{peer}", f"the {purpose} for {peer!r}"
    if _try_lock(conn, purpose):
        return
    found = holders(conn, key)
    for stale in (h for h in found if h.ours):
        log.warning("%s: ending this agent's own lost session that still holds the lock "
                    "(%s)", what, stale)
        conn.execute("SELECT pg_terminate_backend(%s, %s)", [stale.pid, TERMINATE_WAIT_MS])
    if _try_lock(conn, purpose):
        return
    found = holders(conn, key) or found
    raise DatabaseError(f"another agent is already {what} ({'; '.join(map(str, found))}): "
                        "stop it first, or give this one another name; if it is gone, the "
                        "server ends its session once its TCP keepalives go unanswered")
