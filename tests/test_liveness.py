"""Liveness on real networks: paths that silently drop, sessions the server keeps,
housekeeping that fails, and locks held by someone else at start.

Faults are nftables rules inside an agent's host (its namespace or container):
they drop, never reject, so neither end hears of the cut (no RST, no ICMP).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from lab.measure import ping
from pgvpn.locks import MAINTENANCE_LOCK
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_log, connect_as, lab_cli, owner_execute, wait_for

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
PG_PORT = 5432
FAULT_TABLE = "pgvpn_fault"


def database_ports(lab: LabHandle, host: str) -> list[int]:
    """The local ports of the host's established connections to the database."""
    shown = lab.exec(host, "ss", "-tnH", "state", "established", f"( dport = :{PG_PORT} )")
    return [int(line.split()[-2].rsplit(":", 1)[1]) for line in shown.stdout.splitlines()]


@contextlib.contextmanager
def database_path_cut(lab: LabHandle, host: str, ports: list[int] | None = None
                      ) -> Iterator[None]:
    """Drop the host's TCP traffic with the database both ways, silently: all of it
    (a black hole), or only the flows of `ports` (a NAT that forgot them; new
    connections pass)."""
    flows = f" {{ {', '.join(map(str, ports))} }}" if ports else ""
    out = f"tcp sport{flows} tcp dport {PG_PORT}" if ports else f"tcp dport {PG_PORT}"
    back = f"tcp dport{flows} tcp sport {PG_PORT}" if ports else f"tcp sport {PG_PORT}"
    lab.exec(host, "nft", f"add table inet {FAULT_TABLE}; "
             f"add chain inet {FAULT_TABLE} out {{ type filter hook output priority 0; }}; "
             f"add chain inet {FAULT_TABLE} in {{ type filter hook input priority 0; }}; "
             f"add rule inet {FAULT_TABLE} out {out} drop; "
             f"add rule inet {FAULT_TABLE} in {back} drop")
    try:
        yield
    finally:
        lab.exec(host, "nft", f"delete table inet {FAULT_TABLE}")


def sessions(conn: psycopg.Connection, peer: str) -> dict[int, tuple[str, datetime]]:
    """An agent's database sessions: pid -> (job, backend_start).

    `conn` is the server's superuser's: the owner of pgvpn sees no other role's
    client port or start time, and may end no other role's session.
    """
    rows = conn.execute("SELECT pid, application_name, backend_start FROM pg_stat_activity "
                        "WHERE application_name LIKE %s", [f"pgvpn {peer} %"]).fetchall()
    return {pid: (name.split()[2], started) for pid, name, started in rows}


def seconds_until_ping(lab: LabHandle, host: str, target: str, timeout: int = 30) -> float:
    """How long until an echo crosses the tunnel and back (one every 0.2 s, each
    waited for until the first reply); fails after `timeout` seconds."""
    started = time.monotonic()
    done = lab.exec(host, "ping", "-n", "-q", "-c", "1", "-i", "0.2", "-w", str(timeout),
                    target, check=False, timeout=timeout + 30)
    assert done.returncode == 0, f"{host} -> {target}: no answer in {timeout}s"
    return time.monotonic() - started


def background_pings(lab: LabHandle, seconds: int) -> threading.Thread:
    """Traffic from peer-a through the tunnel, so that its uplink has batches to send."""
    thread = threading.Thread(target=lambda: lab.exec(
        "peer-a", "ping", "-q", "-i", "0.2", "-w", str(seconds), PEER_B, check=False,
        timeout=seconds + 30))
    thread.start()
    return thread


