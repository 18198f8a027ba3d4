"""Integration, namespace lab: the agent's side of a database failover against the lab's
real Postgres (docs/ha-plan.md §4, residual risks 1 and 4).

- A lost session of ours that waits for the synchronous standby to confirm its commit
  (wait_event 'SyncRep') is waited for, never ended: ending it would make its commit
  visible without the standby. One node stands for a primary whose standby is gone:
  synchronous_standby_names = 'nobody' (ALTER SYSTEM, reset afterwards) makes every
  commit wait in SyncRep until it is reset, as Patroni resets it when it drops a lost
  synchronous standby.
- The host a connection was lost from is tried last; the one it was made to, first.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn import db, dbhosts
from pgvpn.errors import DatabaseError
from pgvpn.locks import take_own_lock
from pgvpn.transports.base import WAIT_FOR_FLUSH
from tests.conftest import LabHandle
from tests.peerside import wait_for

PEER = "hc-sync"
ROLE = "pgvpn_hc_sync"
MARK = f"pgvpn {PEER} uplink 5ca1ab1e"  # one process's mark (transports.base.Session)


@pytest.fixture
def sync_peer(netns_lab: LabHandle, tmp_path: Path) -> Iterator[str]:
    """A peer of this test's own (no agent holds its locks), and how its agent's
    connections log in: its role over the lab's socket, this process's mark."""
    def clean() -> None:
        netns_lab.sql("DELETE FROM pgvpn.peers WHERE name = %s", [PEER], superuser=True)
        netns_lab.sql(f"DROP ROLE IF EXISTS {ROLE}", superuser=True)

    clean()
    (tmp_path / "pw").write_text("a-password-long-enough-for-a-peer\n")
    netns_lab.pgvpn("db", "add-peer", PEER, "--password-file", str(tmp_path / "pw"))
    params: dict[str, Any] = conninfo_to_dict(netns_lab.conninfo())
    params.pop("password", None)
    params.update(user=ROLE, application_name=MARK)
    try:
        yield make_conninfo(**params)
    finally:
        clean()


def sync_standby_required(server: psycopg.Connection, names: str | None) -> None:
    """Set (or with None, reset) synchronous_standby_names for the whole server."""
    if names is None:
        server.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:  # a utility statement: no bind parameters
        server.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
            sql.Literal(names)))
    server.execute("SELECT pg_reload_conf()")


def wait_event(server: psycopg.Connection, pid: int) -> str | None:
    row = server.execute("SELECT coalesce(wait_event, '-') FROM pg_stat_activity "
                         "WHERE pid = %s", [pid]).fetchone()
    return row[0] if row else None


def test_a_lost_session_waiting_for_the_standby_is_waited_for_not_ended(
        netns_lab: LabHandle, sync_peer: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgvpn.locks")
    server = psycopg.connect(netns_lab.conninfo(superuser=True), autocommit=True)
    stale = psycopg.connect(sync_peer, autocommit=True)
    taker = psycopg.connect(sync_peer, autocommit=True)
    pid = stale.info.backend_pid
    try:
        assert stale.execute("SELECT pgvpn.lock_own('sender')").fetchone() == (True,)
        sync_standby_required(server, "nobody")
        wait_for(lambda: stale.execute("SHOW synchronous_standby_names").fetchone()
                 == ("nobody",), "the session to read the new setting", timeout=10)
        # the lost session's last commit (one that writes WAL: its heartbeat) waits for
        # a standby that is not there
        committing = threading.Thread(target=lambda: stale.execute(
            "UPDATE pgvpn.peers SET last_seen = now() WHERE name = %s", [PEER]), daemon=True)
        committing.start()
        wait_for(lambda: wait_event(server, pid) == "SyncRep", "the commit to wait in SyncRep",
                 timeout=10)

        # the reconnected agent waits its lock_timeout for it, then says why it stops
        taker.execute("SET lock_timeout = '1s'")
        started = time.monotonic()
        with pytest.raises(DatabaseError, match=(
                rf"the sender for '{PEER}': this agent's own lost session still waits for "
                rf"the synchronous standby to confirm its commit \(pid {pid}, {ROLE}.*"
                r"waiting for the synchronous standby \(SyncRep\)\); it is not ended")):
            take_own_lock(taker, "sender", PEER)
        assert 0.9 < time.monotonic() - started < 5
        assert wait_event(server, pid) == "SyncRep"  # alive, still waiting: not ended
        assert "waits for the synchronous standby to confirm its commit" in caplog.text
        assert "ending this agent's own lost session" not in caplog.text

        # the standby requirement goes (as Patroni drops a lost sync standby): the commit
        # returns, and only then is the idle lost session ended and the lock taken over
        taker.execute("SET lock_timeout = '30s'")
        failures: list[BaseException] = []

        def take() -> None:
            try:
                take_own_lock(taker, "sender", PEER)
            except BaseException as exc:  # reported by the assertion below
                failures.append(exc)

        taking = threading.Thread(target=take, daemon=True)
        taking.start()
        time.sleep(1)
        assert taking.is_alive() and wait_event(server, pid) == "SyncRep"
        sync_standby_required(server, None)
        taking.join(timeout=30)
        committing.join(timeout=10)
        assert not taking.is_alive() and not committing.is_alive()
        assert failures == []
        assert wait_event(server, pid) is None  # ended after its commit came back
        assert "ending this agent's own lost session" in caplog.text
        holder = server.execute(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = "
            "hashtextextended(%s, 0)", [f"pgvpn.sender.{PEER}"]).fetchall()
        assert holder == [(taker.info.backend_pid,)]
    finally:
        sync_standby_required(server, None)
        server.execute("SELECT pg_cancel_backend(%s)", [pid])  # if it still waits
        for conn in (stale, taker, server):
            conn.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers: a host that
    black-holes, where only connect_timeout ends an attempt."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def timed_connect(conninfo: str, order: dbhosts.HostOrder) -> tuple[psycopg.Connection, float]:
    started = time.monotonic()
    conn = db.connect(conninfo, hosts=order)
    return conn, time.monotonic() - started


def test_the_host_a_connection_was_lost_from_is_tried_last(netns_lab: LabHandle,
                                                           silent_port: int) -> None:
    """Two hosts: a silent one, then the lab's server. The first connection pays the
    silent one's connect_timeout; the next ones go straight to the server; once a
    connection to the server is lost, the server goes last again."""
    params = conninfo_to_dict(netns_lab.conninfo())
    conninfo = make_conninfo(netns_lab.conninfo(), host=f"127.0.0.1,{params['host']}",
                             port=f"{silent_port},{params.get('port') or 5432}",
                             connect_timeout=2)
    order = dbhosts.HostOrder()
    first, took = timed_connect(conninfo, order)
    with contextlib.closing(first):
        assert 1.8 < took < 4 and first.info.host == params["host"]
        second, took = timed_connect(conninfo, order)
        assert took < 1.5, took
        with psycopg.connect(netns_lab.conninfo(superuser=True), autocommit=True) as server:
            server.execute("SELECT pg_terminate_backend(%s)", [second.info.backend_pid])
        with pytest.raises(psycopg.errors.AdminShutdown) as raised:
            second.execute("SELECT 1")
        assert db.classify(raised.value) is db.Outcome.LOST
        second.close()  # what every reconnect does first: the server goes last
        third, took = timed_connect(conninfo, order)
        third.close()
        assert 1.8 < took < 4, took
        # a connection closed in good health moves nothing
        fourth, took = timed_connect(conninfo, order)
        fourth.close()
        assert took < 1.5, took
        fifth, took = timed_connect(conninfo, order)
        fifth.close()
        assert took < 1.5, took


@pytest.mark.parametrize(("given", "kept"), [("off", "on"), ("local", "on"),
                                             ("remote_write", "on"), ("on", "on"),
                                             ("remote_apply", "remote_apply")])
def test_an_agent_session_waits_for_the_flush_whatever_its_default(
        netns_lab: LabHandle, given: str, kept: str) -> None:
    """A weaker synchronous_commit from PGOPTIONS or the role's defaults does not win
    unseen: the agent's sessions commit at least as `on` promises (a stronger one is
    kept)."""
    conninfo = make_conninfo(netns_lab.conninfo(), options=f"-c synchronous_commit={given}")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(WAIT_FOR_FLUSH)
        assert conn.execute("SHOW synchronous_commit").fetchone() == (kept,)
