"""Integration: agents that route by the owner's table (routing 'table', issue 11), on
both backends: real packets, real kernel routes, a real third sender's rows.

The lab's two agents run with `lab up --routing table` for this module; the lab
registers their tunnel addresses as their routes. A third peer, `fleet-x`, has a role
and a route but no agent: the test writes its rows itself, as its agent would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dpkt
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from lab.measure import ping
from pgvpn.copyformat import PACKET_COLUMNS, encode_packet_rows
from pgvpn.transports.base import channel_for
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_log, wait_for
from tests.test_lab import agent_metrics

PEER_A, PEER_B, PEER_X = "10.230.0.1", "10.230.0.2", "10.230.0.9"
SUBNET, SUBNET_HOST = "192.168.77.0/24", "192.168.77.1"
X_PASSWORD = "fleet-x-password-long-enough"
PORT = 40123


@pytest.fixture(scope="module")
def fleet(any_lab: LabHandle) -> Iterator[LabHandle]:
    """The lab's agents routing by the table, for this module; then as before."""
    any_lab.cli("up", "--routing", "table")
    try:
        yield any_lab
    finally:
        any_lab.cli("up", "--routing", "peer")


def routes_of(lab: LabHandle, peer: str, *args: str) -> None:
    lab.pgvpn("db", "set-routes", peer, *args)


def kernel_routes(lab: LabHandle, host: str) -> str:
    return lab.exec(host, "ip", "route", "show", "dev", "pgvpn0").stdout


def test_packets_follow_the_routing_table_as_it_changes(fleet: LabHandle) -> None:
    """A subnet added to peer-b's routes is routed by peer-a's agent within 5 s (kernel
    route and uplink), answered by peer-b; once removed, it is no longer routed."""
    lab, backend = fleet, CliBackend(fleet)
    lab.exec("peer-b", "ip", "addr", "add", f"{SUBNET_HOST}/32", "dev", "lo")
    try:
        routes_of(lab, "peer-b", "--address", f"{PEER_B}/24", "--address", "fd00:230::2/64",
                  "--route", SUBNET)
        wait_for(lambda: SUBNET.split("/")[0] in kernel_routes(lab, "peer-a"),
                 "peer-a's kernel route to peer-b's new subnet", 5)
        assert ping(backend, "peer-a", SUBNET_HOST, count=3).received == 3
        logged = lab.sql("SELECT count(*) FROM pgvpn.packet_headers WHERE sender = 'peer-a' "
                         "AND receiver = 'peer-b' AND dst = %s::inet", [SUBNET_HOST])
        assert logged[0][0] >= 3
        routes_of(lab, "peer-b", "--address", f"{PEER_B}/24", "--address", "fd00:230::2/64")
        wait_for(lambda: SUBNET.split("/")[0] not in kernel_routes(lab, "peer-a"),
                 "peer-a's kernel route to the removed subnet to go", 5)
        assert ping(backend, "peer-a", SUBNET_HOST, count=2).received == 0
    finally:
        routes_of(lab, "peer-b", "--address", f"{PEER_B}/24", "--address", "fd00:230::2/64")
        lab.exec("peer-b", "ip", "addr", "del", f"{SUBNET_HOST}/32", "dev", "lo", check=False)
    assert ping(backend, "peer-a", PEER_B, count=3).received == 3


def test_a_packet_to_no_peers_route_is_counted_and_not_logged(fleet: LabHandle) -> None:
    lab = fleet
    nowhere = "10.230.0.99"  # in the tunnel's subnet, so the kernel sends it into the TUN
    misses = 'pgvpn_routing_misses_total'
    before = agent_metrics(lab)["peer-a"][misses]
    mark = lab.sql("SELECT coalesce(max(seq), 0) FROM pgvpn.packets WHERE sender = 'peer-a'"
                   )[0][0]
    assert ping(CliBackend(lab), "peer-a", nowhere, count=3).received == 0
    wait_for(lambda: agent_metrics(lab)["peer-a"][misses] >= before + 3,
             "peer-a's agent to count three routing misses", 10)
    assert lab.sql("SELECT count(*) FROM pgvpn.packet_headers WHERE sender = 'peer-a' "
                   "AND seq > %s AND dst = %s::inet", [mark, nowhere]) == [(0,)]


def udp_datagram(index: int, source: str = PEER_X) -> bytes:
    """A datagram to peer-b, from fleet-x's address unless told, checksummed, numbered in
    its payload."""
    datagram = dpkt.udp.UDP(sport=PORT, dport=PORT, data=f"fleet-x {index:05d}".encode())
    datagram.ulen = len(datagram)
    packet = dpkt.ip.IP(src=bytes(map(int, source.split("."))),
                        dst=bytes(map(int, PEER_B.split("."))), p=17, ttl=64, data=datagram)
    packet.len = len(packet)
    return bytes(packet)


