"""Integration: an agent's life between its start and its stop.

While it runs, the control connection heartbeats (`pgvpn.peers.last_seen` moves),
and is replaced when it is lost, the data path untouched. SIGTERM (what `lab stop`
and `docker stop` send) stops it cleanly: it says so with its totals, removes its
TUN device, exits 0, and leaves no session and no lock behind, so that its next
start takes over at once. An error of the data path that no reconnect can fix
stops it loudly: the traceback, and one last line that says what stopped it.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from lab.measure import ping
from pgvpn.locks import holders
from tests.conftest import CliBackend, LabHandle
from tests.peerside import (
    agent_log,
    agent_running,
    docker_state,
    lab_cli,
    log_mark,
    log_since,
    owner_execute,
    wait_for,
)

PEER_A = "10.230.0.1"
STOPPED = "peer peer-b: stopped; sent "


def last_seen(lab: LabHandle, peer: str) -> datetime:
    (seen,), = lab.sql("SELECT last_seen FROM pgvpn.peers WHERE name = %s", [peer])
    assert isinstance(seen, datetime)
    return seen


def test_the_heartbeat_moves_last_seen(any_lab: LabHandle) -> None:
    first = last_seen(any_lab, "peer-a")
    # every 5 s (agent.HEARTBEAT_SECONDS): two beats within 20 s on a loaded machine
    wait_for(lambda: last_seen(any_lab, "peer-a") > first, "a heartbeat", timeout=20)
    second = last_seen(any_lab, "peer-a")
    wait_for(lambda: last_seen(any_lab, "peer-a") > second, "another heartbeat", timeout=20)


def test_a_lost_control_connection_is_replaced(any_lab: LabHandle) -> None:
    (pid, name), = lab_sessions(any_lab, "peer-a", "control")
    mark = log_mark(any_lab, "peer-a")
    any_lab.sql("SELECT pg_terminate_backend(%s, 5000)", [pid], superuser=True)
    ended = last_seen(any_lab, "peer-a")
    wait_for(lambda: last_seen(any_lab, "peer-a") > ended, "a heartbeat after the loss",
             timeout=30)
    (new_pid, new_name), = lab_sessions(any_lab, "peer-a", "control")
    assert new_pid != pid and new_name == name  # the same process, another session
    said = log_since(any_lab, "peer-a", mark)
    assert "(control connection lost)" in said, agent_log(any_lab, "peer-a", 50)
    assert ping(CliBackend(any_lab), "peer-a", "10.230.0.2", count=2).received == 2


def lab_sessions(lab: LabHandle, peer: str, job: str) -> list[tuple[int, str]]:
    """The peer's agent sessions for `job` (application_name `pgvpn PEER JOB MARK`)."""
    return [(int(pid), str(name)) for pid, name in lab.sql(
        "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
        [f"pgvpn {peer} {job} %"], superuser=True)]


def agent_sessions(lab: LabHandle, peer: str) -> list[tuple[int, str]]:
    role = "pgvpn_" + peer.replace("-", "_")
    return [(int(pid), str(name)) for pid, name in lab.sql(
        "SELECT pid, application_name FROM pg_stat_activity WHERE usename = %s",
        [role], superuser=True)]


def held_locks(lab: LabHandle, peer: str) -> list[str]:
    """Which of the peer's sender and receiver locks some session holds (pgvpn.locks)."""
    keys = [f"pgvpn.{purpose}.{peer}" for purpose in ("sender", "receiver")]
    with psycopg.connect(lab.conninfo(superuser=True), autocommit=True) as conn:
        return [key for key in keys if holders(conn, key)]


def test_sigterm_stops_cleanly_and_leaves_nothing_behind(any_lab: LabHandle) -> None:
    assert len(held_locks(any_lab, "peer-b")) == 2  # running: its sender and receiver
    assert agent_sessions(any_lab, "peer-b")
    stopped0 = agent_log(any_lab, "peer-b", 100_000).count(STOPPED)
    lab_cli(any_lab, "stop", "peer-b")
    try:
        log = agent_log(any_lab, "peer-b", 100_000)
        assert log.count(STOPPED) == stopped0 + 1, log[-2000:]
        last = log[log.rindex("received SIGTERM, stopping"):]
        assert STOPPED in last and "Traceback" not in last, last
        if any_lab.backend == "docker":
            assert docker_state(any_lab, "peer-b", "ExitCode") == 0
        else:  # the namespace outlives the agent: its TUN device must be gone from it
            shown = any_lab.exec("peer-b", "ip", "link", "show", "pgvpn0", check=False)
            assert shown.returncode != 0 and "does not exist" in shown.stderr, shown
        # the server saw it leave: no session, no lock
        wait_for(lambda: not agent_sessions(any_lab, "peer-b"), "peer-b's sessions to end",
                 timeout=10)
        assert held_locks(any_lab, "peer-b") == []
    finally:
        lab_cli(any_lab, "start", "peer-b")
    assert ping(CliBackend(any_lab), "peer-a", "10.230.0.2", count=2).received == 2
    assert ping(CliBackend(any_lab), "peer-b", PEER_A, count=2).received == 2


def test_a_data_path_error_no_reconnect_fixes_stops_the_agent_loudly(
        netns_lab: LabHandle) -> None:
    """The owner makes the log refuse peer-a's rows (a CHECK, NOT VALID: old rows stay):
    its uplink's write (here the INSERT of a small batch) fails with 23514, which
    neither a retry nor a reconnect can fix.
    Namespaces only: a container's restart policy would start it again at once."""
    mark = log_mark(netns_lab, "peer-a")
    owner_execute(netns_lab, "ALTER TABLE pgvpn.packets ADD CONSTRAINT lifecycle_refuses_a "
                  "CHECK (sender <> 'peer-a') NOT VALID")
    try:
        netns_lab.exec("peer-a", "ping", "-c3", "-i0.3", "-W1", "10.230.0.2", check=False)
        wait_for(lambda: not agent_running(netns_lab, "peer-a"), "peer-a's agent to stop",
                 timeout=30)
        log = log_since(netns_lab, "peer-a", mark)
        assert "pump-up failed" in log and "Traceback" in log, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith("pgvpn: error: agent stopped: CheckViolation("), last
        assert "lifecycle_refuses_a" in last
        shown = netns_lab.exec("peer-a", "ip", "link", "show", "pgvpn0", check=False)
        assert shown.returncode != 0, shown  # its TUN device went with it
    finally:
        owner_execute(netns_lab, "ALTER TABLE pgvpn.packets DROP CONSTRAINT IF EXISTS "
                      "lifecycle_refuses_a")
        lab_cli(netns_lab, "start", "peer-a")
    assert ping(CliBackend(netns_lab), "peer-a", "10.230.0.2", count=2).received == 2
