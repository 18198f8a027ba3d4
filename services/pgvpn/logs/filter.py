"""Which logged packets a command is about: one filter model for log, stats, export, replay.

The same options mean the same thing everywhere, and they become one SQL WHERE
clause over the pgvpn.packet_headers view (migration 003). Conditions on raw
columns (peers, time) are what PostgreSQL prunes partitions with; the decoded
ones (addresses, protocol, ports) cost a header decode per candidate row.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from pgvpn.config import PEER_NAME
from pgvpn.errors import PgvpnError
from pgvpn.timespec import parse_time

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "ipv6": 41, "gre": 47, "esp": 50,
             "ah": 51, "icmpv6": 58, "sctp": 132, "udplite": 136}


class FilterError(PgvpnError):
    """A filter option with a value that cannot mean anything."""


def parse_protocol(text: str) -> int:
    """'tcp' -> 6, '17' -> 17; the names the view prints, or a protocol number."""
    lowered = text.strip().lower()
    if lowered in PROTOCOLS:
        return PROTOCOLS[lowered]
    if lowered.isascii() and lowered.isdigit() and int(lowered) <= 255:
        return int(lowered)
    raise FilterError(f"unknown protocol {text!r}: use {', '.join(PROTOCOLS)} or a number "
                      "0-255")


def parse_network(text: str) -> Network:
    """'10.230.0.2' or '10.230.0.0/24' or 'fd00:230::/64'; host bits are allowed."""
    try:
        if "%" in text:  # a scope id (fe80::1%eth0): the database's inet has none
            raise ValueError(text)
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise FilterError(f"bad address {text!r}: give an IPv4 or IPv6 address, optionally "
                          "with a prefix length (10.230.0.2, 10.230.0.0/24)") from None


def parse_port(text: str) -> int:
    if text.strip().isascii() and text.strip().isdigit() and int(text) <= 65535:
        return int(text)
    raise FilterError(f"bad port {text!r}: give a number 0-65535")


def parse_peer(text: str) -> str:
    if not PEER_NAME.match(text):
        raise FilterError(f"bad peer name {text!r}: 1-57 lower-case letters, digits or '-'")
    return text


@dataclass(frozen=True)
class LogFilter:
    """A selection of logged packets. Lists mean "any of"; different fields must all hold."""

    peers: tuple[str, ...] = ()      # sender or receiver
    senders: tuple[str, ...] = ()
    receivers: tuple[str, ...] = ()
    hosts: tuple[Network, ...] = ()  # source or destination
    sources: tuple[Network, ...] = ()
    destinations: tuple[Network, ...] = ()
    protocols: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()      # source or destination port
    since: datetime | None = None    # inclusive
    until: datetime | None = None    # exclusive

    def __post_init__(self) -> None:
        if self.since and self.until and self.since >= self.until:
            raise FilterError(f"--since {self.since:%Y-%m-%d %H:%M:%S} is not before --until "
                              f"{self.until:%Y-%m-%d %H:%M:%S}: the window is empty")

    @property
    def needs_decoding(self) -> bool:
        """True if any condition is on a header field rather than on a raw column."""
        return bool(self.hosts or self.sources or self.destinations or self.protocols
                    or self.ports)

    def where(self, alias: str = "h") -> tuple[sql.Composable, list[Any]]:
        """The WHERE clause body (or TRUE) and its parameters, over view alias `alias`."""
        col = _columns(alias)
        parts: list[sql.Composable] = []
        params: list[Any] = []

        def add(template: str, *values: Any) -> None:
            parts.append(sql.SQL(template).format(**col))
            params.extend(values)

        if self.peers:
            add("({sender} = ANY(%s) OR {receiver} = ANY(%s))", list(self.peers),
                list(self.peers))
        if self.senders:
            add("{sender} = ANY(%s)", list(self.senders))
        if self.receivers:
            add("{receiver} = ANY(%s)", list(self.receivers))
        if self.since is not None:
            add("{logged_at} >= %s", self.since)
        if self.until is not None:
            add("{logged_at} < %s", self.until)
        if self.hosts:
            nets = [str(n) for n in self.hosts]
            add("({src} <<= ANY(%s::inet[]) OR {dst} <<= ANY(%s::inet[]))", nets, nets)
        if self.sources:
            add("{src} <<= ANY(%s::inet[])", [str(n) for n in self.sources])
        if self.destinations:
            add("{dst} <<= ANY(%s::inet[])", [str(n) for n in self.destinations])
        if self.protocols:
            add("{protocol_number} = ANY(%s::smallint[])", list(self.protocols))
        if self.ports:
            add("({src_port} = ANY(%s::integer[]) OR {dst_port} = ANY(%s::integer[]))",
                list(self.ports), list(self.ports))
        if not parts:
            return sql.SQL("TRUE"), []
        return sql.SQL(" AND ").join(parts), params

    def describe(self) -> str:
        """A short human summary for headings, e.g. 'peer-a, tcp, port 5201, last 10m'."""
        words: list[str] = []
        words += [f"peer {p}" for p in self.peers]
        words += [f"from peer {p}" for p in self.senders]
        words += [f"to peer {p}" for p in self.receivers]
        words += [f"host {n}" for n in self.hosts]
        words += [f"src {n}" for n in self.sources]
        words += [f"dst {n}" for n in self.destinations]
        names = {number: name for name, number in PROTOCOLS.items()}
        words += [names.get(p, f"protocol {p}") for p in self.protocols]
        words += [f"port {p}" for p in self.ports]
        if self.since:
            words.append(f"since {self.since.astimezone():%Y-%m-%d %H:%M:%S}")
        if self.until:
            words.append(f"until {self.until.astimezone():%Y-%m-%d %H:%M:%S}")
        return ", ".join(words) or "all packets"


def _columns(alias: str) -> dict[str, sql.Composable]:
    names = ("sender", "receiver", "logged_at", "src", "dst", "protocol_number", "src_port",
             "dst_port")
    return {name: sql.Identifier(alias, name) for name in names}


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The selection options every log command shares (see FILTER_HELP)."""
    group = parser.add_argument_group("selection", "repeat an option to match any of its "
                                      "values; different options must all match")
    peers, networks = checked_each(parse_peer), checked_each(parse_network)
    group.add_argument("--peer", action="append", default=[], metavar="NAME", type=peers,
                       help="packets sent or received by this peer")
    group.add_argument("--sender", action="append", default=[], metavar="NAME", type=peers,
                       help="packets sent by this peer")
    group.add_argument("--receiver", action="append", default=[], metavar="NAME", type=peers,
                       help="packets addressed to this peer")
    group.add_argument("--host", action="append", default=[], metavar="ADDR[/N]",
                       type=networks,
                       help="source or destination address in this address or network")
    group.add_argument("--src", action="append", default=[], metavar="ADDR[/N]",
                       type=networks, help="source address in this address or network")
    group.add_argument("--dst", action="append", default=[], metavar="ADDR[/N]",
                       type=networks, help="destination address in this address or network")
    group.add_argument("--proto", action="append", default=[], metavar="NAME",
                       type=checked_each(parse_protocol),
                       help=f"IP protocol: {', '.join(PROTOCOLS)} or a number")
    group.add_argument("--port", action="append", default=[], metavar="N",
                       type=checked_each(parse_port),
                       help="TCP/UDP/SCTP source or destination port")
    when = checked_each(lambda text: parse_time(text, datetime.now(UTC)), split=False)
    group.add_argument("--since", metavar="WHEN", type=when,
                       help="start of the window: a duration ago (10m, 2h, 1d) or ISO time")
    group.add_argument("--until", metavar="WHEN", type=when,
                       help="end of the window (exclusive): a duration ago or ISO time")


