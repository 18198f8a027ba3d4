"""Property tests over rows: what PostgreSQL makes of the uplink's COPY stream, and what
the downlink's pump writes to the TUN for any row at all."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgvpn.agent import Agent
from pgvpn.config import load_config
from pgvpn.copyformat import PACKET_COLUMNS, encode_packet_rows
from pgvpn.packets import packet_problem
from pgvpn.transports.base import Counters, Downlink
from pgvpn.transports.batched import MAX_SEQ
from pgvpn.tun import TunDevice
from tests.conftest import LabHandle
from tests.peerside import connect_as
from tests.test_packets import ipv4_udp, ipv6_udp

CONFIG_ENV = {"PGVPN_NAME": "peer-b", "PGVPN_PEER": "peer-a", "TUN_IP": "10.230.0.2/24",
              "TUN_PEER": "10.230.0.1", "PGVPN_MTU": "1500"}


class FakeTun:
    """Takes what the pump writes, except that, like a kernel with its own ideas, it
    refuses some packets with EINVAL (those whose length is a multiple of 7)."""

    offload = False  # the agent's own checks of what it may write, as on a plain TUN
    packet_of = TunDevice.packet_of
    frame_problem = TunDevice.frame_problem

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.written: list[bytes] = []

    @staticmethod
    def refuses(packet: bytes) -> bool:
        return len(packet) % 7 == 0

    def write(self, packet: bytes) -> None:
        if self.refuses(packet):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.written.append(packet)


class ScriptedDownlink(Downlink):
    """Hands out the given batches, then stops the agent."""

    def __init__(self, batches: list[list[bytes]], stop: threading.Event) -> None:
        self.batches = list(batches)
        self.stop = stop
        self.counters = Counters()

    def receive(self, timeout: float) -> list[bytes]:
        if not self.batches:
            self.stop.set()
            return []
        return self.batches.pop(0)

    def close(self) -> None:
        self.batches.clear()


rows = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=1600).map(ipv4_udp),  # whole packets, some larger than the MTU
    st.binary(max_size=1600).map(ipv6_udp),
    st.binary(max_size=100).map(lambda p: ipv4_udp(p)[:-1]),  # truncated
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(rows, max_size=8), max_size=6))
def test_pump_down_writes_exactly_the_whole_packets_and_survives_the_rest(
        batches: list[list[bytes]]) -> None:
    agent = Agent(load_config(environ=CONFIG_ENV))
    tun = FakeTun(agent.mtu)
    agent.pump_down(tun, ScriptedDownlink(batches, agent.stop))  # type: ignore[arg-type]
    every = [row for batch in batches for row in batch]
    expected = [row for row in every if packet_problem(row, max_size=tun.mtu) is None
                and not tun.refuses(row)]
    assert tun.written == expected
    assert agent.skipped_rows == len(every) - len(expected)
    assert all(len(p) <= tun.mtu for p in tun.written)


@pytest.fixture(scope="module")
def peer_a(netns_lab: LabHandle) -> Iterator[psycopg.Connection]:
    with connect_as(netns_lab, "peer-a") as conn:
        yield conn


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=20),
       st.integers(1, MAX_SEQ - 20))
def test_postgres_reads_back_exactly_what_the_copy_stream_says(
        peer_a: psycopg.Connection, packets: list[bytes], first_seq: int) -> None:
    """Into the real log, as peer-a's role, addressed to itself, and rolled back: the
    database parses every field, checks the length, and signs the row as peer-a."""
    with peer_a.transaction(force_rollback=True), peer_a.cursor(binary=True) as cur:
        with cur.copy(f"COPY pgvpn.packets ({PACKET_COLUMNS}) FROM STDIN (FORMAT BINARY)"
                      ) as copy:
            copy.write(encode_packet_rows("peer-a", first_seq, packets))
        got = cur.execute("SELECT sender, seq, receiver, length, data FROM pgvpn.inbox "
                          "WHERE sender = 'peer-a' ORDER BY seq").fetchall()
    assert [(s, n, r, ln, bytes(d)) for s, n, r, ln, d in got] == [
        ("peer-a", first_seq + i, "peer-a", len(p), p) for i, p in enumerate(packets)]
