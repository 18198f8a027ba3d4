"""Integration: two agents and a real Postgres carry real traffic, and log all of it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dpkt

from lab.backends.base import LabError
from lab.measure import IperfResult, PingResult, iperf, ping
from tests.agentside import agent_memory, cursor
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_pid

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
PEER_A6, PEER_B6 = "fd00:230::1", "fd00:230::2"


def test_ping_both_ways_over_ipv4_and_ipv6(any_lab: LabHandle) -> None:
    backend = CliBackend(any_lab)
    for host, target in (("peer-a", PEER_B), ("peer-b", PEER_A),
                         ("peer-a", PEER_B6), ("peer-b", PEER_A6)):
        result = ping(backend, host, target, count=3, interval=0.2)
        assert result.received == 3, f"{host} -> {target}: {result}"


def test_a_late_reply_counts_as_received(netns_lab: LabHandle) -> None:
    """ping counts a reply that comes after its last probe's short linger as lost: once
    a reply has come, it waits only max(2 x the largest RTT, interval), here 1 s.
    lab.measure.ping counts every probe answered before its deadline. peer-b's agent is
    frozen as soon as it has read the second reply from its TUN (polled straight from
    the namespace's sysfs, every 10 ms), for 2.5 s: the third reply, due at about 2 s,
    comes at about 3.5 s."""
    pid = agent_pid(netns_lab, "peer-b")
    counter = ["ip", "netns", "exec", netns_lab.namespace("peer-b"), "cat",
               "/sys/class/net/pgvpn0/statistics/tx_packets"]

    def replies_read() -> int:
        return int(subprocess.run(counter, capture_output=True, text=True,
                                  check=True).stdout)

    before = replies_read()
    done: list[PingResult] = []
    pinging = threading.Thread(target=lambda: done.append(
        ping(CliBackend(netns_lab), "peer-a", PEER_B, count=3, interval=1.0)))
    pinging.start()
    deadline = time.monotonic() + 15
    while replies_read() < before + 2:
        assert time.monotonic() < deadline, "peer-b's agent never read two echo replies"
        time.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    pinging.join(timeout=30)
    result, = done
    assert result.received == 3, result
    assert max(result.samples_ms) > 1000, result  # late past ping's linger: the case here


def test_peers_cannot_reach_each_other_directly(any_lab: LabHandle) -> None:
    # Each peer reaches the database host on its own network ...
    assert any_lab.exec("peer-a", "ping", "-c1", "-W1", "10.231.1.10").returncode == 0
    assert any_lab.exec("peer-b", "ping", "-c1", "-W1", "10.231.2.10").returncode == 0
    # ... but not the other peer's underlay address, nor the database's other side.
    for host, target in (("peer-a", "10.231.2.11"), ("peer-b", "10.231.1.11"),
                         ("peer-a", "10.231.2.10")):
        assert any_lab.exec(host, "ping", "-c1", "-W1", target, check=False).returncode != 0


def logged_marks(lab: LabHandle) -> dict[str, int]:
    """Each peer's highest logged seq: an index probe a peer, however long the log is
    (a count over the whole log takes seconds late in a run, and a health-check probe
    crossing meanwhile would keep the tunnel from ever looking quiet)."""
    rows = lab.sql("SELECT name, (SELECT max(seq) FROM pgvpn.packets WHERE sender = name) "
                   "FROM pgvpn.peers")
    return {name: int(seq or 0) for name, seq in rows}


def logged_between(lab: LabHandle, before: dict[str, int],
                   after: dict[str, int]) -> dict[str, int]:
    """How many rows each peer logged between two marks: counted, not subtracted, so
    that a row missing from the numbering shows."""
    return {sender: int(lab.sql("SELECT count(*) FROM pgvpn.packets WHERE sender = %s "
                                "AND seq > %s AND seq <= %s",
                                [sender, before.get(sender, 0), last])[0][0])
            for sender, last in after.items()}


def quiet_snapshot(lab: LabHandle) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """TUN counters and logged_marks, taken when nothing is in flight (the kernel's own
    IPv6 chatter and the Docker health checks' probes included)."""
    previous = None
    for _ in range(40):
        lab.wait_settled()
        current = (lab.tun_counters("peer-a"), lab.tun_counters("peer-b"), logged_marks(lab))
        if current == previous:
            return current
        previous = current
        time.sleep(0.5)
    raise AssertionError("the tunnel never went quiet")


def test_iperf3_delivers_every_byte_and_every_packet_is_logged(any_lab: LabHandle) -> None:
    tun_a0, tun_b0, logged0 = quiet_snapshot(any_lab)

    result = iperf(CliBackend(any_lab), server="peer-b", address=PEER_B, client="peer-a",
                   duration=8)
    # iperf3 stops counting at its end-of-test message, so bytes still in flight then are
    # missing from sum_received: equality is checked byte for byte by stream_transfer below.
    # What is in flight is about TCP's window and the tunnel's queues, whatever the
    # duration: up to ~5% of 8 s at ~100 Mbit/s on two shared cores (94.9% seen in CI).
    # The floor only says that iperf3 carried something (4 Mbit/s, the blog's figure):
    # speed is `lab bench`'s business; a CI machine busy elsewhere carried 11 MB.
    assert result.bytes_received >= 0.9 * result.bytes_sent
    assert result.bytes_received > 4_000_000
    assert stream_transfer(any_lab, 20_000_000)

    tun_a1, tun_b1, logged1 = quiet_snapshot(any_lab)
    # every packet an agent read from its TUN is a row, and every row reached the other TUN
    sent_by_a = tun_a1["tx"] - tun_a0["tx"]
    sent_by_b = tun_b1["tx"] - tun_b0["tx"]
    rows = logged_between(any_lab, logged0, logged1)
    assert rows["peer-a"] == logged1["peer-a"] - logged0["peer-a"] == sent_by_a > 5000
    assert rows["peer-b"] == logged1["peer-b"] - logged0["peer-b"] == sent_by_b > 1000
    assert tun_b1["rx"] - tun_b0["rx"] == sent_by_a
    assert tun_a1["rx"] - tun_a0["rx"] == sent_by_b


STREAM_RECEIVE = (
    "import hashlib, socket; s = socket.socket(); s.bind(('10.230.0.2', 40002)); s.listen(1);"
    " s.settimeout(30); c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0\n"
    "while (b := c.recv(1 << 16)):\n    h.update(b); n += len(b)\n"
    "print(n, h.hexdigest())")
STREAM_SEND = (
    "import hashlib, random, socket, sys; data = random.Random(7).randbytes(int(sys.argv[1]));"
    " s = socket.create_connection(('10.230.0.2', 40002), timeout=30); s.sendall(data);"
    " s.close(); print(len(data), hashlib.sha256(data).hexdigest())")


def stream_transfer(lab: LabHandle, size: int) -> bool:
    """Send `size` bytes over TCP through the tunnel; True if all arrived, unaltered."""
    received: dict[str, Any] = {}

    def listen() -> None:
        received["out"] = lab.exec("peer-b", "python3", "-c", STREAM_RECEIVE, timeout=60)

    listener = threading.Thread(target=listen)
    listener.start()
    wait_for_listener(lab, "peer-b", "-Hltn", ":40002")
    sent = lab.exec("peer-a", "python3", "-c", STREAM_SEND, str(size), timeout=60).stdout
    listener.join(timeout=70)
    return bool(sent.strip()) and received["out"].stdout.strip() == sent.strip()


def wait_for_listener(lab: LabHandle, host: str, ss_flags: str, port: str) -> None:
    deadline = time.monotonic() + 10
    while port not in lab.exec(host, "ss", ss_flags).stdout:
        assert time.monotonic() < deadline, f"listener {port} on {host} did not start"
        time.sleep(0.1)


def iperf_while(lab: LabHandle, action: Callable[[], object], *, duration: float,
                after: float, tolerate_failure: bool = False) -> IperfResult | None:
    """iperf3 peer-a -> peer-b for `duration` s, with `action()` run `after` s into it.

    With `tolerate_failure`, an iperf3 that fails (e.g. its client's address vanished
    with a killed agent's TUN device) gives None instead of an error.
    """
    result: dict[str, IperfResult] = {}

    def transfer() -> None:
        with contextlib.suppress(*((LabError,) if tolerate_failure else ())):
            result["iperf"] = iperf(CliBackend(lab), server="peer-b", address=PEER_B,
                                    client="peer-a", duration=duration)

    worker = threading.Thread(target=transfer)
    worker.start()
    time.sleep(after)
    action()
    worker.join(timeout=120)
    return result.get("iperf")


def crafted_udp(payload: bytes) -> bytes:
    """A complete IPv4/UDP packet, checksums included, so the kernel sends it unchanged."""
    udp = dpkt.udp.UDP(sport=40001, dport=40000, data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=bytes([10, 230, 0, 1]), dst=bytes([10, 230, 0, 2]), p=17, ttl=64,
                    id=0x4242, data=udp)
    ip.len = len(ip)
    return bytes(ip)


RECEIVE = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           "s.bind(('10.230.0.2', 40000)); s.settimeout(20); d, a = s.recvfrom(4096); "
           "print(d.hex())")
SEND_RAW = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, "
            "socket.IPPROTO_RAW); s.sendto(bytes.fromhex(sys.argv[1]), ('10.230.0.2', 0))")


