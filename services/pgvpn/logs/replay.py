"""Replay: write logged packets into a TUN device of their own, at the logged pace or faster.

Safety, by design:
- replay always creates its own TUN device (default pgvpn-replay); it cannot take
  over an agent's device (the kernel refuses a second owner: EBUSY), so it never
  injects into a running tunnel's interface;
- it adds addresses only when told to (--address): in a host that already has
  the tunnel's addresses, a second copy would steal the tunnel's routes;
- a selection larger than --max packets is refused rather than flooded into a stack;
- packets that are not whole IPv4/IPv6 packets are skipped, as the agent does.

Packets written to a TUN arrive at the host's stack as if received on that
interface; what the stack sends back through the device is read and counted
(e.g. the echo replies to replayed echo requests), so the replay says whether
the target answered.
"""

from __future__ import annotations

import io
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from pgvpn.errors import PgvpnError
from pgvpn.logs.pcap import is_pcap, read_pcap
from pgvpn.packets import packet_problem
from pgvpn.timespec import format_duration

Timed = tuple[datetime, bytes]
DEFAULT_TUN = "pgvpn-replay"
LINGER_SECONDS = 0.5  # after the last packet, how long answers are still collected


@dataclass(frozen=True)
class ReplayResult:
    sent: int
    skipped: int
    answered: int
    seconds: float
    logged_span: float


def read_input(stream: BinaryIO) -> Iterator[Timed]:
    """Packets from a pcap (pgvpn export, tshark, tcpdump) or from JSON lines with
    `logged_at` and hex `data` (pgvpn log --json --data)."""
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(stream)  # type: ignore[type-var]
    head = stream.peek(4)[:4]
    if is_pcap(head):
        yield from read_pcap(stream)
        return
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            yield datetime.fromisoformat(doc["logged_at"]), bytes.fromhex(doc["data"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PgvpnError(f"input line {number} is neither pcap nor a JSON line with "
                             f"logged_at and data (pgvpn log --json --data): {exc}") from None


def schedule(packets: Iterable[Timed], speed: float, max_gap: float | None
             ) -> list[tuple[float, bytes]]:
    """(seconds after start, packet) at `speed` times the logged pace; 0 = no waiting.

    Gaps longer than `max_gap` logged seconds are shortened to it, so a slice with
    a long pause does not sit idle.
    """
    result: list[tuple[float, bytes]] = []
    offset = 0.0
    previous: datetime | None = None
    for moment, data in sorted(packets, key=lambda item: item[0]):
        if previous is not None and speed > 0:
            gap = (moment - previous).total_seconds()
            if max_gap is not None:
                gap = min(gap, max_gap)
            offset += gap / speed
        previous = moment
        result.append((offset, data))
    return result


def destination(packet: bytes) -> str | None:
    if packet[0] >> 4 == 4 and len(packet) >= 20:
        return str(ipaddress.IPv4Address(packet[16:20]))
    if packet[0] >> 4 == 6 and len(packet) >= 40:
        return str(ipaddress.IPv6Address(packet[24:40]))
    return None


def source(packet: bytes) -> str | None:
    if packet[0] >> 4 == 4 and len(packet) >= 20:
        return str(ipaddress.IPv4Address(packet[12:16]))
    if packet[0] >> 4 == 6 and len(packet) >= 40:
        return str(ipaddress.IPv6Address(packet[8:24]))
    return None


def replay(packets: list[Timed], *, tun_name: str = DEFAULT_TUN,
           addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] | None = None,
           speed: float = 1.0, max_gap: float | None = None,
           progress: Callable[[str], None] = lambda _: None) -> ReplayResult:
    """Create the TUN device, write the packets on schedule, count the stack's answers."""
    from pgvpn.tun import TunDevice  # late: pyroute2 is slow to import

    valid = [(t, p) for t, p in packets if packet_problem(p) is None]
    skipped = len(packets) - len(valid)
    if not valid:
        raise PgvpnError("nothing to replay: no whole IPv4/IPv6 packet was selected")
    timeline = schedule(valid, speed, max_gap)
    logged_span = (max(t for t, _ in valid) - min(t for t, _ in valid)).total_seconds()
    replayed_sources = {source(p) for _, p in valid}
    mtu = max(1500, max(len(p) for _, p in valid))
    answered = 0

    def drain(until: float) -> None:
        nonlocal answered
        while (left := until - time.monotonic()) > 0:
            if tun.wait_readable(left):
                for reply in tun.read_available(256):
                    answered += destination(reply) in replayed_sources

    with TunDevice(tun_name, mtu) as tun:
        tun.configure(list(addresses or []))
        progress(f"replaying {len(valid)} packets into {tun_name} "
                 f"({'as fast as possible' if speed <= 0 else f'at {speed:g}x the logged pace'}"
                 f", logged over {format_duration(timedelta(seconds=logged_span))})")
        start = time.monotonic()
        for offset, data in timeline:
            drain(start + offset)
            tun.write(data)
        elapsed = time.monotonic() - start
        drain(time.monotonic() + LINGER_SECONDS)
    return ReplayResult(len(valid), skipped, answered, elapsed, logged_span)
