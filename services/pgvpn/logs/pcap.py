"""The log as a capture file: classic pcap, raw IP packets, the logged timestamps.

Written and read with dpkt (a maintained library, not a home-made format). The
rows are IP packets exactly as read from the TUN device, with no link layer, so
the link type is LINKTYPE_RAW (101); tshark and Wireshark decode IPv4 and IPv6
from the version nibble.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, BinaryIO

from pgvpn.errors import PgvpnError

# The pcap file format's number for raw IP. Not dpkt.pcap.DLT_RAW, which is the
# platform's DLT value (12 on Linux) and means something else to other readers.
LINKTYPE_RAW = 101
SNAPLEN = 65535  # a TUN packet is at most 65535 bytes: nothing is ever truncated
PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",   # microseconds, LE / BE
               b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")   # nanoseconds, LE / BE
_RAW_LINKTYPES = {LINKTYPE_RAW, 12, 14}  # 12/14: DLT_RAW as some tools still write it
_LINKTYPE_ETHERNET = 1


def _dpkt() -> Any:
    try:
        import dpkt
    except ImportError:
        raise PgvpnError("pcap files need the dpkt package: pip install dpkt "
                         "(or install pgvpn with its 'logtools' extra)") from None
    return dpkt


def _timestamp(moment: datetime) -> Decimal:
    """Exact seconds since the epoch: a float would round some microseconds away."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return Decimal(micros) / 1_000_000


def write_pcap(packets: Iterable[tuple[datetime, bytes]], out: BinaryIO) -> tuple[int, int]:
    """Write (time, packet) pairs as a pcap stream; returns (packets, bytes) written."""
    dpkt = _dpkt()
    writer = dpkt.pcap.Writer(out, snaplen=SNAPLEN, linktype=LINKTYPE_RAW)
    count = total = 0
    for moment, data in packets:
        writer.writepkt_time(data, _timestamp(moment))
        count += 1
        total += len(data)
    out.flush()
    return count, total


def is_pcap(head: bytes) -> bool:
    return head[:4] in PCAP_MAGICS


def read_pcap(stream: BinaryIO) -> Iterator[tuple[datetime, bytes]]:
    """(time, IP packet) pairs from a raw-IP or Ethernet pcap; other frames are skipped."""
    dpkt = _dpkt()
    try:
        reader = dpkt.pcap.Reader(stream)
    except (ValueError, dpkt.dpkt.NeedData) as exc:
        raise PgvpnError(f"not a readable pcap file: {exc}") from None
    linktype = reader.datalink()
    if linktype not in _RAW_LINKTYPES | {_LINKTYPE_ETHERNET}:
        raise PgvpnError(f"pcap link type {linktype} is not raw IP (101) or Ethernet (1)")
    for ts, frame in reader:
        if linktype == _LINKTYPE_ETHERNET:
            ethernet = dpkt.ethernet.Ethernet(frame)
            if ethernet.type not in (dpkt.ethernet.ETH_TYPE_IP, dpkt.ethernet.ETH_TYPE_IP6):
                continue
            frame = bytes(ethernet.data)
        yield datetime.fromtimestamp(float(ts), UTC), bytes(frame)
