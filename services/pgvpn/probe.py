"""`pgvpn probe`: does the tunnel carry traffic both ways right now?

Opens a TCP connection to the discard port of the remote tunnel address. Nothing
listens there, so the peer's kernel answers the SYN with a RST, which the socket
reports as a refused connection: that answer proves the round trip through the
database. Unlike a ping, it adds no ICMP to the log (two small TCP segments on
port 9), so a health check that runs every few seconds never mingles with a user's
own pings.
"""

from __future__ import annotations

import ipaddress
import socket

DISCARD_PORT = 9


def tunnel_answers(address: str, timeout: float = 3.0) -> bool:
    """True if `address` answered the probe within `timeout` seconds."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect((address, DISCARD_PORT))
        except ConnectionRefusedError:
            return True  # the peer's RST came back through the tunnel
        except (TimeoutError, OSError):
            return False
        return True  # something listens on the discard port and accepted