def checked_each(parse: Callable[[str], object], *, split: bool = True
                 ) -> Callable[[str], str]:
    """An argparse type: every (comma-separated) value must parse; the text is kept as
    given, and filter_from_args reads it when the command runs."""
    def check(text: str) -> str:
        try:
            if not split:
                parse(text)
            elif not _each([text], parse):
                raise FilterError(f"{text!r}: give a value")
        except PgvpnError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def filter_from_args(args: argparse.Namespace, now: datetime | None = None) -> LogFilter:
    """Validate the selection options; raises FilterError/TimeSpecError with one line."""
    now = now or datetime.now(UTC)
    return LogFilter(
        peers=_each(args.peer, parse_peer), senders=_each(args.sender, parse_peer),
        receivers=_each(args.receiver, parse_peer),
        hosts=_each(args.host, parse_network), sources=_each(args.src, parse_network),
        destinations=_each(args.dst, parse_network),
        protocols=_each(args.proto, parse_protocol), ports=_each(args.port, parse_port),
        since=parse_time(args.since, now) if args.since else None,
        until=parse_time(args.until, now) if args.until else None)


def _each(values: Sequence[str] | None, parse: Any) -> tuple[Any, ...]:
    """Parse every value; commas separate values too (--port 80,443)."""
    result = []
    for value in values or ():
        result += [parse(item) for item in value.split(",") if item.strip()]
    return tuple(dict.fromkeys(result))
