"""Unit tests: what the agent accepts as an IP packet (from the TUN or from a row)."""

from __future__ import annotations

import struct

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from pgvpn.packets import packet_problem


def ipv4_udp(payload: bytes = b"hello") -> bytes:
    udp = dpkt.udp.UDP(sport=4000, dport=9, data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=bytes([10, 230, 0, 1]), dst=bytes([10, 230, 0, 2]), p=17, data=udp)
    ip.len = len(ip)
    return bytes(ip)


def ipv6_udp(payload: bytes = b"hello") -> bytes:
    udp = dpkt.udp.UDP(sport=4000, dport=9, data=payload)
    udp.ulen = len(udp)
    ip6 = dpkt.ip6.IP6(src=b"\xfd" + bytes(14) + b"\x01", dst=b"\xfd" + bytes(14) + b"\x02",
                       nxt=17, hlim=64, data=udp)
    ip6.plen = len(udp)
    return bytes(ip6)


def test_whole_ipv4_and_ipv6_packets_are_accepted() -> None:
    assert packet_problem(ipv4_udp()) is None
    assert packet_problem(ipv6_udp()) is None


def test_ipv4_with_options_is_accepted() -> None:
    packet = bytearray(ipv4_udp())
    options = b"\x01\x01\x01\x01"  # four NOPs
    packet = bytearray(packet[:20] + options + packet[20:])
    packet[0] = 0x46
    packet[2:4] = struct.pack("!H", len(packet))
    assert packet_problem(bytes(packet)) is None


def test_truncated_and_padded_packets_are_refused() -> None:
    good = ipv4_udp()
    assert "does not match" in (packet_problem(good[:-1]) or "")
    assert "does not match" in (packet_problem(good + b"\0") or "")
    assert "IPv6 payload length" in (packet_problem(ipv6_udp()[:-2]) or "")


def test_short_empty_and_foreign_frames_are_refused() -> None:
    assert packet_problem(b"") == "empty frame"
    assert "shorter than a header" in (packet_problem(b"\x45" + bytes(10)) or "")
    assert "shorter than a header" in (packet_problem(b"\x60" + bytes(20)) or "")
    assert "neither 4 nor 6" in (packet_problem(b"\x50" + bytes(30)) or "")
    bad_ihl = bytearray(ipv4_udp())
    bad_ihl[0] = 0x44  # header length 16 < 20
    assert "header length" in (packet_problem(bytes(bad_ihl)) or "")


@given(st.binary(max_size=200))
def test_any_bytes_get_an_answer_and_never_raise(frame: bytes) -> None:
    problem = packet_problem(frame)
    assert problem is None or isinstance(problem, str)
    if problem is None:  # anything accepted is self-consistent
        assert frame[0] >> 4 in (4, 6)


@given(st.binary(min_size=0, max_size=1400))
def test_every_well_formed_ipv4_udp_packet_is_accepted(payload: bytes) -> None:
    assert packet_problem(ipv4_udp(payload)) is None
    assert packet_problem(ipv6_udp(payload)) is None


def test_limits_are_inclusive_and_lengths_read_both_bytes() -> None:
    """A header-only packet, one exactly the MTU, and lengths above 255 (whose high byte
    counts) are all whole packets; one byte over the MTU is not."""
    header_only = bytes(dpkt.ip.IP(src=bytes(4), dst=bytes(4), p=0, len=20))
    assert len(header_only) == 20 and packet_problem(header_only) is None
    ip6_header_only = ipv6_udp()[:40]
    ip6_header_only = ip6_header_only[:4] + b"\0\0" + ip6_header_only[6:]
    assert packet_problem(ip6_header_only) is None
    for big in (ipv4_udp(bytes(1472)), ipv6_udp(bytes(1452))):
        assert len(big) == 1500
        assert packet_problem(big, max_size=1500) is None
        assert packet_problem(big, max_size=1499) == "1500-byte packet exceeds the MTU of 1499"
    long_header = bytearray(ipv4_udp(bytes(20)))
    long_header[0] = 0x4F  # 60-byte header in a 48-byte frame
    assert packet_problem(bytes(long_header)) == "IPv4 header length 60 is invalid"
