"""The two guards of a sender's gap-free `seq` (services/pgvpn/transports/batched.py),
each made to act on the namespace lab:

- one writer per sender: a second agent with peer-a's name and settings is refused by
  the database-side sender lock while the first one runs on;
- the ambiguous commit: the uplink's connection loses the server's reply to a batch
  that committed (a small one's INSERT, a bulk one's COPY), and the batch is logged
  once, not resent, after the reconnect.

Namespaces only: a second agent runs beside the first in peer-a's namespace, with the
environment the lab started the first one with (its /proc environ), and the agent's
log is read from the lab's file at a known offset.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from lab.measure import ping
from pgvpn.transports.batched import MAX_SEQ
from tests.conftest import ROOT, CliBackend, LabHandle
from tests.peerside import agent_pid, owner_execute, wait_for
from tests.test_tunnel import logged_between, quiet_snapshot

PEER_B = "10.230.0.2"
PG_PORT = 5432
SECOND_TUN = "pgvpn9"  # the second agent's own device: pgvpn0 is the first one's
CUT_TABLE = "pgvpn_ambiguous"


def agent_environment(lab: LabHandle, host: str) -> dict[str, str]:
    """The environment the lab started the host's agent with: its settings, exactly."""
    raw = Path(f"/proc/{agent_pid(lab, host)}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def log_offset(lab: LabHandle, host: str) -> int:
    return (lab.state_dir / "netns" / "logs" / f"{host}.log").stat().st_size


def log_since(lab: LabHandle, host: str, offset: int) -> str:
    """What the host's agent logged after `offset` (log_offset) bytes."""
    with open(lab.state_dir / "netns" / "logs" / f"{host}.log", "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def uplink_sessions(server: psycopg.Connection, peer: str) -> list[tuple[int, str, int]]:
    """The pid, application_name and client port of each uplink session of `peer`
    (`server` is the superuser's: the owner sees no other role's client port)."""
    return server.execute(
        "SELECT pid, application_name, client_port FROM pg_stat_activity "
        "WHERE application_name LIKE %s ORDER BY backend_start",
        [f"pgvpn {peer} uplink %"]).fetchall()


def stream_since(lab: LabHandle, sender: str, mark: int, started: datetime,
                 upto: int = MAX_SEQ) -> tuple[int, int, int, int]:
    """Rows, distinct seqs, first and last seq of `sender`'s rows numbered past `mark`
    or logged since `started`, up to seq `upto`: whole means rows = distinct =
    last - first + 1."""
    (rows, distinct, first, last), = lab.sql(
        "SELECT count(*), count(DISTINCT seq), coalesce(min(seq), 0), coalesce(max(seq), 0) "
        "FROM pgvpn.packets WHERE sender = %s AND (seq > %s OR logged_at >= %s) "
        "AND seq <= %s", [sender, mark, started, upto])
    return int(rows), int(distinct), int(first), int(last)


@contextlib.contextmanager
def repeats_removed(lab: LabHandle, sender: str, started: datetime) -> Iterator[None]:
    """Afterwards no seq of `sender` logged since `started` is there twice (the later
    row goes): a failed check here must not fail the gap-free checks of later tests."""
    try:
        yield
    finally:
        owner_execute(lab, "DELETE FROM pgvpn.packets p WHERE sender = %s "
                      "AND logged_at >= %s AND EXISTS (SELECT FROM pgvpn.packets q "
                      "WHERE q.sender = p.sender AND q.seq = p.seq AND q.id < p.id)",
                      [sender, started])


def pings(lab: LabHandle, count: int, size: int = 56) -> threading.Thread:
    """`count` echoes of `size` bytes from peer-a through the tunnel, one every 0.2 s."""
    thread = threading.Thread(target=lambda: lab.exec(
        "peer-a", "ping", "-q", "-n", "-c", str(count), "-i", "0.2", "-s", str(size),
        "-W", "15", PEER_B, check=False, timeout=count * 0.2 + 60))
    thread.start()
    return thread


def server_now(lab: LabHandle) -> tuple[int, datetime]:
    """peer-a's highest logged seq, and the server's clock."""
    (mark, now), = lab.sql("SELECT (SELECT coalesce(max(seq), 0) FROM pgvpn.packets "
                           "WHERE sender = 'peer-a'), clock_timestamp()")
    return int(mark), now


def second_agent(lab: LabHandle, host: str, env: dict[str, str], timeout: float = 60
                 ) -> subprocess.CompletedProcess[str]:
    """`pgvpn run` in `host` with `env`, until it exits; one still running after
    `timeout` s was not refused: it is stopped (SIGTERM, its clean stop) and its
    output returned with the exit code that stop gave."""
    argv = ["ip", "netns", "exec", lab.namespace(host), sys.executable, "-m", "pgvpn.cli",
            "run"]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                out, err = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate(timeout=30)
            err += f"\n(still running after {timeout:.0f}s: stopped by the test)"
        return subprocess.CompletedProcess(argv, process.returncode, out, err)


def test_a_second_agent_with_the_same_name_is_refused_and_the_first_runs_on(
        netns_lab: LabHandle) -> None:
    """The second agent has peer-a's settings but its own TUN device, with peer-a's
    address as a /32 (no second route beside pgvpn0's), so that only the database can
    refuse it: the sender lock its uplink takes before numbering anything."""
    lab = netns_lab
    assert ping(CliBackend(lab), "peer-a", PEER_B, count=2).received == 2
    first_agent = agent_pid(lab, "peer-a")
    env = agent_environment(lab, "peer-a")
    env.pop("TUN_IP6", None)
    # its own metrics port (none): the first agent's is taken, and must not refuse it first
    env.update(PGVPN_TUN_NAME=SECOND_TUN, TUN_IP=env["TUN_IP"].split("/")[0] + "/32",
               PGVPN_METRICS_LISTEN="")
    mark, started = server_now(lab)
    with psycopg.connect(lab.conninfo(superuser=True), autocommit=True) as server, \
            repeats_removed(lab, "peer-a", started):
        (holder, holder_name, _), = uplink_sessions(server, "peer-a")
        traffic = pings(lab, 40)
        second = second_agent(lab, "peer-a", env)
        traffic.join(timeout=90)
        # the first agent's uplink session was never ended by the second agent
        assert server.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                              [holder]).fetchall() == [(holder_name,)]
        rows, distinct, first, last = stream_since(lab, "peer-a", mark, started)

    # refused, exit 2, with one line that names the first agent's uplink session
    errors = [line for line in second.stderr.splitlines() if line.startswith("pgvpn: error:")]
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert len(errors) == 1 and second.stderr.splitlines()[-1] == errors[0], second.stderr
    assert re.fullmatch(
        rf"pgvpn: error: another agent is already the sender for 'peer-a' \(pid {holder}, "
        rf"pgvpn_peer_a from [0-9.]+, application_name '{re.escape(holder_name)}', "
        r"connected .*\): stop it first, or give this one another name; .*", errors[0]
    ), errors[0]
    assert "ending this agent's own lost session" not in second.stderr
    # its TUN device went with it; the first agent runs on and its stream is whole
    shown = lab.exec("peer-a", "ip", "link", "show", SECOND_TUN, check=False)
    assert shown.returncode != 0, shown.stdout
    assert agent_pid(lab, "peer-a") == first_agent
    assert Path(f"/proc/{first_agent}").exists()
    assert rows == distinct == last - first + 1 > 0 and first == mark + 1, \
        (rows, distinct, first, last, mark)
    assert ping(CliBackend(lab), "peer-a", PEER_B, count=3).received == 3


@contextlib.contextmanager
def replies_lost_after_data(lab: LabHandle, host: str, port: int, size: int = 1000
                            ) -> Iterator[None]:
    """Once the host's connection from `port` sends the database a segment larger than
    `size` bytes (a batch's data, by COPY or by the small-batch INSERT; other
    statements are smaller), drop everything the server sends back on it, ACKs
    included; what the client sends still passes. So that batch reaches the server and
    commits, and its reply is lost: an ambiguous commit, whenever the next large batch
    goes. New connections pass."""
    lab.exec(host, "nft", f"add table inet {CUT_TABLE}; "
             f"add set inet {CUT_TABLE} cut {{ type inet_service; flags dynamic; }}; "
             f"add chain inet {CUT_TABLE} out {{ type filter hook output priority 0; }}; "
             f"add chain inet {CUT_TABLE} in {{ type filter hook input priority 0; }}; "
             f"add rule inet {CUT_TABLE} out tcp sport {port} tcp dport {PG_PORT} "
             f"meta length > {size} add @cut {{ tcp sport }}; "
             f"add rule inet {CUT_TABLE} in tcp sport {PG_PORT} tcp dport @cut drop")
    try:
        yield
    finally:
        lab.exec(host, "nft", f"delete table inet {CUT_TABLE}")


def cut_triggered(lab: LabHandle, host: str, port: int) -> bool:
    listed = lab.exec(host, "nft", "list", "set", "inet", CUT_TABLE, "cut").stdout
    return re.search(rf"elements = {{ {port} }}", listed) is not None


@contextlib.contextmanager
def held_agent(lab: LabHandle, host: str) -> Iterator[None]:
    """The host's agent frozen (SIGSTOP) meanwhile: packets queue in its TUN device, and
    the agent reads them as one batch when it goes on (SIGCONT)."""
    pid = agent_pid(lab, host)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("batch", ["small", "bulk"])
def test_a_batch_whose_commit_reply_was_lost_is_logged_once_and_the_stream_goes_on(
        netns_lab: LabHandle, batch: str) -> None:
    """The uplink waits for a reply that never comes until its TCP user timeout (10 s),
    reconnects, ends its own lost session, rereads its highest committed seq and finds
    the batch there: it goes on with the next seq instead of logging it twice.

    Both of the uplink's writes: a small batch (one echo: the INSERT that notifies) and
    a bulk one (20 echoes queued while the agent is frozen: COPY, then NOTIFY)."""
    lab = netns_lab
    tun_a0, tun_b0, logged0 = quiet_snapshot(lab)
    mark, (_, started) = logged0["peer-a"], server_now(lab)
    offset = log_offset(lab, "peer-a")
    with psycopg.connect(lab.conninfo(superuser=True), autocommit=True) as server, \
            repeats_removed(lab, "peer-a", started):
        (old, _, port), = uplink_sessions(server, "peer-a")
        with replies_lost_after_data(lab, "peer-a", port):
            if batch == "bulk":
                with held_agent(lab, "peer-a"):
                    # straight into the namespace: `lab exec` may take longer to start
                    burst = subprocess.Popen(
                        ["ip", "netns", "exec", lab.namespace("peer-a"), "ping", "-q", "-n",
                         "-c", "20", "-i", "0.002", "-s", "1200", "-W", "15", PEER_B],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.5)  # all 20 queued in the TUN device: one batch of 20
            traffic = pings(lab, 100, size=1200)  # each one a batch larger than the trigger
            wait_for(lambda: cut_triggered(lab, "peer-a", port), "a batch to be sent",
                     timeout=20)
            # the agent ends its lost session itself when it takes the sender lock over
            wait_for(lambda: [s[0] for s in uplink_sessions(server, "peer-a")] not in ([], [old]),
                     "the uplink to reconnect", timeout=60)
            wait_for(lambda: old not in [s[0] for s in uplink_sessions(server, "peer-a")],
                     "the lost uplink session to end", timeout=30)
        traffic.join(timeout=120)
        assert not traffic.is_alive()
        if batch == "bulk":
            burst.wait(timeout=60)
        tun_a1, tun_b1, logged1 = quiet_snapshot(lab)
        rows, distinct, first, last = stream_since(lab, "peer-a", mark, started,
                                                   logged1["peer-a"])
        logged = logged_between(lab, logged0, logged1)

    # every packet peer-a's agent read from its TUN is one row: none twice, none missing
    sent_by_a = tun_a1["tx"] - tun_a0["tx"]
    assert rows == distinct == last - first + 1 == sent_by_a > 50, \
        (rows, distinct, first, last, sent_by_a)
    assert first == mark + 1 and last == logged1["peer-a"]
    assert logged["peer-a"] == sent_by_a
    # ... and reached peer-b once
    assert tun_b1["rx"] - tun_b0["rx"] == sent_by_a
    # the uplink lost its connection, and found the batch committed after reconnecting
    log = log_since(lab, "peer-a", offset)
    assert re.search(r"uplink: database connection lost \(", log), log
    committed = re.findall(r"uplink: the batch seq (\d+)\.\.(\d+) was committed before the "
                           r"connection was lost; not sent again", log)
    assert len(committed) == 1, log
    batch_first, batch_last = map(int, committed[0])
    assert mark < batch_first <= batch_last <= last
    # the write whose reply was lost: one echo by the INSERT, or the 20 by COPY
    assert batch_last - batch_first + 1 == (1 if batch == "small" else 20), committed
    assert ping(CliBackend(lab), "peer-a", PEER_B, count=3).received == 3


def icmp_checksum_ok(packet: bytes) -> bool:
    """The ICMP message of an IPv4 packet sums to 0xffff (ones' complement): intact."""
    message = packet[(packet[0] & 0x0F) * 4:]
    if len(message) % 2:
        message += b"\0"
    total = sum(int.from_bytes(message[i:i + 2], "big") for i in range(0, len(message), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@pytest.mark.parametrize("count", [2, 4, 5])
def test_a_batch_of_a_few_packets_is_logged_in_the_order_read(netns_lab: LabHandle,
                                                              count: int) -> None:
    """A frozen agent finds `count` echoes queued and reads them as one batch, which goes
    by the one-statement INSERT (at most 4 packets) or by COPY (5): either way its rows
    are numbered one after another in the order read, each with its own packet, intact,
    and every echo is answered."""
    lab = netns_lab
    mark, started = server_now(lab)
    with held_agent(lab, "peer-a"):
        burst = subprocess.Popen(
            ["ip", "netns", "exec", lab.namespace("peer-a"), "ping", "-q", "-n", "-c",
             str(count), "-i", "0.002", "-W", "10", PEER_B],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # all queued in the TUN device
    assert burst.wait(timeout=60) == 0  # every echo answered: both ways delivered
    rows = lab.sql("SELECT seq, data FROM pgvpn.packets WHERE sender = 'peer-a' AND seq > %s "
                   "AND logged_at >= %s ORDER BY seq", [mark, started])
    echoes = [(seq, bytes(data)) for seq, data in rows
              if data[0] >> 4 == 4 and data[9] == 1 and data[(data[0] & 0x0F) * 4] == 8]
    assert len(echoes) == count, rows
    seqs = [seq for seq, _ in echoes]
    assert seqs == list(range(seqs[0], seqs[0] + count))  # one batch, nothing between
    # ping numbers its echoes 1..count: the rows hold them in the order they were read
    assert [int.from_bytes(data[26:28], "big") for _, data in echoes] == list(
        range(1, count + 1))
    assert all(icmp_checksum_ok(data) for _, data in echoes)
