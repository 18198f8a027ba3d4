"""Where a packet goes when the agent routes by the owner's table (routing 'table').

A snapshot of pgvpn.routes (sql/011) answers, for each packet read from the TUN, which
peer receives it: the peer whose prefix holds the destination address, longest prefix
first (as a router's table; the database refuses overlapping routes, so at most one
prefix matches today, and this stays right if that ever changes). A destination no
other peer routes has no receiver: the agent counts and drops that packet, never
guesses. The control loop swaps in a new snapshot when the owner changes the routes
(NOTIFY pgvpn_routes); the pump reads whichever one is current.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from pgvpn.tun import TunDevice

log = logging.getLogger("pgvpn.agent")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The channel sql/011's trigger notifies when the routes change.
ROUTES_CHANNEL = "pgvpn_routes"


@dataclass(frozen=True)
class RoutingTable:
    """Other peers' prefixes, by family and prefix length, for longest-prefix match."""

    me: str
    routes: tuple[tuple[str, Network], ...] = ()
    # family -> [(prefix length, {network as int: peer})], longest first
    _by_length: dict[int, list[tuple[int, dict[int, str]]]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_length: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        for peer, prefix in self.routes:
            if peer != self.me:
                by_length[prefix.version].setdefault(prefix.prefixlen, {})[
                    int(prefix.network_address)] = peer
        object.__setattr__(self, "_by_length", {
            family: sorted(lengths.items(), reverse=True)
            for family, lengths in by_length.items()})

    @classmethod
    def load(cls, conn: psycopg.Connection, me: str) -> RoutingTable:
        rows = conn.execute("SELECT peer, prefix FROM pgvpn.routes").fetchall()
        return cls(me, tuple((peer, ipaddress.ip_network(prefix)) for peer, prefix in rows))

    def receiver_of(self, packet: bytes | memoryview) -> str | None:
        """The peer that routes the packet's destination; None if no other peer does.
        The packet is a checked IPv4 or IPv6 packet (agent.packet_problem)."""
        version = packet[0] >> 4
        if version == 4:
            destination, bits = int.from_bytes(packet[16:20], "big"), 32
        else:
            destination, bits = int.from_bytes(packet[24:40], "big"), 128
        for length, networks in self._by_length[version]:
            peer = networks.get(destination >> (bits - length) << (bits - length))
            if peer is not None:
                return peer
        return None

    def senders(self) -> set[str]:
        """Every other peer with a route: those a downlink reads from."""
        return {peer for peer, _ in self.routes if peer != self.me}

    def prefixes_of_others(self) -> set[Network]:
        """What the kernel should send into the TUN: every other peer's prefixes."""
        return {prefix for peer, prefix in self.routes if peer != self.me}


def destination(packet: bytes | memoryview) -> str:
    """A checked packet's destination address, for a message."""
    if packet[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(bytes(packet[16:20])))
    return str(ipaddress.IPv6Address(bytes(packet[24:40])))


def describe(prefixes: Iterable[Network]) -> str:
    shown = sorted(map(str, prefixes))
    return ", ".join(shown) if shown else "none"


class RouteFollower:
    """Keeps the routing table and the kernel's routes on the TUN what the owner says:
    read at start, again after each NOTIFY pgvpn_routes, and on a new control
    connection (which may have missed one)."""

    def __init__(self, me: str, tun: TunDevice) -> None:
        self.me = me
        self.tun = tun
        self.table = RoutingTable(me)
        self.listener: psycopg.Connection | None = None  # the one LISTENing
        self.read_at = 0.0  # time.monotonic() of the last read

    def follow(self, control: psycopg.Connection, wait: float = 0.2) -> None:
        """Read the routes if they changed, waiting up to `wait` s for a change (in
        routing 'table' the control loop's sleep, so a change applies at once)."""
        if self.listener is not control:
            control.execute(f'LISTEN "{ROUTES_CHANNEL}"')  # before reading: none missed
            self.listener = control
        elif not any(True for _ in control.notifies(timeout=wait, stop_after=1)):
            return
        for _ in control.notifies(timeout=0):
            pass  # one read serves every change already queued
        self.read_at = time.monotonic()
        table = RoutingTable.load(control, self.me)
        changed = table.routes != self.table.routes or not self.tun.routed
        self.table = table  # the uplink's pump takes it from its next batch on
        for problem in self.tun.route(table.prefixes_of_others()):
            log.warning("routes: %s", problem)
        if changed:
            log.info("routes: %s into %s (peers %s)", describe(self.tun.routed),
                     self.tun.name, ", ".join(sorted(table.senders())) or "none")
