"""Unit tests: the log selection options (pgvpn.logs.filter), every field and its limits."""

from __future__ import annotations

import argparse
import ipaddress
from datetime import UTC, datetime, timedelta

import pytest

from pgvpn.errors import PgvpnError
from pgvpn.logs.filter import (
    FilterError,
    LogFilter,
    add_filter_arguments,
    checked_each,
    filter_from_args,
    parse_network,
    parse_port,
    parse_protocol,
)

NOW = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)


def parser() -> argparse.ArgumentParser:
    """The shared options alone, on a parser that raises instead of exiting."""
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_filter_arguments(parser)
    return parser


def test_every_option_is_declared_as_documented() -> None:
    """Names, metavars and help are what `--help` shows, in one 'selection' group."""
    (group,) = [g for g in parser()._action_groups if g.title == "selection"]
    assert group.description == ("repeat an option to match any of its values; different "
                                 "options must all match")
    declared = {a.option_strings[0]: (a.dest, a.metavar, a.help)
                for a in group._group_actions}
    assert declared == {
        "--peer": ("peer", "NAME", "packets sent or received by this peer"),
        "--sender": ("sender", "NAME", "packets sent by this peer"),
        "--receiver": ("receiver", "NAME", "packets addressed to this peer"),
        "--host": ("host", "ADDR[/N]",
                   "source or destination address in this address or network"),
        "--src": ("src", "ADDR[/N]", "source address in this address or network"),
        "--dst": ("dst", "ADDR[/N]", "destination address in this address or network"),
        "--proto": ("proto", "NAME", "IP protocol: icmp, igmp, tcp, udp, ipv6, gre, esp, ah, "
                    "icmpv6, sctp, udplite or a number"),
        "--port": ("port", "N", "TCP/UDP/SCTP source or destination port"),
        "--since": ("since", "WHEN",
                    "start of the window: a duration ago (10m, 2h, 1d) or ISO time"),
        "--until": ("until", "WHEN",
                    "end of the window (exclusive): a duration ago or ISO time"),
    }


def test_options_repeat_and_default_to_nothing() -> None:
    lists = ("peer", "sender", "receiver", "host", "src", "dst", "proto", "port")
    empty = parser().parse_args([])
    assert [getattr(empty, name) for name in lists] == [[]] * len(lists)
    assert (empty.since, empty.until) == (None, None)
    values = {"peer": "peer-1", "sender": "peer-1", "receiver": "peer-1", "host": "10.0.0.1",
              "src": "10.0.0.1", "dst": "10.0.0.1", "proto": "1", "port": "1"}
    repeated = parser().parse_args(
        [arg for name in lists for arg in (f"--{name}", values[name]) * 2])
    assert [len(getattr(repeated, name)) for name in lists] == [2] * len(lists)


@pytest.mark.parametrize(("option", "value"), [
    ("--peer", "Peer"), ("--sender", "Peer"), ("--receiver", "Peer"), ("--host", "x"),
    ("--src", "x"), ("--dst", "x"), ("--proto", "x"), ("--port", "x"), ("--since", "later"),
    ("--until", "later"), ("--port", ","),
])
def test_each_option_checks_its_value_while_parsing(option: str, value: str) -> None:
    with pytest.raises(argparse.ArgumentError):
        parser().parse_args([option, value])


def test_times_are_not_split_at_commas() -> None:
    """An ISO time may have a decimal comma: only the list options split at commas."""
    args = parser().parse_args(["--since", "2025-11-25T11:00:00,5+00:00"])
    assert filter_from_args(args, NOW).since == datetime(2025, 11, 25, 11, 0, 0, 500000,
                                                          tzinfo=UTC)


def test_an_empty_list_value_is_refused() -> None:
    check = checked_each(parse_port)
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        check(" , ")
    assert str(caught.value) == "' , ': give a value"


