"""Integration: each peer's role, against the lab's real Postgres, can reach only its own.

The database enforces it (sql/004_peer_isolation.sql), so these tests talk to it as
the peer's role directly, not through the agent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from psycopg import errors

from lab.measure import ping
from pgvpn.copyformat import PACKET_COLUMNS, encode_packet_rows
from pgvpn.transports.batched import MAX_SEQ
from tests.conftest import ROOT, CliBackend, LabHandle
from tests.peerside import connect_as, owner_execute, peer_conninfo, temporary_lent

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"


@pytest.fixture
def traffic(any_lab: LabHandle) -> LabHandle:
    """Both peers have inbound packets in the log."""
    assert ping(CliBackend(any_lab), "peer-a", PEER_B, count=3, interval=0.2).received == 3
    any_lab.wait_settled()
    return any_lab


def test_a_peer_reads_only_packets_addressed_to_it(traffic: LabHandle) -> None:
    owner_view = dict(traffic.sql("SELECT receiver, count(*) FROM pgvpn.packets "
                                  "GROUP BY receiver"))
    assert owner_view["peer-a"] > 0 and owner_view["peer-b"] > 0
    with connect_as(traffic, "peer-a") as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM pgvpn.packets")
        assert conn.execute("SELECT count(*) FROM pgvpn.inbox WHERE receiver = 'peer-b'"
                            ).fetchone() == (0,)
        receivers = conn.execute("SELECT DISTINCT receiver FROM pgvpn.inbox").fetchall()
        assert receivers == [("peer-a",)]
        # the log tools' view and the partitions themselves are the owner's too
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM pgvpn.packet_headers")
        partition = traffic.sql("SELECT partition::text FROM pgvpn.log_partitions LIMIT 1")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"SELECT count(*) FROM {partition[0][0]}")


def test_a_leaky_function_sees_no_other_peers_rows(traffic: LabHandle) -> None:
    """security_barrier: the view filters before any function of the caller runs.

    Peers have no TEMPORARY (sql/005_trust.sql); it is lent here so that the view's
    own defence is what is tested.
    """
    seen: list[str] = []
    with temporary_lent(traffic, "peer-a"), connect_as(traffic, "peer-a") as conn:
        conn.add_notice_handler(lambda notice: seen.append(notice.message_primary or ""))
        conn.execute("CREATE FUNCTION pg_temp.leak(receiver text) RETURNS boolean "
                     "LANGUAGE plpgsql COST 0.0001 AS $$ BEGIN RAISE NOTICE 'saw %', "
                     "receiver; RETURN true; END $$")
        conn.execute("SELECT count(*) FROM pgvpn.inbox WHERE pg_temp.leak(receiver)")
    assert seen and set(seen) == {"saw peer-a"}


def test_a_peer_cannot_send_as_another(traffic: LabHandle) -> None:
    with connect_as(traffic, "peer-a") as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO pgvpn.packets (sender, seq, receiver, length, data) "
                         "VALUES ('peer-b', 1, 'peer-a', 1, '\\x45')")
        with pytest.raises(errors.InsufficientPrivilege), conn.cursor() as cur, cur.copy(
                "COPY pgvpn.packets (sender, seq, receiver, length, data) FROM STDIN"):
            pass
        # nor by becoming the group role: the peer is the session's login role
        conn.execute("SET ROLE pgvpn_agent")
        assert conn.execute("SELECT pgvpn.current_peer()").fetchone() == ("peer-a",)
        conn.execute("RESET ROLE")
        # what it may write is signed with its own name by the database: a row to
        # itself, rolled back, so the running agents never see it
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            with cur.copy(f"COPY pgvpn.packets ({PACKET_COLUMNS}) FROM STDIN (FORMAT BINARY)"
                          ) as copy:
                copy.write(encode_packet_rows("peer-a", MAX_SEQ, [b"\x45marker"]))
            assert cur.execute("SELECT sender FROM pgvpn.inbox WHERE seq = %s", [MAX_SEQ]
                               ).fetchall() \
                == [("peer-a",)]


MARKER = b"pgvpn isolation test"


def test_blog_profile_tables_are_isolated_too(traffic: LabHandle) -> None:
    owner_execute(traffic, "INSERT INTO pgvpn.blog_v1_packets (sender, receiver, payload) "
                "VALUES ('peer-a', 'peer-b', %s)", [MARKER])
    try:
        with connect_as(traffic, "peer-a") as conn:
            for table in ("pgvpn.blog_v1_packets", "pgvpn.blog_v2_packets"):
                with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
                    conn.execute(f"INSERT INTO {table} (sender, receiver, payload) "
                                 "VALUES ('peer-b', 'peer-a', %s)", [MARKER])
            # it flags as received only rows addressed to it
            assert conn.execute("UPDATE pgvpn.blog_v1_packets SET received = true "
                                "WHERE payload = %s", [MARKER]).rowcount == 0
        for peer, visible in (("peer-b", 1), ("peer-a", 1)):  # receiver, and sender
            with connect_as(traffic, peer) as conn:
                row = conn.execute("SELECT count(*) FROM pgvpn.blog_v1_packets "
                                   "WHERE payload = %s", [MARKER]).fetchone()
                assert row == (visible,), peer
    finally:
        owner_execute(traffic, "DELETE FROM pgvpn.blog_v1_packets WHERE payload = %s", [MARKER])
    owner_execute(traffic, "INSERT INTO pgvpn.blog_v2_packets (sender, receiver, payload) "
                "VALUES ('peer-b', 'peer-b', %s)", [MARKER])
    try:
        with connect_as(traffic, "peer-a") as conn:  # neither sender nor receiver
            assert conn.execute("SELECT count(*) FROM pgvpn.blog_v2_packets "
                                "WHERE payload = %s", [MARKER]).fetchone() == (0,)
    finally:
        owner_execute(traffic, "DELETE FROM pgvpn.blog_v2_packets WHERE payload = %s", [MARKER])


@pytest.mark.parametrize("statement", [
    "ALTER TABLE pgvpn.packets ADD COLUMN note text",
    "ALTER TABLE pgvpn.cursors DISABLE ROW LEVEL SECURITY",
    "DROP TABLE pgvpn.packets",
    "DROP VIEW pgvpn.inbox",
    "TRUNCATE pgvpn.packets",
    "DELETE FROM pgvpn.packets",
    "UPDATE pgvpn.packets SET receiver = 'peer-a'",
    "CREATE TABLE pgvpn.mine (x int)",
    "DROP POLICY own_cursors ON pgvpn.cursors",
    "ALTER TABLE pgvpn.packets ALTER COLUMN sender SET DEFAULT 'peer-b'",
])
def test_a_peer_cannot_change_or_drop_the_log(traffic: LabHandle, statement: str) -> None:
    with connect_as(traffic, "peer-a") as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_a_peer_sees_and_moves_only_its_own_cursors_and_peer_row(traffic: LabHandle) -> None:
    assert traffic.sql("SELECT count(*) FROM pgvpn.cursors WHERE receiver = 'peer-b'")[0][0] == 1
    with connect_as(traffic, "peer-a") as conn:
        assert conn.execute("SELECT * FROM pgvpn.cursors WHERE receiver = 'peer-b'"
                            ).fetchall() == []
        assert conn.execute("UPDATE pgvpn.cursors SET last_seq = 0 WHERE receiver = 'peer-b'"
                            ).rowcount == 0
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO pgvpn.cursors (receiver, sender) "
                         "VALUES ('peer-b', 'peer-b')")
        assert conn.execute("SELECT name FROM pgvpn.peers").fetchall() == [("peer-a",)]
        assert conn.execute("UPDATE pgvpn.peers SET tunnel_addr = '10.9.9.9' "
                            "WHERE name = 'peer-b'").rowcount == 0
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO pgvpn.peers (name) VALUES ('intruder')")


def test_an_agent_must_connect_as_its_own_peers_role(traffic: LabHandle) -> None:
    """Settings cannot make one peer's role send as another: the agent refuses to start."""
    env = {"PATH": "/usr/bin:/bin", "PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b",
           "TUN_IP": "10.230.0.1/24", "TUN_PEER": "10.230.0.2", "PGVPN_CONNECT_ATTEMPTS": "1"}
    for conninfo, message in (
            (peer_conninfo(traffic, "peer-b"), "the role of peer peer-b, but this agent is "
                                               "peer peer-a: connect as pgvpn_peer_a"),
            (traffic.conninfo(), "which is no peer's role")):
        done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run"], capture_output=True,
                              text=True, env={**env, "DATABASE_URL": conninfo}, cwd=ROOT,
                              timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


