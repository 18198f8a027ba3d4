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

Why a lost session that waits for the synchronous standby is not ended: a backend
ended (or cancelled) in that wait makes its commit visible without the standby having
it (the server warns "canceling the wait for synchronous replication"); a failover
would then lose rows other sessions saw. Such a session (wait_event 'SyncRep') is
waited for instead, as long as the connection's lock_timeout; it lets go once the
standby confirms or the cluster manager drops the synchronous standby, and is ended
then like any other lost session of ours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pgvpn.errors import DatabaseError

log = logging.getLogger(__name__)

#: The lock sql/003's pgvpn.ensure_partitions() takes for the length of its transaction.
MAINTENANCE_LOCK = "pgvpn.ensure_partitions"
TERMINATE_WAIT_MS = 5000  # how long to wait for an ended session to let go of its locks
SYNC_REP_POLL = 0.1  # seconds between looks at a lost session that waits for a standby

# An advisory lock on a bigint key shows in pg_locks as classid (high 32 bits),
# objid (low 32 bits) and objsubid 1.
HOLDERS = """
SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.backend_start, a.state,
       a.state_change,
       a.usename = session_user AND a.application_name = current_setting('application_name'),
       a.wait_event
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
    wait_event: str | None = None

    @property
    def committing(self) -> bool:
        """Waiting for the synchronous standby to confirm its commit: never ended."""
        return self.wait_event == "SyncRep"

    def __str__(self) -> str:
        where = f" from {self.client}" if self.client else ""
        since = f", connected {self.since:%Y-%m-%d %H:%M:%S %Z}" if self.since else ""
        state = (f", {self.state} since {self.state_change:%H:%M:%S}"
                 if self.state and self.state_change else "")
        waits = ", waiting for the synchronous standby (SyncRep)" if self.committing else ""
        return (f"pid {self.pid}, {self.user}{where}, application_name "
                f"{self.application_name!r}{since}{state}{waits}")


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
    for `peer` (the session's own), ending our own lost session that holds it, once
    it no longer waits for the synchronous standby (for at most the connection's
    lock_timeout).

    Raises DatabaseError, naming the holder, if another agent holds it, or if our lost
    session still waits for the standby after that.
    """
    key, what = f"pgvpn.{purpose}.{peer}", f"the {purpose} for {peer!r}"
    deadline: float | None = None  # while our lost session waits for the standby
    retried = False
    found: list[Holder] = []
    while not _try_lock(conn, purpose):
        current = holders(conn, key)
        found = current or found
        if not all(h.ours for h in current):
            break  # another agent's: refused below
        waiting = [h for h in current if h.committing]
        for stale in (h for h in current if not h.committing):
            log.warning("%s: ending this agent's own lost session that still holds the "
                        "lock (%s)", what, stale)
            conn.execute("SELECT pg_terminate_backend(%s, %s)", [stale.pid, TERMINATE_WAIT_MS])
        if not waiting:
            if retried:
                break  # ended (or let go), and still taken: refused below
            retried = True
            continue
        if deadline is None:
            deadline = time.monotonic() + _lock_timeout(conn)
            log.warning("%s: this agent's own lost session holds the lock and waits for "
                        "the synchronous standby to confirm its commit (%s): waiting for "
                        "it, not ending it (its commit would count without the standby)",
                        what, "; ".join(map(str, waiting)))
        if time.monotonic() >= deadline:
            raise DatabaseError(
                f"{what}: this agent's own lost session still waits for the synchronous "
                f"standby to confirm its commit ({'; '.join(map(str, waiting))}); it is not "
                "ended, since its commit would then count without the standby: it lets go "
                "once the standby confirms or the cluster manager drops it (retried)")
        time.sleep(SYNC_REP_POLL)
    else:
        return
    found = holders(conn, key) or found
    raise DatabaseError(f"another agent is already {what} ({'; '.join(map(str, found))}): "
                        "stop it first, or give this one another name; if it is gone, the "
                        "server ends its session once its TCP keepalives go unanswered")


def _lock_timeout(conn: psycopg.Connection) -> float:
    """The connection's lock_timeout in seconds (TERMINATE_WAIT_MS if it has none)."""
    row = conn.execute("SELECT extract(epoch FROM current_setting('lock_timeout')::interval)"
                       ).fetchone()
    seconds = float(row[0]) if row and row[0] is not None else 0.0
    return seconds if seconds > 0 else TERMINATE_WAIT_MS / 1000
