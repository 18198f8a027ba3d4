"""Integration: the fleet topology (topologies/fleet.yaml, issue 11) on both backends.

Four peers route by the owner's table; peer-c routes a LAN with a plain host
(site-host, no agent) on it. The lab first comes up without peer-d, then grows to the
whole fleet while peer-a pings peer-b: the running peers are not restarted and their
traffic does not stop. Real packets throughout.

The fleet is a lab of its own (<test lab>-f). On Docker its networks' fixed subnets
would overlap the session's lab, so there it runs with the engine to itself
(docker_alone, last).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from lab.measure import PingResult, ping
from tests.conftest import (
    ROOT,
    TEST_LAB,
    CliBackend,
    LabHandle,
    docker_engine_alone,
    running_lab,
)
from tests.peerside import agent_pid, connect_as, docker_state, wait_for
from tests.test_load import exact_stream

FLEET = ROOT / "topologies" / "fleet.yaml"
TUNNEL = {"peer-a": "10.230.0.1", "peer-b": "10.230.0.2", "peer-c": "10.230.0.3",
          "peer-d": "10.230.0.4"}
TUNNEL6 = {name: f"fd00:230::{address[-1]}" for name, address in TUNNEL.items()}
SITE_HOST = "192.168.50.10"
# Polls its host's routes until `$1` is on the TUN (at most 30 s): prints when, in
# seconds since the epoch.
WATCH_ROUTE = ("i=0; while [ $i -lt 600 ]; do "
               "ip route show dev pgvpn0 | grep -q \"^$1 \" && { date +%s.%N; exit 0; }; "
               "sleep 0.05; i=$((i+1)); done; exit 1")


def without_peer_d(path: Path) -> None:
    """fleet.yaml minus peer-d (and its secret): the fleet before it grows."""
    document = yaml.safe_load(FLEET.read_text())
    del document["services"]["peer-d"]
    del document["secrets"]["peer-d"]
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def agent_identities(lab: LabHandle) -> dict[str, int]:
    """Each running agent's process: its pid (netns), its container's (Docker); a
    restarted agent has another."""
    running = [h["name"] for h in lab.status()["hosts"] if h["role"] == "agent" and h["running"]]
    if lab.backend == "netns":
        return {name: agent_pid(lab, name) for name in running}
    return {name: docker_state(lab, name, "Pid") for name in running}


@pytest.fixture(scope="module", params=[
    "netns", pytest.param("docker", marks=[pytest.mark.docker, pytest.mark.docker_alone])])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[LabHandle, dict[str, Any]]]:
    """The fleet lab, grown from three peers to four; yields it and what the growth did."""
    backend = request.param
    if backend == "docker":
        docker_engine_alone()
    smaller = tmp_path_factory.mktemp("fleet") / "fleet-without-d.yaml"
    without_peer_d(smaller)
    with running_lab(backend, TEST_LAB + "-f", str(smaller)) as lab:
        yield lab, grow(lab)


def grow(lab: LabHandle) -> dict[str, Any]:
    """`lab up --topology fleet` on the running three-peer fleet, while peer-a pings
    peer-b from before it starts until after it returns: every ping's result, each
    agent's process before and after, and the output of `up`."""
    before = agent_identities(lab)
    pings: list[PingResult] = []
    rounds: list[tuple[float, float]] = []  # each round of pings: when it began and ended
    done = threading.Event()

    def keep_pinging() -> None:
        while not done.is_set():
            began = time.monotonic()
            pings.append(ping(CliBackend(lab), "peer-a", TUNNEL["peer-b"], count=10,
                              interval=0.2))
            rounds.append((began, time.monotonic()))

    pinger = threading.Thread(target=keep_pinging)
    pinger.start()
    time.sleep(1)
    up_began = time.monotonic()
    try:
        up = lab.cli("up", "--topology", "fleet", timeout=1800)
    finally:
        up_ended = time.monotonic()
        done.set()  # the round under way when `up` returned is the last
        pinger.join(timeout=60)
    return {"pings": pings, "rounds": rounds, "up_span": (up_began, up_ended),
            "before": before, "after": agent_identities(lab), "up": up.stderr}


def test_the_fleet_grows_without_stopping_traffic(fleet: tuple[LabHandle, dict[str, Any]]
                                                  ) -> None:
    lab, grown = fleet
    assert set(grown["before"]) == {"peer-a", "peer-b", "peer-c"}, grown
    assert set(grown["after"]) == {*grown["before"], "peer-d"}, grown
    for peer in grown["before"]:  # the same processes: nothing restarted
        assert grown["after"][peer] == grown["before"][peer], grown
    assert "restarting" not in grown["up"], grown["up"]
    pings: list[PingResult] = grown["pings"]
    # the pings covered the whole of `up` (netns adds a host in about a second: one
    # round of pings may be all it takes)
    up_began, up_ended = grown["up_span"]
    assert grown["rounds"][0][0] < up_began and grown["rounds"][-1][1] >= up_ended, grown
    assert sum(p.received for p in pings) == sum(p.transmitted for p in pings), pings
    settings = json.loads((lab.state_dir / "lab.json").read_text())
    assert settings["topology"] == str(FLEET) and settings["routing"] == "table"