def test_owner_keeps_full_rights(traffic: LabHandle) -> None:
    """The operator sees everything, by design: it is a logging VPN."""
    senders = {s for (s,) in traffic.sql("SELECT DISTINCT sender FROM pgvpn.packets")}
    assert senders >= {"peer-a", "peer-b"}
    assert traffic.sql("SELECT count(*) FROM pgvpn.cursors")[0][0] >= 2


def test_secrets_stay_out_of_logs_status_and_the_server(any_lab: LabHandle) -> None:
    """The server keeps only SCRAM verifiers; no password shows in logs or `lab status`."""
    secrets = any_lab.state_dir / "secrets"
    passwords = [(secrets / name).read_text().strip() for name in ("owner", "pgvpn-owner")] + [
        (secrets / peer).read_text().strip().rsplit(":", 1)[1] for peer in ("peer-a", "peer-b")]
    stored = dict(any_lab.sql("SELECT rolname, rolpassword FROM pg_authid WHERE rolname "
                              "IN ('pgvpn_peer_a', 'pgvpn_peer_b', 'pgvpn_owner')",
                              superuser=True))
    assert len(stored) == 3
    assert all(v.startswith("SCRAM-SHA-256$4096:") for v in stored.values()), stored
    shown = (any_lab.cli("status", "--json").stdout + any_lab.cli("status").stdout
             + any_lab.cli("logs", "--tail", "100000").stdout)
    for password in passwords:
        assert len(password) >= 24 and password not in shown
    for peer in ("peer-a", "peer-b"):  # the key and the passwords are 0600
        assert (secrets / peer).stat().st_mode & 0o077 == 0
    assert (secrets / "server-key").stat().st_mode & 0o077 == 0


def test_the_database_host_routes_nothing_between_the_peers(any_lab: LabHandle) -> None:
    """A peer that routes the other peer's network through the postgres host gets
    nothing across: the database is the only path (ip_forward is off there, whatever
    the kernel's default for a new namespace, 1 on this machine)."""
    # both peers route the other's network through postgres (two peers that would
    # rather not be logged): the echo and its reply would both be forwarded
    routes = {"peer-a": ("10.231.2.0/24", "10.231.1.10"),
              "peer-b": ("10.231.1.0/24", "10.231.2.10")}
    for host, (prefix, via) in routes.items():
        any_lab.exec(host, "ip", "route", "replace", prefix, "via", via)
    try:
        assert ping(CliBackend(any_lab), "peer-a", "10.231.2.11", count=3).received == 0
        assert any_lab.exec("postgres", "cat", "/proc/sys/net/ipv4/ip_forward"
                            ).stdout.strip() == "0"
    finally:
        for host, (prefix, _) in routes.items():
            any_lab.exec(host, "ip", "route", "del", prefix)