@pytest.mark.slow
def test_a_path_that_drops_everything_for_60s_recovers_within_10s_of_its_return(
        any_lab: LabHandle) -> None:
    assert seconds_until_ping(any_lab, "peer-a", PEER_B) < 5
    lost = r"(uplink|downlink): database connection lost \([^)]*timed out"
    noticed_before = len(re.findall(lost, agent_log(any_lab, "peer-a", tail=5000)))
    traffic = background_pings(any_lab, 50)
    with database_path_cut(any_lab, "peer-a"):
        time.sleep(60)
        # keepalives and the user timeout noticed the dead path during the cut: without
        # them a SELECT or COPY waits for the kernel's retransmissions (~15 min)
        noticed = re.findall(lost, agent_log(any_lab, "peer-a", tail=5000))[noticed_before:]
        assert {"uplink", "downlink"} <= set(noticed), noticed
    recovered = seconds_until_ping(any_lab, "peer-a", PEER_B)
    traffic.join(timeout=60)
    print(f"tunnel carried traffic again {recovered:.1f}s after the path returned")
    assert recovered <= 10
    assert seconds_until_ping(any_lab, "peer-b", PEER_A) < 5


def test_a_listener_flow_the_nat_forgot_is_noticed_and_replaced(any_lab: LabHandle) -> None:
    """Only the flow of the connection that LISTENs (the downlink's, which also reads)
    is dropped while the tunnel is idle: without keepalives and the user timeout, its
    idle poll would wait for the kernel's retransmissions and no wake-up would come."""
    with psycopg.connect(any_lab.conninfo(superuser=True), autocommit=True) as server:
        (old, port), = server.execute(
            "SELECT pid, client_port FROM pg_stat_activity WHERE application_name "
            "LIKE 'pgvpn peer-b downlink %'").fetchall()
        cut_at = time.monotonic()
        with database_path_cut(any_lab, "peer-b", [port]):
            wait_for(lambda: [p for p, (job, _) in sessions(server, "peer-b").items()
                              if job == "downlink" and p != old], "a new downlink",
                     timeout=40)
            replaced = time.monotonic() - cut_at
    print(f"the LISTENing downlink replaced {replaced:.1f}s after its flow was cut")
    assert replaced < 25
    assert re.search(r"downlink: database connection lost \([^)]*timed out",
                     agent_log(any_lab, "peer-b"))
    assert seconds_until_ping(any_lab, "peer-a", PEER_B) < 5


def server_log_end(lab: LabHandle, pid: int) -> datetime:
    """When the server says backend `pid` ended by an administrator's command."""
    for line in lab.cli("logs", "postgres", "--tail", "5000").stdout.splitlines():
        if f"[{pid}]" in line and "terminating connection due to administrator command" in line:
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC ", line)
            assert stamp, f"the server log is not in UTC: {line}"
            return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    raise AssertionError(f"the server log does not say backend {pid} was terminated")


def test_a_lost_session_the_server_keeps_is_taken_over_by_its_own_agent(
        any_lab: LabHandle) -> None:
    """A NAT forgets the agent's flows: new connections pass, the old ones are dropped
    without a RST, so the server keeps the old sessions and their locks (until its
    own keepalives give up, 25 s in the lab). The agent ends them itself."""
    assert seconds_until_ping(any_lab, "peer-a", PEER_B) < 5
    with psycopg.connect(any_lab.conninfo(superuser=True), autocommit=True) as server:
        before = sessions(server, "peer-a")
        old = {job: pid for pid, (job, _) in before.items()}
        traffic = background_pings(any_lab, 30)
        cut_at = time.monotonic()
        with database_path_cut(any_lab, "peer-a", database_ports(any_lab, "peer-a")):
            recovered = seconds_until_ping(any_lab, "peer-a", PEER_B, timeout=60)
            took_over = time.monotonic() - cut_at
            wait_for(lambda: not set(old.values()) & set(sessions(server, "peer-a")),
                     "the lost sessions to end", timeout=30)
            after = sessions(server, "peer-a")
        traffic.join(timeout=60)
    print(f"tunnel back {took_over:.1f}s after the flows were cut ({recovered:.1f}s of pings)")
    # sooner than the server's own keepalives (10 s + 3 x 5 s) would have freed the locks
    assert took_over < 25
    log = agent_log(any_lab, "peer-a", tail=5000)
    for job, lock in (("uplink", "the sender for 'peer-a'"),
                      ("downlink", "the receiver for 'peer-a'")):
        # the agent ended exactly its own lost session, which still held the lock ...
        assert re.search(rf"{re.escape(lock)}: ending this agent's own lost session that "
                         rf"still holds the lock \(pid {old[job]}, ", log), job
        # ... while it was still there: the new session of that job began before the
        # server ended the old one by the agent's command
        (new_pid, (_, new_start)), = [(p, s) for p, s in after.items() if s[0] == job]
        assert new_pid != old[job] and new_start <= server_log_end(any_lab, old[job]), job