def test_every_field_reaches_the_where_clause_and_the_summary() -> None:
    args = parser().parse_args([
        "--peer", "peer-a", "--sender", "peer-b", "--receiver", "peer-c,peer-d",
        "--host", "10.230.0.0/24", "--src", "10.230.0.1", "--dst", "fd00:230::2",
        "--proto", "udp,99", "--port", "53", "--since", "2h", "--until", "1h"])
    flt = filter_from_args(args, NOW)
    where, params = flt.where("x")
    assert where.as_string(None) == (
        '("x"."sender" = ANY(%s) OR "x"."receiver" = ANY(%s)) AND "x"."sender" = ANY(%s) AND '
        '"x"."receiver" = ANY(%s) AND "x"."logged_at" >= %s AND "x"."logged_at" < %s AND '
        '("x"."src" <<= ANY(%s::inet[]) OR "x"."dst" <<= ANY(%s::inet[])) AND '
        '"x"."src" <<= ANY(%s::inet[]) AND "x"."dst" <<= ANY(%s::inet[]) AND '
        '"x"."protocol_number" = ANY(%s::smallint[]) AND '
        '("x"."src_port" = ANY(%s::integer[]) OR "x"."dst_port" = ANY(%s::integer[]))')
    assert params == [["peer-a"], ["peer-a"], ["peer-b"], ["peer-c", "peer-d"],
                      NOW - timedelta(hours=2), NOW - timedelta(hours=1),
                      ["10.230.0.0/24"], ["10.230.0.0/24"], ["10.230.0.1/32"],
                      ["fd00:230::2/128"], [17, 99], [53], [53]]
    local = "%Y-%m-%d %H:%M:%S"
    assert flt.describe() == (
        "peer peer-a, from peer peer-b, to peer peer-c, to peer peer-d, host 10.230.0.0/24, "
        "src 10.230.0.1/32, dst fd00:230::2/128, udp, protocol 99, port 53, "
        f"since {(NOW - timedelta(hours=2)).astimezone():{local}}, "
        f"until {(NOW - timedelta(hours=1)).astimezone():{local}}")
    assert LogFilter().describe() == "all packets"


@pytest.mark.parametrize("field", ["hosts", "sources", "destinations", "protocols", "ports"])
def test_each_header_field_needs_decoding(field: str) -> None:
    value = {"protocols": (6,), "ports": (80,)}.get(field, (parse_network("10.0.0.1"),))
    assert LogFilter(**{field: value}).needs_decoding  # type: ignore[arg-type]
    assert not LogFilter(peers=("peer-a",), since=NOW).needs_decoding


def test_without_a_reference_time_durations_count_back_from_now() -> None:
    flt = filter_from_args(parser().parse_args(["--since", "10m"]))
    assert flt.since is not None and flt.since.tzinfo is not None
    assert abs(datetime.now(UTC) - timedelta(minutes=10) - flt.since) < timedelta(minutes=1)


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(FilterError) as caught:
        LogFilter(since=NOW, until=NOW)
    assert str(caught.value) == ("--since 2025-11-25 12:00:00 is not before --until "
                                 "2025-11-25 12:00:00: the window is empty")


def test_numbers_up_to_their_limits() -> None:
    assert (parse_protocol("255"), parse_protocol(" Sctp ")) == (255, 132)
    assert (parse_port("0"), parse_port("65535")) == (0, 65535)
    with pytest.raises(FilterError) as caught:
        parse_protocol("256")
    assert str(caught.value) == ("unknown protocol '256': use icmp, igmp, tcp, udp, ipv6, gre, "
                                 "esp, ah, icmpv6, sctp, udplite or a number 0-255")
    with pytest.raises(FilterError) as caught:
        parse_port("65536")
    assert str(caught.value) == "bad port '65536': give a number 0-65535"


@pytest.mark.parametrize("text", ["10.0.0.300", "fe80::1%eth0", ""])
def test_bad_addresses_say_what_an_address_looks_like(text: str) -> None:
    """A scope id (fe80::1%eth0) is refused: the database's inet type has none."""
    with pytest.raises(FilterError) as caught:
        parse_network(text)
    assert str(caught.value) == (
        f"bad address {text!r}: give an IPv4 or IPv6 address, optionally with a prefix "
        "length (10.230.0.2, 10.230.0.0/24)")
    assert parse_network(" 10.1.2.3/8 ") == ipaddress.ip_network("10.0.0.0/8")


def test_bad_peer_names_say_what_a_name_is() -> None:
    args = parser().parse_args([])
    args.peer = ["Peer-A"]
    with pytest.raises(PgvpnError) as caught:
        filter_from_args(args, NOW)
    assert str(caught.value) == "bad peer name 'Peer-A': 1-57 lower-case letters, digits or '-'"
