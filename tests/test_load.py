"""Load: four parallel TCP streams each way for 30 s (slow; bounded in time).

iperf3 -P 4 in both directions at once, and beside it one byte-exact stream each way
(iperf3 counts only what arrived before its end-of-test message, so it cannot say
"every byte"; a checksummed stream can). Then: no agent restarted, every packet an
agent read from its TUN is a row, every row reached the other TUN.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lab.measure import IperfResult, iperf
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_marks
from tests.test_tunnel import logged_between, quiet_snapshot, wait_for_listener

DURATION = 30
STREAMS = 4
ENDS = {"peer-a": "10.230.0.1", "peer-b": "10.230.0.2"}
RECEIVE = (
    "import hashlib, socket, sys; s = socket.socket(); s.bind((sys.argv[1], 40003));"
    " s.listen(1); s.settimeout(60); c, _ = s.accept(); c.settimeout(60);"
    " h = hashlib.sha256(); n = 0\n"
    "while (b := c.recv(1 << 16)):\n    h.update(b); n += len(b)\n"
    "print(n, h.hexdigest())")
SEND = (
    "import hashlib, random, socket, sys; data = random.Random(5).randbytes(int(sys.argv[2]));"
    " s = socket.create_connection((sys.argv[1], 40003), timeout=60); s.sendall(data);"
    " s.close(); print(len(data), hashlib.sha256(data).hexdigest())")


def exact_stream(lab: LabHandle, sender: str, receiver: str, size: int,
                 results: dict[str, Any], address: str | None = None) -> None:
    """`size` checksummed bytes from `sender` to `receiver` (at its tunnel `address`)."""
    got: dict[str, Any] = {}
    address = address or ENDS[receiver]
    listener = threading.Thread(target=lambda: got.update(out=lab.exec(
        receiver, "python3", "-c", RECEIVE, address, timeout=180).stdout.strip()))
    listener.start()
    wait_for_listener(lab, receiver, "-Hltn", ":40003")
    sent = lab.exec(sender, "python3", "-c", SEND, address, str(size),
                    timeout=180).stdout.strip()
    listener.join(timeout=200)
    results[f"{sender}->{receiver}"] = (sent, got.get("out"))


@pytest.mark.slow
def test_four_streams_each_way_for_30_seconds(any_lab: LabHandle) -> None:
    indexes = {host: any_lab.tun_link(host)["ifindex"] for host in ENDS}
    marks = {host: agent_marks(any_lab, host) for host in ENDS}
    tun_a0, tun_b0, logged0 = quiet_snapshot(any_lab)
    backend = CliBackend(any_lab)
    reports: dict[str, IperfResult | Exception] = {}
    exact: dict[str, Any] = {}

    def load(client: str, server: str) -> None:
        try:
            reports[f"{client}->{server}"] = iperf(
                backend, server=server, address=ENDS[server], client=client,
                duration=DURATION, streams=STREAMS)
        except Exception as exc:  # a thread's error is otherwise only printed
            reports[f"{client}->{server}"] = exc

    threads = [threading.Thread(target=load, args=("peer-a", "peer-b")),
               threading.Thread(target=load, args=("peer-b", "peer-a"))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(5)  # under full load: one checksummed stream each way
    for sender, receiver in (("peer-a", "peer-b"), ("peer-b", "peer-a")):
        exact_stream(any_lab, sender, receiver, 8_000_000, exact)
    for thread in threads:
        thread.join(timeout=DURATION + 120)
    assert time.monotonic() - started < DURATION + 120

    # both directions reported, and neither with an error
    assert set(reports) == set(exact) == {"peer-a->peer-b", "peer-b->peer-a"}, reports
    for direction, result in reports.items():
        assert isinstance(result, IperfResult), f"{direction}: {result!r}"
        streams = result.raw["end"]["streams"]
        assert len(streams) == STREAMS, direction
        # what iperf3 had received by its end-of-test message; the rest was in flight
        # (four windows' worth: see test_tunnel; every byte is the exact streams' check)
        assert result.bytes_received >= 0.9 * result.bytes_sent > 1_000_000, direction
    for direction, (sent, received) in exact.items():
        assert sent and sent == received, direction  # every byte, unaltered

    tun_a1, tun_b1, logged1 = quiet_snapshot(any_lab)
    # no agent restarted: the same TUN devices, the same processes' sessions
    assert {host: any_lab.tun_link(host)["ifindex"] for host in ENDS} == indexes
    assert {host: agent_marks(any_lab, host) for host in ENDS} == marks
    sent_by_a = tun_a1["tx"] - tun_a0["tx"]
    sent_by_b = tun_b1["tx"] - tun_b0["tx"]
    rows = logged_between(any_lab, logged0, logged1)
    assert rows["peer-a"] == sent_by_a
    assert rows["peer-b"] == sent_by_b
    assert tun_b1["rx"] - tun_b0["rx"] == sent_by_a
    assert tun_a1["rx"] - tun_a0["rx"] == sent_by_b