def log_as(conn: psycopg.Connection, packets: list[bytes]) -> int:
    """Rows to peer-b as the connection's peer logs them, numbered on from its last
    logged seq, as its agent would; returns the last seq."""
    row = conn.execute("SELECT pgvpn.last_sent_seq()").fetchone()
    first = int(row[0] if row else 0) + 1
    with conn.cursor() as cur, cur.copy(
            f"COPY pgvpn.packets ({PACKET_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(encode_packet_rows("peer-b", first, packets))
    conn.execute("SELECT pg_notify(%s, '')", [channel_for("peer-b")])
    return first + len(packets) - 1


# Run in peer-b: receive `count` datagrams on PORT (or time out), print their payloads.
RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(20)
for _ in range(int(sys.argv[2])):
    try:
        print(s.recv(2048).decode(), flush=True)
    except socket.timeout:
        break
"""


@pytest.fixture
def third_peer(fleet: LabHandle) -> Iterator[psycopg.Connection]:
    """fleet-x: a role and a route, and its connection; removed afterwards (its logged
    rows stay: nothing deletes the log)."""
    lab = fleet

    def remove() -> None:
        lab.sql("DELETE FROM pgvpn.peers WHERE name = 'fleet-x'", superuser=True)
        lab.sql("DROP ROLE IF EXISTS pgvpn_fleet_x", superuser=True)

    remove()
    password = lab.state_dir / "fleet-x.password"
    password.write_text(X_PASSWORD)
    lab.pgvpn("db", "add-peer", "fleet-x", "--password-file", str(password),
              "--address", f"{PEER_X}/24")
    params: dict[str, Any] = conninfo_to_dict(lab.conninfo())
    params.update(user="pgvpn_fleet_x", password=X_PASSWORD)
    try:
        with psycopg.connect(make_conninfo(**params), autocommit=True) as conn:
            yield conn
    finally:
        remove()
        password.unlink()


def test_a_receiver_reads_every_sender_in_order_and_once(fleet: LabHandle,
                                                          third_peer: psycopg.Connection
                                                          ) -> None:
    """peer-b's downlink reads a sender that joined while it ran (its cursor made on the
    route change, no restart), in fleet-x's seq order, none twice, while peer-a's
    traffic to it goes on. A row of fleet-x's with peer-a's source address is not
    written to peer-b's TUN (counted as skipped); once fleet-x has no route, peer-b
    reads nothing more of it, and its rows stay logged."""
    lab, count = fleet, 60
    wait_for(lambda: lab.sql("SELECT count(*) FROM pgvpn.cursors WHERE receiver = 'peer-b' "
                             "AND sender = 'fleet-x'") == [(1,)],
             "peer-b's downlink to make a cursor for the new sender", 10)
    skipped = 'pgvpn_skipped_rows_total'
    skipped0 = agent_metrics(lab)["peer-b"][skipped]
    printed: list[str] = []
    receiving = threading.Thread(target=lambda: printed.append(lab.exec(
        "peer-b", "python3", "-c", RECEIVER, str(PORT), str(count), timeout=60).stdout))
    receiving.start()
    wait_for(lambda: f":{PORT}" in lab.exec("peer-b", "ss", "-Hunl").stdout,
             "peer-b's receiver to listen", 10)
    pinging = threading.Thread(target=lambda: ping(CliBackend(lab), "peer-a", PEER_B,
                                                   count=10, interval=0.1))
    pinging.start()
    for batch in range(6):  # six batches, as an agent would commit them
        last = log_as(third_peer, [udp_datagram(i) for i in range(batch * 10, batch * 10 + 10)])
        if batch == 3:  # passed off as peer-a's: if it were written, it would show
            last = log_as(third_peer, [udp_datagram(99999, source=PEER_A)])
        time.sleep(0.05)
    pinging.join(timeout=30)
    receiving.join(timeout=60)
    assert printed[0].splitlines() == [f"fleet-x {i:05d}" for i in range(count)], printed
    cursor = ("SELECT last_seq FROM pgvpn.cursors WHERE receiver = 'peer-b' "
              "AND sender = 'fleet-x'")
    wait_for(lambda: lab.sql(cursor) == [(last,)], "peer-b's cursor past every row", 10)
    wait_for(lambda: agent_metrics(lab)["peer-b"][skipped] == skipped0 + 1,
             "peer-b's agent to count the spoofed row as skipped", 10)
    # per remote peer: what peer-b took from fleet-x (the spoofed row not), and from peer-a
    metrics = agent_metrics(lab)
    from_x = 'pgvpn_peer_packets_total{direction="down",remote_peer="fleet-x"}'
    assert metrics["peer-b"][from_x] == count
    assert metrics["peer-b"]['pgvpn_peer_bytes_total{direction="down",remote_peer="fleet-x"}'
                             ] == sum(len(udp_datagram(i)) for i in range(count))
    assert metrics["peer-b"]['pgvpn_peer_packets_total{direction="down",remote_peer="peer-a"}'
                             ] >= 10
    assert metrics["peer-a"]['pgvpn_peer_packets_total{direction="up",remote_peer="peer-b"}'
                             ] >= 10
    # no route, no reading: the row is logged, peer-b's cursor stays where it was
    routes_of(lab, "fleet-x", "--none")
    late = log_as(third_peer, [udp_datagram(count)])
    time.sleep(2)
    assert lab.sql(cursor) == [(last,)]
    assert lab.sql("SELECT count(*) FROM pgvpn.packets WHERE sender = 'fleet-x' "
                   "AND seq = %s", [late]) == [(1,)]


def test_a_route_over_the_databases_address_is_never_taken(fleet: LabHandle,
                                                            third_peer: psycopg.Connection
                                                            ) -> None:
    """A prefix that holds the database's address (each agent reaches it on its own
    underlay network) routed to a peer: no agent sends its own database connections
    into the tunnel they carry; it says so, and the tunnel goes on."""
    lab = fleet
    underlay = "10.231.0.0/16"  # both peers' networks to the database
    routes_of(lab, "fleet-x", "--address", f"{PEER_X}/24", "--route", underlay)
    try:
        for host in ("peer-a", "peer-b"):
            wait_for(lambda host=host: "it holds the database's address" in agent_log(
                lab, host, 50), f"{host}'s agent to refuse the route", 10)
            assert "10.231.0.0/16" not in kernel_routes(lab, host)
        assert ping(CliBackend(lab), "peer-a", PEER_B, count=3).received == 3
    finally:
        routes_of(lab, "fleet-x", "--address", f"{PEER_X}/24")
