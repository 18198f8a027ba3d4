"""`pgvpn probe`: does the tunnel carry traffic both ways right now?

Sends one UDP datagram to the discard port of the remote tunnel address. The peer's
kernel answers with ICMP "port unreachable", which the socket reports as a refused
connection: that answer proves the round trip through the database. Unlike a ping,
it never adds echo requests to the log that would mingle with a user's own pings,
so it suits a health check that runs every few seconds.
"""

from __future__ import annotations

import ipaddress
import socket

DISCARD_PORT = 9


def tunnel_answers(address: str, timeout: float = 3.0) -> bool:
    """True if `address` answered the probe within `timeout` seconds."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.settimeout(timeout)
        probe.connect((address, DISCARD_PORT))
        probe.send(b"pgvpn probe")
        try:
            probe.recv(1)
        except ConnectionRefusedError:
            return True  # "port unreachable" came back through the tunnel
        except TimeoutError:
            return False
        return True  # something listens on the discard port and answered
