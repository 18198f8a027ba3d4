"""pgvpn.offload: virtio_net_hdr checks, checksum completion and TCP segmentation.

Super-packets are built by hand as a Linux TUN with TSO hands them out; what the
module makes of them is verified independently of it: RFC 1071 word by word here,
dpkt's parser for the fields, and tshark's checksum validation.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvpn.logs.pcap import write_pcap
from pgvpn.offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    NO_OFFLOAD,
    VNET_HDR_LEN,
    VirtioNetHdr,
    complete_checksum,
    header_problem,
    internet_checksum,
    wire_count,
    wire_packets,
)

SRC4, DST4 = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
SRC6 = ipaddress.IPv6Address("fd00:77::1").packed
DST6 = ipaddress.IPv6Address("fd00:77::2").packed
FIN, SYN, PSH, ACK, CWR = 0x01, 0x02, 0x08, 0x10, 0x80
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)  # NOP NOP TS: 12 bytes
MSS = 1448  # at MTU 1500: 1500 - 20 - 32 (IPv4, TCP with timestamps)
MSS6 = 1440  # 1500 - 40 - 20 (IPv6, TCP without options)
IP_ID = 0x4321
FIRST_SEQ = 1_000_000


def word_sum(data: bytes) -> int:
    """RFC 1071 by the book: 16-bit words added one at a time, carries wrapped around."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ip_header_length(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def pseudo_header(packet: bytes, tcp_length: int) -> bytes:
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, 6, tcp_length)
    return packet[8:40] + struct.pack("!I3xB", tcp_length, 6)


def tcp_checksum_ok(packet: bytes) -> bool:
    segment = packet[ip_header_length(packet):]
    return word_sum(pseudo_header(packet, len(segment)) + segment) == 0xFFFF


def ip_checksum_ok(packet: bytes) -> bool:
    return packet[0] >> 4 == 6 or word_sum(packet[:ip_header_length(packet)]) == 0xFFFF


def with_u16(packet: bytes, at: int, value: int) -> bytes:
    return packet[:at] + struct.pack("!H", value) + packet[at + 2:]


def tcp_header(flags: int, options: bytes = b"", seq: int = FIRST_SEQ) -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40123, 5201, seq, 777, offset << 4, flags, 502, 0, 0
                       ) + options


def ip_packet(version: int, segment: bytes, ident: int = IP_ID) -> bytes:
    """An IP packet around a TCP segment, with a valid IPv4 header checksum."""
    if version == 6:
        return struct.pack("!IHBB16s16s", 0x6000_0000, len(segment), 6, 64, SRC6, DST6
                           ) + segment
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), ident, 0x4000, 64, 6,
                         0, SRC4, DST4)
    return with_u16(header, 10, ~word_sum(header) & 0xFFFF) + segment


def super_packet(version: int, payload: bytes, flags: int = ACK | PSH, options: bytes = b"",
                 gso_size: int = MSS, seq: int = FIRST_SEQ, ident: int = IP_ID,
                 hdr_len: int | None = None) -> tuple[bytes, bytes]:
    """(header, packet) as Linux hands out a TSO super-packet: the checksum field holds
    the pseudo-header's sum over addresses and protocol with length 0, not inverted."""
    packet = ip_packet(version, tcp_header(flags, options, seq) + payload, ident)
    start = ip_header_length(packet)
    packet = with_u16(packet, start + 16, word_sum(pseudo_header(packet, 0)))
    headers = start + 20 + len(options)
    kind = GSO_TCPV4 if version == 4 else GSO_TCPV6
    header = VirtioNetHdr(F_NEEDS_CSUM, kind | (GSO_ECN if flags & CWR else 0),
                          headers if hdr_len is None else hdr_len, gso_size, start, 16)
    return header.to_bytes(), packet


