"""`pgvpn show` (issue 11): each peer's addresses, its agent's state, and what it sent
and received, as its agent reports them (sql/010_show.sql); what a connection sees is
the database's decision. Unit tests of the states first, then both lab backends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgvpn.config import HEARTBEAT_SECONDS
from pgvpn.show import STALE_AFTER, PeerStatus
from tests.conftest import LabHandle
from tests.peerside import lab_cli, peer_conninfo, wait_for

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
PEER_A6, PEER_B6 = "fd00:230::1", "fd00:230::2"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def status(started: datetime | None, seen: datetime | None) -> PeerStatus:
    return PeerStatus("peer-a", [PEER_A], started, seen, 1, 84, 2, 168, NOW, [])


@pytest.mark.parametrize(("started", "seen_ago", "state"), [
    (NOW - timedelta(hours=1), 1.0, "connected"),
    (NOW - timedelta(hours=1), STALE_AFTER, "connected"),
    (NOW - timedelta(hours=1), STALE_AFTER + 0.5, "not responding"),
    (None, 1.0, "stopped"),
    (None, None, "never connected"),
])
def test_an_agents_state_follows_its_heartbeat(started: datetime | None,
                                                seen_ago: float | None, state: str) -> None:
    seen = None if seen_ago is None else NOW - timedelta(seconds=seen_ago)
    shown = status(started, seen)
    assert shown.state == state
    document = shown.as_json()
    assert document["state"] == state and document["connected"] == (state == "connected")
    assert document["sent"] == {"packets": 1, "bytes": 84}
    assert document["received"] == {"packets": 2, "bytes": 168}


def show(lab: LabHandle, *args: str) -> dict[str, dict[str, Any]]:
    """`pgvpn show --json` (as the owner unless --database-url is given), by peer."""
    lines = lab.pgvpn("show", "--json", *args).stdout.decode().splitlines()
    return {peer["name"]: peer for peer in map(json.loads, lines)}


def tun_stats(lab: LabHandle, host: str) -> dict[str, int]:
    stats = lab.tun_stats64(host)
    return {"tx_packets": stats["tx"]["packets"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "rx_bytes": stats["rx"]["bytes"]}


def reported(peer: dict[str, Any]) -> dict[str, int]:
    return {"tx_packets": peer["sent"]["packets"], "tx_bytes": peer["sent"]["bytes"],
            "rx_packets": peer["received"]["packets"], "rx_bytes": peer["received"]["bytes"]}


def test_show_reports_what_each_tun_device_counted(any_lab: LabHandle) -> None:
    any_lab.exec("peer-a", "ping", "-c", "5", "-i", "0.1", "-s", "1000", PEER_B)
    any_lab.exec("peer-b", "ping", "-6", "-c", "3", "-i", "0.1", PEER_A6)
    # One datagram to a closed port: 1228 bytes one way, a 576-byte ICMP error back, so
    # that sent and received differ (a swap of the two would show).
    any_lab.exec("peer-a", "python3", "-c", "import socket; socket.socket(socket.AF_INET, "
                 f"socket.SOCK_DGRAM).sendto(b'x' * 1200, ('{PEER_B}', 9))")
    # Each agent reports with its heartbeat, and background traffic (the Docker health
    # probes) may cross at any time: a report written after `first` was read lies
    # between the TUN counters read before it and those read after it. (A packet the
    # TUN counted just before `first` may still be in its agent's batch when the
    # heartbeat reads the counts: then the next try, up to three.)
    for _ in range(3):
        any_lab.wait_settled()
        first = {host: tun_stats(any_lab, host) for host in ("peer-a", "peer-b")}
        (since,), = any_lab.sql("SELECT now()")
        wait_for(lambda: all(datetime.fromisoformat(peer["last_seen"]) > since  # noqa: B023
                             for peer in show(any_lab).values()),
                 "a heartbeat from each agent", timeout=4 * HEARTBEAT_SECONDS)
        peers = show(any_lab)
        any_lab.wait_settled()
        last = {host: tun_stats(any_lab, host) for host in first}
        between = {host: all(first[host][k] <= v <= last[host][k]
                             for k, v in reported(peers[host]).items()) for host in first}
        if all(between.values()):
            break
    assert all(between.values()), (first, {h: reported(p) for h, p in peers.items()}, last)
    assert first["peer-a"]["tx_bytes"] != first["peer-a"]["rx_bytes"]
    assert first["peer-a"]["tx_packets"] >= 6 and first["peer-b"]["tx_packets"] >= 3
    assert peers["peer-a"]["addresses"] == [PEER_A, PEER_A6]
    assert peers["peer-b"]["addresses"] == [PEER_B, PEER_B6]
    # the owner's routes: the lab registers each agent's addresses as its host routes
    assert peers["peer-a"]["routes"] == [f"{PEER_A}/32", f"{PEER_A6}/128"]
    assert peers["peer-b"]["routes"] == [f"{PEER_B}/32", f"{PEER_B6}/128"]
    for peer in peers.values():
        assert peer["state"] == "connected" and peer["connected"] is True
        assert 0 <= peer["last_seen_seconds_ago"] <= STALE_AFTER

    # A peer's connection sees that peer only (RLS), and its report as it is now.
    as_a = show(any_lab, "--database-url", peer_conninfo(any_lab, "peer-a"))
    assert list(as_a) == ["peer-a"]
    assert reported(as_a["peer-a"])["tx_packets"] >= first["peer-a"]["tx_packets"]

    table = any_lab.pgvpn("show").stdout.decode()
    for text in ("peer-a", "peer-b", PEER_A6, "connected", "pkts"):
        assert text in table, table


def test_show_says_when_an_agent_stopped(any_lab: LabHandle) -> None:
    lab_cli(any_lab, "stop", "peer-b")
    try:
        peers = show(any_lab)
        assert peers["peer-b"]["state"] == "stopped"
        assert peers["peer-b"]["connected"] is False and peers["peer-b"]["agent_started"] is None
        assert peers["peer-a"]["state"] == "connected"
    finally:
        lab_cli(any_lab, "restart", "peer-b")
    wait_for(lambda: show(any_lab)["peer-b"]["state"] == "connected", "peer-b connected again")
