"""The TUN device: where packets enter and leave the host's network stack."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import struct
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pgvpn.errors import PrivilegeError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-info prefix: reads are bare IP packets
TX_QUEUE_LEN = 10_000  # room for packets that arrive while a batch commits
IFA_F_NODAD = 0x02  # a point-to-point tunnel has no neighbours to detect duplicates with

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TunDevice:
    """A non-persistent TUN interface: it disappears when the descriptor closes."""

    def __init__(self, name: str, mtu: int) -> None:
        self.name = name
        self.mtu = mtu
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PrivilegeError("/dev/net/tun does not exist: load the tun module "
                                 "(modprobe tun) or pass the device to the container") from None
        except PermissionError:
            raise PrivilegeError("cannot open /dev/net/tun: run as root or with "
                                 "CAP_NET_ADMIN and access to the device") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PrivilegeError(f"cannot create TUN device {name}: CAP_NET_ADMIN is "
                                     "needed (root, or a container with cap_add NET_ADMIN)"
                                     ) from None
            if exc.errno == errno.EBUSY:
                raise PrivilegeError(f"TUN device {name} is already in use by another "
                                     "process; is another agent running?") from None
            raise

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

    def wait_readable(self, timeout: float) -> bool:
        """Block until a packet can be read or `timeout` seconds pass."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        return bool(readable)

    def read_available(self, limit: int) -> list[bytes]:
        """Read up to `limit` packets that are already queued, without blocking."""
        packets: list[bytes] = []
        bufsize = self.mtu + 64
        while len(packets) < limit:
            try:
                packets.append(os.read(self.fd, bufsize))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes) -> None:
        """Hand one packet to the kernel, as if it had arrived on this interface."""
        # If the kernel's queue toward the stack is full, drop, as a router would.
        with contextlib.suppress(BlockingIOError):
            os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