def partial_packet(version: int, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, packet, the packet with its full checksum) for checksum offload alone:
    the partial sum covers the pseudo-header with the TCP length."""
    packet = ip_packet(version, tcp_header(ACK | PSH, TIMESTAMPS) + payload)
    start = ip_header_length(packet)
    tcp_length = len(packet) - start
    full = with_u16(packet, start + 16,
                    ~word_sum(pseudo_header(packet, tcp_length) + packet[start:]) & 0xFFFF)
    partial = with_u16(packet, start + 16, word_sum(pseudo_header(packet, tcp_length)))
    header = VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, start, 16).to_bytes()
    return header, partial, full


def payload_of(size: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(size))


# ---- the checksum ----

@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=2**40))
def test_internet_checksum_is_rfc1071_word_by_word(data: bytes, initial: int) -> None:
    padded = data + b"\0" * (len(data) % 2)
    reference = word_sum(padded + initial.to_bytes(6, "big"))
    assert internet_checksum(data, initial) == reference
    assert internet_checksum(memoryview(data), initial) == reference


@pytest.mark.parametrize(("data", "initial", "expected"), [
    (b"", 0, 0), (bytes(7), 0, 0), (b"\xff\xff", 0, 0xFFFF), (b"\xff\xfe", 1, 0xFFFF),
    (b"", 0xFFFF, 0xFFFF), (b"\x01", 0, 0x0100), (b"\x80\x00\x80\x00", 0, 0x0001)])
def test_internet_checksum_edges(data: bytes, initial: int, expected: int) -> None:
    """Zero only for all-zero input; a nonzero multiple of 0xFFFF is 0xFFFF; odd pads."""
    assert internet_checksum(data, initial) == expected
    assert word_sum(data + initial.to_bytes(2, "big")) == expected


def test_the_verifier_catches_corruption() -> None:
    """The independent verifiers used below reject a flipped bit anywhere."""
    _, _, packet = partial_packet(4, payload_of(333))
    assert tcp_checksum_ok(packet) and ip_checksum_ok(packet)
    flipped_payload = packet[:-5] + bytes([packet[-5] ^ 0x10]) + packet[-4:]
    assert not tcp_checksum_ok(flipped_payload)
    flipped_ttl = packet[:8] + bytes([packet[8] ^ 1]) + packet[9:]
    assert not ip_checksum_ok(flipped_ttl)
    flipped_address = packet[:15] + bytes([packet[15] ^ 1]) + packet[16:]
    assert not tcp_checksum_ok(flipped_address)  # the pseudo-header counts


# ---- the header ----

def test_header_round_trip_and_properties() -> None:
    raw = bytes([1, GSO_TCPV6 | GSO_ECN, 0x42, 0, 0xA8, 0x05, 40, 0, 16, 0])
    header = VirtioNetHdr.from_bytes(raw)
    assert header == VirtioNetHdr(1, 0x84, 0x42, 1448, 40, 16)  # little-endian fields
    assert header.to_bytes() == raw and header.is_gso and header.needs_csum
    assert not VirtioNetHdr.from_bytes(NO_OFFLOAD).is_gso
    assert not VirtioNetHdr(F_DATA_VALID, GSO_NONE).needs_csum
    assert len(NO_OFFLOAD) == VNET_HDR_LEN == 10
    for wrong in (b"", raw[:9], raw + b"\0"):
        with pytest.raises(ValueError, match="10 bytes"):
            VirtioNetHdr.from_bytes(wrong)


def _v4() -> tuple[bytes, bytes]:
    return super_packet(4, payload_of(4000), options=TIMESTAMPS)


def _v6() -> tuple[bytes, bytes]:
    return super_packet(6, payload_of(4000), gso_size=MSS6)


def _edit(base: Callable[[], tuple[bytes, bytes]], packet_at: int | None = None,
          packet_value: int = 0, **fields: int) -> tuple[bytes, bytes]:
    """A valid super-packet with some header fields or one packet byte changed."""
    raw, packet = base()
    header = VirtioNetHdr.from_bytes(raw)
    values = {name: fields.get(name, getattr(header, name)) for name in
              ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset")}
    if packet_at is not None:
        packet = packet[:packet_at] + bytes([packet_value]) + packet[packet_at + 1:]
    return VirtioNetHdr(**values).to_bytes(), packet


def _headers_only() -> tuple[bytes, bytes]:
    raw, packet = super_packet(4, b"")
    return raw, packet


def _tcp_header_cut() -> tuple[bytes, bytes]:
    raw, packet = super_packet(4, b"", options=TIMESTAMPS)
    return raw, packet[:44]  # the 32-byte TCP header ends at 52


PROBLEMS: dict[str, tuple[Callable[[], tuple[bytes, bytes]], str]] = {
    "short": (lambda: (_v4()[0][:9], _v4()[1]), "9 bytes"),
    "long": (lambda: (_v4()[0] + b"\0", _v4()[1]), "11 bytes"),
    "unknown flag": (lambda: _edit(_v4, flags=F_NEEDS_CSUM | 4), "unknown offload flags"),
    "udp gso": (lambda: _edit(_v4, gso_type=GSO_UDP), "not TCP segmentation"),
    "udp_l4 gso": (lambda: _edit(_v4, gso_type=GSO_UDP_L4), "not TCP segmentation"),
    "gso type 2": (lambda: _edit(_v4, gso_type=2), "not TCP segmentation"),
    "ecn alone": (lambda: _edit(_v4, gso_type=GSO_ECN), "ECN"),
    "tcpv4 on ipv6": (lambda: _edit(_v6, gso_type=GSO_TCPV4), "not IPv4"),
    "tcpv4 of udp": (lambda: _edit(_v4, packet_at=9, packet_value=17), "protocol 17"),
    "tcpv6 on ipv4": (lambda: _edit(_v4, gso_type=GSO_TCPV6), "not IPv6"),
    "tcpv6 extension": (lambda: _edit(_v6, packet_at=6, packet_value=0), "next header 0"),
    "ipv4 ihl 4": (lambda: _edit(_v4, packet_at=0, packet_value=0x44), "below 20"),
    "csum field past end": (lambda: _edit(_v4, csum_start=4000 + 52 - 1), "outside"),
    "csum offset past end": (lambda: _edit(_v4, csum_offset=60000), "outside"),
    "plain csum one past end": (lambda: _edit(_v4, gso_type=GSO_NONE, csum_start=4051,
                                              csum_offset=0), "4051+0 is outside"),
    "gso without csum": (lambda: _edit(_v4, flags=F_DATA_VALID), "without NEEDS_CSUM"),
    "csum_start not ip header": (lambda: _edit(_v4, csum_start=24, csum_offset=12),
                                 "not the IP header length 20"),
    "csum_offset not tcp": (lambda: _edit(_v6, csum_offset=6), "not TCP's 16"),
    "gso_size 0": (lambda: _edit(_v4, gso_size=0), "gso_size 0"),
    "data offset 4": (lambda: _edit(_v4, packet_at=32, packet_value=0x40), "below 20"),
    "tcp header cut": (_tcp_header_cut, "past the 44-byte packet"),
    "segment over mtu": (lambda: _edit(_v4, gso_size=MSS + 1), "1501 bytes exceed the MTU"),
    "no payload": (_headers_only, "without payload"),
}


@pytest.mark.parametrize("case", PROBLEMS)
def test_header_problem_rejects(case: str) -> None:
    make, message = PROBLEMS[case]
    header, packet = make()
    problem = header_problem(header, packet, 1500)
    assert problem is not None and message in problem, problem
    assert header_problem(header, memoryview(packet), 1500) == problem  # as tun.py calls it
    if "MTU" not in message:  # the segmenter allows 64 KB segments
        for function in (wire_packets, wire_count, complete_checksum):
            with pytest.raises(ValueError, match=re.escape(problem)):
                function(header, packet)


def test_the_unedited_cases_are_fine() -> None:
    """So each rejection above is due to its one change."""
    for base in (_v4, _v6):
        header, packet = base()
        assert header_problem(header, packet, 1500) is None  # segments of exactly the MTU
        assert header_problem(header, packet, 1499) is not None


@pytest.mark.parametrize(("header", "packet"), [
    (NO_OFFLOAD, b""), (NO_OFFLOAD, b"not an IP packet at all"),
    (VirtioNetHdr(F_DATA_VALID, GSO_NONE, 99, 99, 60000, 60000).to_bytes(), _v4()[1]),
    (VirtioNetHdr(0, GSO_NONE, 0, 0, 65535, 65535).to_bytes(), _v6()[1]),
    (partial_packet(4, b"x")[0], partial_packet(4, b"x")[1]),
    (_edit(_v4, gso_type=GSO_NONE, csum_start=4050, csum_offset=0)[0], _v4()[1]),  # last 2
    (_edit(_v4, gso_type=GSO_TCPV4 | GSO_ECN)[0], _v4()[1]),
    (_edit(_v4, hdr_len=0)[0], _v4()[1]),  # the kernel's hdr_len is not relied on
])
def test_header_problem_accepts(header: bytes, packet: bytes) -> None:
    assert header_problem(header, packet, 1500) is None


# ---- the packets on the wire ----

def check_segments(header: bytes, packet: bytes, payload: bytes, flags: int,
                   gso_size: int = MSS, ident: int = IP_ID, seq: int = FIRST_SEQ
                   ) -> list[bytes]:
    segments = wire_packets(header, packet)
    assert len(segments) == wire_count(header, packet) == -(-len(payload) // gso_size)
    start = ip_header_length(packet)
    headers = start + (packet[start + 12] >> 4) * 4
    carried = b""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        assert ip_checksum_ok(segment) and tcp_checksum_ok(segment), i
        ip = dpkt.ip.IP(segment) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(segment)
        tcp = ip.data
        assert isinstance(tcp, dpkt.tcp.TCP)
        if isinstance(ip, dpkt.ip.IP):
            assert ip.len == len(segment) and ip.id == (ident + i) & 0xFFFF
            assert (ip.src, ip.dst, ip.ttl, segment[6:8]) == (SRC4, DST4, 64, b"\x40\0")
        else:
            assert ip.plen == len(segment) - 40 and (ip.src, ip.dst) == (SRC6, DST6)
        assert tcp.seq == (seq + i * gso_size) & 0xFFFFFFFF
        assert (tcp.sport, tcp.dport, tcp.ack, tcp.win) == (40123, 5201, 777, 502)
        assert segment[start + 20:headers] == packet[start + 20:headers]  # options kept
        expected = flags & ~((FIN | PSH) if not last else 0) & ~(CWR if i else 0)
        assert tcp.flags == expected, (i, tcp.flags)
        assert len(tcp.data) == (gso_size if not last else len(payload) - i * gso_size)
        carried += tcp.data
    assert carried == payload
    return segments


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", [b"", TIMESTAMPS], ids=["20-byte", "32-byte"])
@pytest.mark.parametrize("size", [4 * MSS, 4 * MSS + 333, 65535 - 60 - 32, 1, MSS])
def test_super_packets_segment(version: int, options: bytes, size: int) -> None:
    flags = ACK | PSH | FIN | CWR
    payload = payload_of(size)
    header, packet = super_packet(version, payload, flags, options)
    check_segments(header, packet, payload, flags)


def test_odd_gso_size_and_wrapping_seq_and_id() -> None:
    payload = payload_of(3 * 1001 + 7)
    header, packet = super_packet(4, payload, ACK, TIMESTAMPS, gso_size=1001,
                                  seq=2**32 - 1500, ident=0xFFFE)
    check_segments(header, packet, payload, ACK, gso_size=1001, ident=0xFFFE,
                   seq=2**32 - 1500)


def test_hdr_len_from_the_kernel_is_not_trusted() -> None:
    payload = payload_of(5000)
    header, packet = super_packet(6, payload, ACK, TIMESTAMPS)
    for wrong in (0, 40, 60, 9999):
        short, _ = super_packet(6, payload, ACK, TIMESTAMPS, hdr_len=wrong)
        assert wire_packets(short, packet) == wire_packets(header, packet)


def test_segments_are_not_the_naive_cut() -> None:
    """A failing check_segments: the super-packet's own headers on each piece."""
    payload = payload_of(3 * MSS)
    header, packet = super_packet(4, payload)
    naive = [packet[:40] + packet[40 + i * MSS:40 + (i + 1) * MSS] for i in range(3)]
    assert not any(tcp_checksum_ok(piece) for piece in naive)
    assert wire_packets(header, packet) != naive


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 100, 1387])
def test_checksum_offload_alone_is_completed(version: int, size: int) -> None:
    header, partial, full = partial_packet(version, payload_of(size))
    assert not tcp_checksum_ok(partial)
    assert complete_checksum(header, partial) == full
    assert tcp_checksum_ok(full) and ip_checksum_ok(full)
    assert wire_packets(header, partial) == [full] and wire_count(header, partial) == 1