def test_every_host_reaches_every_other_over_both_families(
        fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    lab, _ = fleet
    report = json.loads(lab.cli("ping-matrix", "--count", "2", "--json").stdout)
    cells = {(c["from"], c["to"], c["address"]) for c in report["matrix"]}
    agents = [*TUNNEL]
    expected = {(a, b, addresses[b]) for a in agents for b in agents if a != b
                for addresses in (TUNNEL, TUNNEL6)}
    # site-host: to and from every agent but peer-c, its neighbour on the LAN; IPv4
    expected |= {(a, "site-host", SITE_HOST) for a in agents if a != "peer-c"}
    expected |= {("site-host", a, TUNNEL[a]) for a in agents if a != "peer-c"}
    assert cells == expected
    assert report["lost"] == 0, report
    assert all(c["received"] == 2 for c in report["matrix"])


def test_site_host_is_reached_through_peer_c(fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    """peer-a -> site-host crosses the database to peer-c, which forwards it to its LAN;
    site-host's answer comes back the same way. The log shows both, peer-c at the far end."""
    lab, _ = fleet
    since = lab.sql("SELECT now()")[0][0]
    assert ping(CliBackend(lab), "peer-a", SITE_HOST, count=3).received == 3
    rows = dict(lab.sql(
        "SELECT sender || '>' || receiver, count(*) FROM pgvpn.packet_headers "
        "WHERE logged_at >= %s AND protocol = 'icmp' AND (dst = %s::inet OR src = %s::inet) "
        "GROUP BY 1", [since, SITE_HOST, SITE_HOST]))
    assert rows == {"peer-a>peer-c": 3, "peer-c>peer-a": 3}, rows


def test_two_pairs_stream_byte_exact_at_once(fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    lab, _ = fleet
    results: dict[str, Any] = {}
    streams = [threading.Thread(target=exact_stream, args=(
        lab, sender, receiver, 4_000_000, results, TUNNEL[receiver]))
        for sender, receiver in (("peer-a", "peer-b"), ("peer-c", "peer-d"))]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join(timeout=240)
    assert set(results) == {"peer-a->peer-b", "peer-c->peer-d"}, results
    for name, (sent, received) in results.items():
        assert sent.startswith("4000000 ") and sent == received, (name, sent, received)


def test_a_route_added_to_peer_d_is_used_within_5_seconds(
        fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    lab, _ = fleet
    subnet, address = "192.168.77.0/24", "192.168.77.1"
    keep = ["--address", f"{TUNNEL['peer-d']}/24", "--address", f"{TUNNEL6['peer-d']}/64"]
    lab.exec("peer-d", "ip", "addr", "add", f"{address}/32", "dev", "lo")
    try:
        # each host watches its own routes, and says when the new one appeared (hosts
        # share the machine's clock), so the time measured is the route's, not lab's
        seen: dict[str, str] = {}
        watchers = [threading.Thread(target=lambda p=peer: seen.update({p: lab.exec(
            p, "sh", "-c", WATCH_ROUTE, "-", subnet, timeout=60, check=False).stdout.strip()}))
            for peer in ("peer-a", "peer-b", "peer-c")]
        for watcher in watchers:
            watcher.start()
        time.sleep(2)  # every watcher started
        changed = time.time()
        lab.pgvpn("db", "set-routes", "peer-d", *keep, "--route", subnet)
        for watcher in watchers:
            watcher.join(timeout=90)
        delays = {peer: float(at) - changed for peer, at in seen.items() if at}
        assert set(delays) == {"peer-a", "peer-b", "peer-c"}, seen
        assert all(delay < 5 for delay in delays.values()), delays
        for peer in ("peer-a", "peer-b"):
            assert ping(CliBackend(lab), peer, address, count=2).received == 2
        lab.pgvpn("db", "set-routes", "peer-d", *keep)
        wait_for(lambda: "192.168.77.0/24" not in lab.exec(
            "peer-a", "ip", "route", "show", "dev", "pgvpn0").stdout,
            "peer-a's route to the removed subnet to go", 5)
        assert ping(CliBackend(lab), "peer-a", address, count=2).received == 0
    finally:
        lab.pgvpn("db", "set-routes", "peer-d", *keep)
        lab.exec("peer-d", "ip", "addr", "del", f"{address}/32", "dev", "lo", check=False)


def test_a_packet_to_no_route_is_counted_and_not_logged(
        fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    lab, _ = fleet
    nowhere, misses = "10.230.0.99", "pgvpn_routing_misses_total"
    before = {h["name"]: h["metrics"] for h in lab.status()["hosts"] if "metrics" in h}
    # exactly three probes (no -w deadline: with one, ping goes on probing until it ends)
    sent = lab.exec("peer-b", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", nowhere,
                    check=False)
    assert "3 packets transmitted, 0 received" in sent.stdout, sent.stdout
    after = {h["name"]: h["metrics"] for h in lab.status()["hosts"] if "metrics" in h}
    assert after["peer-b"][misses] - before["peer-b"][misses] == 3
    assert lab.sql("SELECT count(*) FROM pgvpn.packet_headers WHERE dst = %s::inet",
                   [nowhere]) == [(0,)]


def test_a_peer_reads_only_its_own_packets_among_four(
        fleet: tuple[LabHandle, dict[str, Any]]) -> None:
    """peer-b cannot read what peer-a sent peer-c (the owner sees it is there); peer-c
    reads it."""
    lab, _ = fleet
    assert ping(CliBackend(lab), "peer-a", TUNNEL["peer-c"], count=2).received == 2
    query = ("SELECT count(*) FROM pgvpn.packets WHERE sender = 'peer-a' "
             "AND receiver = 'peer-c'")
    assert lab.sql(query)[0][0] >= 2
    inbox = query.replace("pgvpn.packets", "pgvpn.inbox")  # a peer's one way to read
    with connect_as(lab, "peer-b") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(query)
        assert conn.execute(inbox).fetchone() == (0,)
        receivers = conn.execute("SELECT DISTINCT receiver FROM pgvpn.inbox").fetchall()
        assert receivers == [("peer-b",)]
    with connect_as(lab, "peer-c") as conn:
        row = conn.execute(inbox).fetchone()
        assert row is not None and row[0] >= 2
