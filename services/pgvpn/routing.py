"""Where a packet goes when the agent routes by the owner's table (routing 'table').

A snapshot of pgvpn.routes (sql/011) answers, for each packet read from the TUN, which
peer receives it: the peer whose prefix holds the destination address, longest prefix
first (as a router's table; the database refuses overlapping routes, so at most one
prefix matches today). A destination no other peer routes has no receiver: the agent
counts and drops that packet, never guesses. On the way in, the same table says which
sender a packet's source address belongs to (pgvpn.transports.fleet). The control
loop swaps in a new snapshot when the owner changes the routes (NOTIFY pgvpn_routes);
the pump reads whichever one is current.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from pgvpn import db
from pgvpn.tun import TunDevice

log = logging.getLogger("pgvpn.agent")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The channel sql/011's trigger notifies when the routes change.
ROUTES_CHANNEL = "pgvpn_routes"
#: Seconds: an agent reads the routes at most this often. Anyone may NOTIFY any
#: channel; a flood of them costs a few reads a second, and a change waits in the
#: queue meanwhile, never lost.
ROUTES_MIN_INTERVAL = 0.5


@dataclass(frozen=True)
class RoutingTable:
    """Every peer's prefixes, by family and prefix length, for longest-prefix match."""

    me: str
    routes: tuple[tuple[str, Network], ...] = ()
    # family -> [(prefix length, {network as int: peer})], longest first
    _by_length: dict[int, list[tuple[int, dict[int, str]]]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_length: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        for peer, prefix in self.routes:  # this peer's own too: a match there is no one's
            by_length[prefix.version].setdefault(prefix.prefixlen, {})[
                int(prefix.network_address)] = peer
        object.__setattr__(self, "_by_length", {
            family: sorted(lengths.items(), reverse=True)
            for family, lengths in by_length.items()})

    @classmethod
    def load(cls, conn: psycopg.Connection, me: str) -> RoutingTable:
        rows = conn.execute("SELECT peer, prefix FROM pgvpn.routes ORDER BY peer, prefix"
                            ).fetchall()
        return cls(me, tuple((peer, ipaddress.ip_network(prefix)) for peer, prefix in rows))

    def _match(self, packet: bytes | memoryview, start: int) -> str | None:
        """Whose route holds the address at `start` (16 or 24: the destination; 12 or
        8: the source) of a checked IPv4 or IPv6 packet, longest prefix first."""
        version = packet[0] >> 4
        if version == 4:
            address, bits = int.from_bytes(packet[start:start + 4], "big"), 32
        elif version != 6:
            return None  # a logged row that is no IP packet: no one's
        else:
            address, bits = int.from_bytes(packet[start:start + 16], "big"), 128
        for length, networks in self._by_length[version]:
            peer = networks.get(address >> (bits - length) << (bits - length))
            if peer is not None:
                return peer
        return None

    def receiver_of(self, packet: bytes | memoryview) -> str | None:
        """The peer that routes the packet's destination; None if none other does."""
        peer = self._match(packet, 16 if packet[0] >> 4 == 4 else 24)
        return None if peer == self.me else peer

    def sent_by(self, packet: bytes | memoryview) -> str | None:
        """The peer whose routes hold the packet's source: the only sender it may come
        from (WireGuard's rule for AllowedIPs), so that no peer can pass its packets
        off as another's or inject them into a subnet it does not route."""
        return self._match(packet, 12 if packet[0] >> 4 == 4 else 8)

    def addresses_of(self, peer: str) -> set[Network]:
        return {prefix for owner, prefix in self.routes if owner == peer}

    def senders(self) -> set[str]:
        """Every other peer with a route: those a downlink reads from."""
        return {peer for peer, _ in self.routes if peer != self.me}

    def prefixes_of_others(self) -> set[Network]:
        """What the kernel should send into the TUN: every other peer's prefixes."""
        return {prefix for peer, prefix in self.routes if peer != self.me}


def destination(packet: bytes | memoryview) -> str:
    """A packet's destination address, for a message."""
    return _address(packet, 16, 24)


def source(packet: bytes | memoryview) -> str:
    """A packet's source address, for a message."""
    return _address(packet, 12, 8)


def _address(packet: bytes | memoryview, v4_start: int, v6_start: int) -> str:
    if packet[:1] and packet[0] >> 4 == 4 and len(packet) >= 20:
        return str(ipaddress.IPv4Address(bytes(packet[v4_start:v4_start + 4])))
    if packet[:1] and packet[0] >> 4 == 6 and len(packet) >= 40:
        return str(ipaddress.IPv6Address(bytes(packet[v6_start:v6_start + 16])))
    return "none (not an IP packet)"  # a logged row can be anything


def routable(prefixes: Iterable[Network], tun_name: str, addresses: Iterable[Interface],
             databases: Iterable[Address]) -> tuple[set[Network], list[str]]:
    """The prefixes that may go into the TUN, and why each other one may not: it holds
    an address of the database, or the TUN has no address of its family."""
    families = {address.version for address in addresses}
    wanted, problems = set(), []
    for prefix in sorted(prefixes, key=str):
        held = sorted((d for d in databases if d in prefix), key=str)
        if held:
            problems.append(f"{prefix} not routed into {tun_name}: it holds the database's "
                            f"address {', '.join(map(str, held))}, which this agent reaches "
                            "outside the tunnel")
        elif prefix.version not in families:
            setting = "TUN_IP6" if prefix.version == 6 else "TUN_IP"
            problems.append(f"{prefix} not routed into {tun_name}: it has no "
                            f"IPv{prefix.version} address ({setting})")
        else:
            wanted.add(prefix)
    return wanted, problems


def describe(prefixes: Iterable[Network]) -> str:
    shown = sorted(map(str, prefixes))
    return ", ".join(shown) if shown else "none"


class RouteFollower:
    """Keeps the routing table and the kernel's routes on the TUN what the owner says:
    read at start, again after each NOTIFY pgvpn_routes, and on a new control
    connection (which may have missed one).

    Never routed into the TUN, with a warning: a prefix that holds an address of the
    database (the agent's own connections would go into the tunnel they carry, and
    the whole fleet would go dark), or one of a family the TUN has no address of.
    The database's addresses are every host of its connection string (a replicated
    database: the standby is the next primary) and the one each new control
    connection reached."""

    def __init__(self, me: str, tun: TunDevice, addresses: list[Interface],
                 databases: Iterable[Address]) -> None:
        self.me = me
        self.tun = tun
        self.addresses = addresses
        self.databases = set(databases)
        self.table = RoutingTable(me)
        self.listener: psycopg.Connection | None = None  # the one LISTENing
        self.read_at = 0.0  # time.monotonic() of the last read

    def follow(self, control: psycopg.Connection, wait: float = 0.2) -> None:
        """Read the routes if they changed, waiting up to `wait` s for a change (in
        routing 'table' the control loop's sleep, so a change applies at once)."""
        if self.listener is not control:
            control.execute(f'LISTEN "{ROUTES_CHANNEL}"')  # before reading: none missed
            self.listener = control
            reached = db.server_address(control)
            if reached is not None:
                self.databases.add(reached)
        elif not db.notified(control, wait):
            return
        first, self.read_at = self.read_at == 0.0, time.monotonic()
        table = RoutingTable.load(control, self.me)
        changed = first or table.routes != self.table.routes
        self.table = table  # the uplink's pump takes it from its next batch on
        wanted, problems = self._routable(table.prefixes_of_others())
        problems += self.tun.route(wanted)
        if changed or not self.tun.routed:
            problems += self._own_addresses(table)
            log.info("routes: %s into %s (peers %s)", describe(self.tun.routed),
                     self.tun.name, ", ".join(sorted(table.senders())) or "none")
            for problem in problems:
                log.warning("routes: %s", problem)

    def _routable(self, prefixes: set[Network]) -> tuple[set[Network], list[str]]:
        return routable(prefixes, self.tun.name, self.addresses, self.databases)

    def _own_addresses(self, table: RoutingTable) -> list[str]:
        """Whether the owner routes this peer's addresses to it: if not, no other peer
        sends it anything (`pgvpn db set-routes` adds them)."""
        own = table.addresses_of(self.me)
        return [f"this peer's address {address.ip} is not among its routes, so no other "
                f"peer sends anything to it: the owner adds it ('pgvpn db set-routes "
                f"{self.me} --address {address}', with the peer's other routes)"
                for address in self.addresses if ipaddress.ip_network(address.ip) not in own]
