"""The TUN device: where packets enter and leave the host's network stack."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pgvpn.errors import PrivilegeError
from pgvpn.offload import NO_OFFLOAD, VNET_HDR_LEN, header_problem
from pgvpn.packets import packet_problem

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-info prefix: reads are bare IP packets
IFF_VNET_HDR = 0x4000  # each read and write starts with a struct virtio_net_hdr
# What the device may hand us unfinished: checksums (TUN_F_CSUM) and TCP segmentation
# (TSO over IPv4 and IPv6), so that one read returns up to 64 KB of a TCP stream.
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
MAX_FRAME = VNET_HDR_LEN + 65535  # a virtio header and the largest IP packet
# At most about this much is read for one batch: with offload, 1024 frames could be
# 64 MB, which one commit would hold back from the receiver.
READ_BYTES = 4 * 2**20
TX_QUEUE_LEN = 10_000  # room for packets that arrive while a batch commits
IFA_F_NODAD = 0x02  # a point-to-point tunnel has no neighbours to detect duplicates with

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAIN_TABLE = 254  # the kernel's main routing table, where `route` adds its routes


def family(prefix: Network) -> int:
    return socket.AF_INET if prefix.version == 4 else socket.AF_INET6


class TunDevice:
    """A non-persistent TUN interface: it disappears when the descriptor closes.

    With `offload`, every frame read or written is a 10-byte virtio_net_hdr and an IP
    packet, possibly a TCP super-packet larger than the MTU (pgvpn.offload). Where
    the kernel refuses, the device falls back to plain packets and `offload_refused`
    says why."""

    def __init__(self, name: str, mtu: int, *, offload: bool = False) -> None:
        self.name = name
        self.mtu = mtu
        self.offload = False
        self.offload_refused = ""
        self.routed: set[Network] = set()  # prefixes `route` sent into this device
        self.drained = False  # whether the last read_available emptied the queue
        self.fd = self._open_with_offload() if offload else -1
        if self.fd < 0:
            self.fd = self._open(name)

    def _open(self, name: str, extra_flags: int = 0) -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PrivilegeError("/dev/net/tun does not exist: load the tun module "
                                 "(modprobe tun) or pass the device to the container") from None
        except PermissionError:
            raise PrivilegeError("cannot open /dev/net/tun: run as root or with "
                                 "CAP_NET_ADMIN and access to the device") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF,
                        struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | extra_flags))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PrivilegeError(f"cannot create TUN device {name}: CAP_NET_ADMIN is "
                                     "needed (root, or a container with cap_add NET_ADMIN)"
                                     ) from None
            if exc.errno == errno.EBUSY:
                raise PrivilegeError(f"TUN device {name} is already in use by another "
                                     "process; is another agent running?") from None
            raise
        return fd

    def _open_with_offload(self) -> int:
        """The device with IFF_VNET_HDR and checksum and TSO offload enabled, or -1 (and
        `offload_refused` says why) where the kernel refuses either."""
        try:
            fd = self._open(self.name, IFF_VNET_HDR)
        except OSError as exc:
            self.offload_refused = f"IFF_VNET_HDR refused: {exc.strerror}"
            return -1
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            os.close(fd)  # the device is not up yet: closing and reopening loses nothing
            self.offload_refused = f"TUNSETOFFLOAD refused: {exc.strerror}"
            return -1
        self.offload = True
        return fd

    def configure(self, addresses: list[Interface]) -> None:
        """Give the device its addresses and MTU and bring it up (via netlink)."""
        # A point-to-point tunnel has no routers: do not solicit them over the log.
        with contextlib.suppress(OSError):  # no IPv6 on this host: nothing to silence
            Path(f"/proc/sys/net/ipv6/conf/{self.name}/router_solicitations").write_text("0")
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            ipr.link("set", index=index, mtu=self.mtu, txqlen=TX_QUEUE_LEN)
            for address in addresses:
                try:
                    ipr.addr("add", index=index, address=str(address.ip),
                             prefixlen=address.network.prefixlen,
                             flags=IFA_F_NODAD if address.version == 6 else 0)
                except NetlinkError as exc:
                    if exc.code == errno.EACCES and address.version == 6:
                        raise PrivilegeError(
                            f"cannot add {address} to {self.name}: IPv6 is disabled here "
                            "(sysctl net.ipv6.conf.all.disable_ipv6=1); enable it or leave "
                            "TUN_IP6 unset") from None
                    raise PrivilegeError(f"cannot add {address} to {self.name}: "
                                         f"{os.strerror(exc.code)}") from None
            ipr.link("set", index=index, state="up")

    def route(self, prefixes: set[Network]) -> list[str]:
        """Send exactly `prefixes` into this device (beyond its addresses' own subnets),
        as wg-quick does for a peer's AllowedIPs: routes added and removed since the last
        call. A prefix the host already routes elsewhere, exactly, is left to the host
        (never taken over), and said so in the returned problems; a longer prefix the
        host routes elsewhere still wins within it, as routing does."""
        problems: list[str] = []
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            for prefix in sorted(self.routed - prefixes, key=str):
                with contextlib.suppress(NetlinkError):  # gone already: what we want
                    ipr.route("del", dst=str(prefix), oif=index, family=family(prefix))
                self.routed.discard(prefix)
            elsewhere = {ipaddress.ip_network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
                         for version in (socket.AF_INET, socket.AF_INET6)
                         for r in ipr.get_routes(family=version, table=MAIN_TABLE)
                         if r.get_attr("RTA_DST") and r.get_attr("RTA_OIF") != index}
            for prefix in sorted(prefixes - self.routed, key=str):
                if prefix in elsewhere:
                    problems.append(f"{prefix} not routed into {self.name}: this host routes "
                                    "it through another interface")
                    continue
                try:
                    ipr.route("add", dst=str(prefix), oif=index, family=family(prefix))
                except NetlinkError as exc:
                    problems.append(f"{prefix} not routed into {self.name}: "
                                    f"{os.strerror(exc.code)}")
                    continue
                self.routed.add(prefix)
        return problems

    def wait_readable(self, timeout: float) -> bool:
        """Block until a packet can be read or `timeout` seconds pass."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        return bool(readable)

    def read_available(self, limit: int, max_bytes: int = READ_BYTES) -> list[bytes]:
        """Read up to `limit` frames, and not much more than `max_bytes`, that are
        already queued, without blocking; `drained` says whether that emptied the queue."""
        packets: list[bytes] = []
        bufsize = MAX_FRAME if self.offload else self.mtu + 64
        taken = 0
        self.drained = False
        while len(packets) < limit and taken < max_bytes:
            try:
                packet = os.read(self.fd, bufsize)
            except BlockingIOError:
                self.drained = True
                break
            packets.append(packet)
            taken += len(packet)
        return packets

    def packet_of(self, frame: bytes) -> memoryview:
        """The IP packet in a frame read from this device, without copying it."""
        return memoryview(frame)[VNET_HDR_LEN:] if self.offload else memoryview(frame)

    def frame_problem(self, frame: bytes) -> str | None:
        """Why this device must not be handed `frame` (a row from the log, which a
        hostile peer may have written), or None: a packet no larger than the MTU, or on
        an offloading device a virtio_net_hdr whose segments would each fit."""
        if not self.offload:
            return packet_problem(frame, max_size=self.mtu)
        header, packet = frame[:VNET_HDR_LEN], self.packet_of(frame)
        if header == NO_OFFLOAD:
            return packet_problem(packet, max_size=self.mtu)
        return packet_problem(packet) or header_problem(header, packet, self.mtu)

    def write(self, packet: bytes) -> bool:
        """Hand one frame to the kernel, as if it had arrived on this interface; False
        if the kernel's queue toward the stack was full and it was dropped, as a router
        would drop it."""
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