def test_a_sent_packet_is_logged_byte_for_byte_and_delivered(any_lab: LabHandle) -> None:
    payload = f"pgvpn sample {uuid.uuid4()}".encode()
    packet = crafted_udp(payload)
    received: dict[str, Any] = {}

    def listen() -> None:
        received["out"] = any_lab.exec("peer-b", "python3", "-c", RECEIVE, timeout=30)

    listener = threading.Thread(target=listen)
    listener.start()
    wait_for_listener(any_lab, "peer-b", "-Hlun", ":40000")
    any_lab.exec("peer-a", "python3", "-c", SEND_RAW, packet.hex())
    listener.join(timeout=40)
    assert received["out"].stdout.strip() == payload.hex()

    rows = any_lab.sql("SELECT data, length, receiver FROM pgvpn.packets "
                         "WHERE sender = 'peer-a' AND position(%s in data) > 0", [payload])
    assert len(rows) == 1
    data, length, receiver = rows[0]
    assert bytes(data) == packet and length == len(packet) and receiver == "peer-b"


def test_agent_restarted_mid_stream_resumes_without_losing_committed_packets(
        netns_lab: LabHandle) -> None:
    """Namespaces only: there the agent restarts while the host's TCP endpoints live on.

    In a container the agent is the main process, so restarting it restarts the
    container and the iperf3 endpoints in it; the Docker backend's crash and restart
    behaviour is covered by tests/test_faults.py instead.

    The receiver is stopped cleanly and started again (`lab restart` is the two in one):
    the new agent (another pid, another TUN device) reads on from the cursor it found,
    so its new TUN receives exactly the rows past that cursor, no more, no fewer.
    """
    pid = agent_memory(netns_lab, "peer-b").pid
    ifindex = netns_lab.tun_link("peer-b")["ifindex"]
    found: dict[str, int] = {}

    def restart() -> None:
        netns_lab.cli("stop", "peer-b")
        found["cursor"] = cursor(netns_lab, "peer-b", "peer-a")
        netns_lab.cli("start", "peer-b")

    transferred = iperf_while(netns_lab, restart, duration=10, after=3)
    assert transferred is not None
    assert transferred.bytes_received >= 0.9 * transferred.bytes_sent > 1_000_000
    assert agent_memory(netns_lab, "peer-b").pid != pid
    assert netns_lab.tun_link("peer-b")["ifindex"] != ifindex

    _, tun_b, logged = quiet_snapshot(netns_lab)
    # the restarted receiver read everything committed for it: its cursor is at the end,
    # and every row past the cursor it started from reached its new TUN device once
    assert cursor(netns_lab, "peer-b", "peer-a") == logged["peer-a"]
    assert tun_b["rx"] == logged["peer-a"] - found["cursor"] > 1000
    # and the restarted agent's TUN device is back with its addresses
    assert ping(CliBackend(netns_lab), "peer-a", PEER_B, count=2).received == 2


def test_probe_tells_a_carrying_tunnel_from_a_dead_end(any_lab: LabHandle) -> None:
    """`pgvpn probe`, the agents' health check: the remote end answers, nobody else does."""
    pgvpn = ["pgvpn"] if any_lab.backend == "docker" else [sys.executable, "-m", "pgvpn.cli"]
    for target in (PEER_B, PEER_B6):
        assert any_lab.exec("peer-a", *pgvpn, "probe", target).returncode == 0
    unused = any_lab.exec("peer-a", *pgvpn, "probe", "10.230.0.77", "--timeout", "1",
                          check=False)
    assert unused.returncode == 1 and "no answer" in unused.stderr