def test_a_live_agent_holding_the_sender_lock_is_refused_never_ended(
        any_lab: LabHandle) -> None:
    """Another session of peer-a's own role takes the sender lock, as a second agent
    would: peer-a's uplink must say who holds it and leave that session alone."""
    with psycopg.connect(any_lab.conninfo(superuser=True), autocommit=True) as server, \
            connect_as(any_lab, "peer-a") as rival:
        uplink, = [p for p, (job, _) in sessions(server, "peer-a").items() if job == "uplink"]
        server.execute("SELECT pg_terminate_backend(%s, 5000)", [uplink])

        def taken() -> bool:
            row = rival.execute("SELECT pgvpn.lock_own('sender')").fetchone()
            return bool(row and row[0])

        wait_for(taken, "the rival to take the sender lock", timeout=10)
        rival_pid = rival.info.backend_pid
        traffic = background_pings(any_lab, 8)
        refused = (rf"uplink: reconnect failed: another agent is already the sender for "
                   rf"'peer-a' \(pid {rival_pid}, pgvpn_peer_a")
        wait_for(lambda: re.search(refused, agent_log(any_lab, "peer-a")),
                 "the uplink to refuse", timeout=20)
        traffic.join(timeout=60)
        assert rival.execute("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                             "AND locktype = 'advisory'").fetchone() == (1,)
    # the rival is gone: the uplink takes the lock on its next try
    assert seconds_until_ping(any_lab, "peer-a", PEER_B, timeout=20) < 20


def test_failing_log_maintenance_leaves_the_data_path_running(any_lab: LabHandle) -> None:
    lab_cli(any_lab, "stop", "peer-b")
    lab_cli(any_lab, "start", "peer-b", env={"PGVPN_MAINTENANCE_INTERVAL": "1"})
    grant = "EXECUTE ON FUNCTION pgvpn.ensure_partitions FROM pgvpn_agent"
    failed = r"partition maintenance failed: permission denied for function ensure_partitions"
    try:
        owner_execute(any_lab, f"REVOKE {grant}")
        wait_for(lambda: len(re.findall(failed, agent_log(any_lab, "peer-b"))) >= 3,
                 "three failed maintenance runs", timeout=30)
        for host, target in (("peer-b", PEER_A), ("peer-a", PEER_B)):
            assert ping(CliBackend(any_lab), host, target, count=3, interval=0.2).received == 3
    finally:
        owner_execute(any_lab, f"GRANT {grant.replace(' FROM ', ' TO ')}")
        lab_cli(any_lab, "restart", "peer-b")  # back to the lab's own settings


def test_start_is_bounded_and_says_why_while_the_maintenance_lock_is_held(
        any_lab: LabHandle) -> None:
    with psycopg.connect(any_lab.conninfo(), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [MAINTENANCE_LOCK])
        started = time.monotonic()
        lab_cli(any_lab, "restart", "peer-b", timeout=120)
        took = time.monotonic() - started
        log = agent_log(any_lab, "peer-b", tail=50)
        assert re.search(rf"partition maintenance: waiting up to 5s for the lock "
                         rf"{MAINTENANCE_LOCK}, held by pid {holder.info.backend_pid}, ", log)
        assert ("partition maintenance at start failed: canceling statement due to lock "
                "timeout; trying again in 60s") in log
        # the tunnel runs while the lock is still held
        assert ping(CliBackend(any_lab), "peer-b", PEER_A, count=2, interval=0.2).received == 2
    print(f"agent restarted in {took:.1f}s while the maintenance lock was held")
