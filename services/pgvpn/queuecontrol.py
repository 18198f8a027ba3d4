"""Queue control at the uplink: CoDel (RFC 8289) on the packets the agent reads.

Why: a bulk TCP stream fills whatever the tunnel queues (the TUN's queue, the batch
being committed), and every interactive packet behind it waits that long. TCP slows
down only when it sees a loss (or an ECN mark), so the agent drops one packet when
packets have waited longer than `target` for a whole `interval`, then more often
(CoDel's control law) until the wait falls below the target.

What "waited" means here: the agent cannot see when the kernel queued a packet; it
knows when it last found the TUN's queue empty. A read that finds packets already
queued measures their wait from then (an upper bound, the batch cycle: the previous
batch's commit); a read that had to wait for its packet measures none.

Which packet: the largest of the read, if it is a bulk segment (at least
BULK_BYTES; with offload a TCP super-packet). An echo, an ACK or a keystroke is never
the one dropped, so the flows that fill the queue pay for it, as fq_codel's do.
A dropped packet is never logged: it did not cross. It is counted
(pgvpn_queue_drops_total).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgvpn.tun import TunDevice

INTERVAL = 0.1  # seconds: RFC 8289's default, about a worst-case RTT of the flows
BULK_BYTES = 1000  # a smaller packet is never dropped (echoes, ACKs, keystrokes)


class CoDel:
    """One uplink's dropping state; `choose` is called once per read of the TUN."""

    def __init__(self, target: float, interval: float = INTERVAL) -> None:
        if target <= 0 or interval <= 0:
            raise ValueError("CoDel needs a positive target and interval")
        self.target = target
        self.interval = interval
        self.first_above = 0.0  # when the wait, above target since, may start drops
        self.dropping = False
        self.drop_next = 0.0
        self.count = 0  # drops in this dropping state (sets the drop rate)
        self.last_count = 0
        self.drops = 0  # all drops, for metrics

    def _ok_to_drop(self, waited: float, now: float) -> bool:
        if waited < self.target:
            self.first_above = 0.0
            return False
        if self.first_above == 0.0:
            self.first_above = now + self.interval
            return False
        return now >= self.first_above

    def _control_law(self, since: float) -> float:
        return since + self.interval / math.sqrt(self.count)

    def choose(self, frames: Sequence[bytes], waited: float, now: float) -> int | None:
        """The index of the frame to drop from this read, or None. `waited`: how long
        the oldest frame of the read may have been queued, in seconds."""
        ok = self._ok_to_drop(waited, now)
        if self.dropping:
            if not ok:
                self.dropping = False
                return None
            if now < self.drop_next:
                return None
            victim = bulk_victim(frames)
            if victim is not None:
                self.count += 1
                self.drop_next = self._control_law(self.drop_next)
                self.drops += 1
            return victim
        if not ok:
            return None
        victim = bulk_victim(frames)
        if victim is None:
            return None
        self.dropping = True
        # Coming back soon after a dropping state: start from its rate, not from one.
        delta = self.count - self.last_count
        recent = now - self.drop_next < 16 * self.interval
        self.count = delta if delta > 1 and recent else 1
        self.last_count = self.count
        self.drop_next = self._control_law(now)
        self.drops += 1
        return victim


def bulk_victim(frames: Sequence[bytes]) -> int | None:
    """The largest frame of a read, if it is large enough to belong to a bulk flow."""
    if len(frames) < 2:  # a read of one packet is no queue
        return None
    index = max(range(len(frames)), key=lambda i: len(frames[i]))
    return index if len(frames[index]) >= BULK_BYTES else None


def flow_of(packet: bytes | memoryview) -> bytes:
    """A packet's flow: addresses, protocol and (for TCP/UDP) ports, as one key. An
    IPv6 extension header hides the ports: such a packet's flow is its addresses."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        ports = packet[ihl:ihl + 4] if proto in (6, 17) else b""
        return bytes(packet[9:10]) + bytes(packet[12:20]) + bytes(ports)
    proto = packet[6]
    ports = packet[40:44] if proto in (6, 17) else b""
    return bytes(packet[6:7]) + bytes(packet[8:40]) + bytes(ports)


def sparse_first(frames: list[bytes], packet_of: Callable[[bytes], memoryview]
                 ) -> tuple[list[bytes], list[bytes]]:
    """A read as (sparse, bulk): the packets of flows with no bulk segment in the read
    (echoes, ACKs, keystrokes, DNS), and the rest. Sent in that order, an interactive
    packet does not wait for the bulk batch it was read with; each flow keeps its
    order, since a flow is wholly in one part. ([], frames) when there is nothing to
    gain: no bulk segment, or no sparse flow."""
    if len(frames) < 2 or all(len(frame) < BULK_BYTES for frame in frames):
        return [], frames
    flows = [flow_of(packet_of(frame)) for frame in frames]
    bulk_flows = {flow for flow, frame in zip(flows, frames, strict=True)
                  if len(frame) >= BULK_BYTES}
    sparse = [frame for flow, frame in zip(flows, frames, strict=True)
              if flow not in bulk_flows]
    if not sparse:
        return [], frames
    return sparse, [frame for flow, frame in zip(flows, frames, strict=True)
                    if flow in bulk_flows]


class UplinkReads:
    """The uplink's reads of its TUN, as the batches to send in order: one batch, or
    with queue control (`codel`) a bulk packet fewer when CoDel says so and the sparse
    flows' batch first."""

    def __init__(self, tun: TunDevice, limit: int, codel: CoDel | None) -> None:
        self.tun = tun
        self.limit = limit
        self.codel = codel
        self.drained_at = time.monotonic()  # when a read last left the TUN's queue empty
        self.waited = 0.0  # how long the last read's oldest packet may have been queued

    def read(self, timeout: float) -> list[bytes]:
        """Every frame queued (up to the limit), after waiting at most `timeout` for one."""
        queued_since = self.drained_at  # packets already waiting: since the last drain
        if self.codel is None or not self.tun.wait_readable(0):
            if not self.tun.wait_readable(timeout):
                return []
            queued_since = time.monotonic()  # waited for it: it has just come
        frames = self.tun.read_available(self.limit)
        now = time.monotonic()
        if self.tun.drained:
            self.drained_at = now
        self.waited = now - queued_since
        return frames

    def batches(self, packets: list[bytes]) -> list[list[bytes]]:
        """The read's valid packets as batches, in the order to send them."""
        if not packets:
            return []
        if self.codel is None:
            return [packets]
        victim = self.codel.choose(packets, self.waited, time.monotonic())
        if victim is not None:
            packets = packets[:victim] + packets[victim + 1:]
        return [part for part in sparse_first(packets, self.tun.packet_of) if part]
