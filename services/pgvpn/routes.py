"""The owner's routing table (sql/011_routes.sql): which prefixes each peer routes.

A peer's tunnel addresses become host routes (10.230.0.3/24 routes 10.230.0.3/32), as
WireGuard's AllowedIPs; subnets behind it are routes of their own. The database
refuses overlapping routes; this module turns its refusal into a sentence that names
the route in the way and its peer.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from pgvpn.errors import PgvpnError

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def tunnel_address(text: str) -> Interface:
    """A peer's tunnel address with its subnet's mask (10.230.0.3/24; no mask: /32)."""
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no IP address (e.g. 10.230.0.3/24 or fd00:230::3/64)") from None
    if address.ip.is_multicast or address.ip.is_unspecified or address.ip.is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: not an address a peer can have")
    if (isinstance(address, ipaddress.IPv4Interface) and address.network.prefixlen <= 30
            and address.ip in (address.network.network_address,
                               address.network.broadcast_address)):
        raise argparse.ArgumentTypeError(
            f"{text}: that is the subnet's network or broadcast address, not a host's")
    return address


def route_prefix(text: str) -> Network:
    """A prefix a peer routes (192.168.50.0/24); host bits set is a mistake, said so."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            meant = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is no IP prefix (e.g. 192.168.50.0/24): {exc}") from None
        raise argparse.ArgumentTypeError(
            f"{text} has host bits set: did you mean {meant}?") from None


def host_route(address: Interface) -> Network:
    return ipaddress.ip_network(address.ip)


@dataclass(frozen=True)
class Routes:
    """What one peer routes: at most one address per family, and subnets."""

    addresses: tuple[Interface, ...] = ()
    subnets: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        families = [a.version for a in self.addresses]
        if len(families) != len(set(families)):
            raise PgvpnError("a peer has at most one IPv4 and one IPv6 tunnel address")
        prefixes = self.prefixes()
        for i, one in enumerate(prefixes):
            for other in prefixes[i + 1:]:
                if one.version == other.version and one.overlaps(other):
                    raise PgvpnError(f"routes {one} and {other} overlap: give each "
                                     "destination once (a peer's address is its route "
                                     "already)")

    def prefixes(self) -> list[Network]:
        return [host_route(a) for a in self.addresses] + list(self.subnets)

    def rows(self, peer: str) -> list[tuple[str, str, str | None]]:
        return ([(peer, str(host_route(a)), str(a)) for a in self.addresses]
                + [(peer, str(s), None) for s in self.subnets])


def add_routes(conn: psycopg.Connection, peer: str, routes: Routes, *,
               replace: bool = False) -> None:
    """Give `peer` these routes (with `replace`, exactly these), in one transaction."""
    with conn.transaction():
        if replace:
            conn.execute("DELETE FROM pgvpn.routes WHERE peer = %s", [peer])
        for row in routes.rows(peer):
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO pgvpn.routes (peer, prefix, address) "
                                 "VALUES (%s, %s, %s)", row)
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "routes_one_address_per_family":
                    raise PgvpnError(
                        f"peer {peer} has a tunnel address of that family already: "
                        f"'pgvpn db set-routes {peer}' replaces its addresses and routes"
                    ) from None
                # (peer, prefix) is there already: the same route given again adds
                # nothing; an address where a subnet is, or another mask, is a change
                found = conn.execute("SELECT address::text FROM pgvpn.routes "
                                     "WHERE peer = %s AND prefix = %s", [peer, row[1]]
                                     ).fetchone()
                existing = found[0] if found else None
                if existing != row[2]:
                    what = (f"has the tunnel address {existing}" if existing
                            else f"routes {row[1]} as a subnet")
                    raise PgvpnError(f"peer {peer} {what} already: 'pgvpn db set-routes "
                                     f"{peer}' replaces its addresses and routes") from None
            except psycopg.errors.ExclusionViolation:
                raise overlap_error(conn, peer, row[1]) from None


def overlap_error(conn: psycopg.Connection, peer: str, prefix: str) -> PgvpnError:
    """Which route is in the way of `prefix`, and whose."""
    found = conn.execute("SELECT peer, prefix::text FROM pgvpn.routes WHERE prefix && %s::cidr "
                         "ORDER BY masklen(prefix) LIMIT 1", [prefix]).fetchone()
    if found is None:  # gone meanwhile: another owner's transaction
        return PgvpnError(f"route {prefix} of {peer} overlaps a route being changed "
                          "meanwhile: try again")
    where = ("is routed by" if found[1] == prefix else f"overlaps {found[1]}, routed by")
    return PgvpnError(f"route {prefix} of {peer} {where} {found[0]}: a destination has "
                      "one peer (change that peer's routes first with 'pgvpn db "
                      f"set-routes {found[0]}')")


def peer_routes(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Each peer's routes that this connection may read, addresses first."""
    routed: dict[str, list[str]] = {}
    for peer, prefix in conn.execute(
            "SELECT peer, prefix::text FROM pgvpn.routes "
            "ORDER BY peer, address IS NULL, family(prefix), prefix").fetchall():
        routed.setdefault(peer, []).append(prefix)
    return routed


def add_route_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", action="append", default=[], type=tunnel_address,
                        metavar="ADDR/MASK",
                        help="the peer's tunnel address with its subnet's mask, e.g. "
                        "10.230.0.3/24; one IPv4 and one IPv6 at most; routed to it as a "
                        "host route (10.230.0.3/32)")
    parser.add_argument("--route", action="append", default=[], type=route_prefix,
                        metavar="PREFIX",
                        help="a subnet behind the peer, e.g. 192.168.50.0/24 (repeatable); "
                        "no two peers' routes may overlap")


def routes_given(args: argparse.Namespace) -> Routes:
    return Routes(tuple(args.address), tuple(args.route))


def check_peer_exists(conn: psycopg.Connection, peer: str) -> None:
    if conn.execute("SELECT FROM pgvpn.peers WHERE name = %s", [peer]).fetchone() is None:
        raise PgvpnError(f"no peer {peer}: add it with 'pgvpn db add-peer {peer} "
                         "--password-file FILE' first")


def describe(peer: str, routes: Sequence[str]) -> str:
    return f"peer {peer} routes {', '.join(routes) if routes else 'nothing'}"