def test_plain_packets_pass_unchanged() -> None:
    _, _, packet = partial_packet(4, payload_of(99))
    header, supered = super_packet(4, payload_of(5000))
    data_valid = VirtioNetHdr(F_DATA_VALID).to_bytes()
    for plain in (None, NO_OFFLOAD, data_valid):
        assert wire_packets(plain, packet) == [packet] and wire_count(plain, packet) == 1
        assert complete_checksum(plain, packet) == packet
    assert complete_checksum(header, supered) == supered  # segments get theirs
    assert wire_packets(None, supered) == [supered]  # a row without header is one packet


# ---- tshark's opinion ----

def tshark_fields(path: Path) -> list[list[str]]:
    done = subprocess.run(
        ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE", "-T", "fields", "-E", "separator=|",
         "-e", "frame.number", "-e", "ip.checksum.status", "-e", "tcp.checksum.status",
         "-e", "_ws.malformed", "-e", "_ws.expert.message"],
        capture_output=True, text=True, timeout=120, check=True)
    return [line.split("|") for line in done.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_finds_the_segments_well_formed(tmp_path: Path) -> None:
    packets: list[bytes] = []
    for version in (4, 6):
        payload = payload_of(20 * MSS + 555)
        packets += wire_packets(*super_packet(version, payload, ACK | PSH | FIN | CWR,
                                              TIMESTAMPS))
        packets += wire_packets(*partial_packet(version, payload_of(77))[:2])
    assert len(packets) == 2 * (21 + 1)
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    good, bad = tmp_path / "good.pcap", tmp_path / "bad.pcap"
    with good.open("wb") as out:
        write_pcap(((moment, packet) for packet in packets), out)
    rows = tshark_fields(good)
    assert [row[0] for row in rows] == [str(n) for n in range(1, len(packets) + 1)]
    for number, ip_status, tcp_status, malformed, messages in rows:
        assert ip_status in ("1", ""), (number, ip_status)  # IPv6 has no header checksum
        assert tcp_status == "1", (number, tcp_status, messages)  # 1: good
        assert not malformed and "checksum" not in messages.lower(), (number, messages)
    # and tshark does catch a segment spoiled after its checksum was made
    spoiled = packets[3][:-1] + bytes([packets[3][-1] ^ 0xFF])
    with bad.open("wb") as out:
        write_pcap([(moment, packets[2]), (moment, spoiled)], out)
    assert [row[2] for row in tshark_fields(bad)] == ["1", "0"]
