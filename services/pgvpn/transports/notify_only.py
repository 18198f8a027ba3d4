"""notify-only: the follow-up post's shortcut, reproduced so that the lab can measure it.

Each packet travels base64-encoded in a NOTIFY payload and nothing is stored:
the fastest way through PostgreSQL the posts found, and not a VPN that logs
(`logged = False`; the report says so). Sends run concurrently, as in the
follow-up. NOTIFY needs no privilege, so any role that can connect could inject
packets into this channel; another reason it is a measurement, not a mode to run.
"""

from __future__ import annotations

import base64
import binascii
import logging

import psycopg

from pgvpn.transports.base import Counters, Downlink, Profile, Session, Uplink
from pgvpn.transports.blog_v1 import blog_channel
from pgvpn.transports.concurrent import ConcurrentUplink

log = logging.getLogger(__name__)

# NOTIFY payloads must be shorter than 8000 bytes: base64 of 5997 bytes is 7996.
MAX_PACKET = 5997
DRAIN_LIMIT = 1024  # notifications handed to the TUN per receive() at most


class NotifyOnlyDownlink(Downlink):
    """LISTEN, and decode every notification's payload back into a packet."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.counters = Counters()
        self.channel = blog_channel("n", session.config.name)
        self.listener = self._open()

    def _open(self) -> psycopg.Connection:
        listener = self.session.connect("listener")
        listener.execute(f'LISTEN "{self.channel}"')
        return listener

    def _reconnect(self) -> None:
        self.listener.close()
        self.listener = self._open()

    def receive(self, timeout: float) -> list[bytes]:
        def fetch() -> list[str]:
            payloads = [n.payload for n in self.listener.notifies(timeout=timeout,
                                                                  stop_after=1)]
            if payloads:  # and whatever else is already queued, without waiting again
                payloads += [n.payload for n in self.listener.notifies(
                    timeout=0, stop_after=DRAIN_LIMIT)]
            return payloads

        packets = []
        for payload in self.session.retrying(fetch, what="downlink", reconnect=self._reconnect,
                                             counters=self.counters) or []:
            try:
                packets.append(base64.b64decode(payload, validate=True))
            except binascii.Error:
                log.warning("ignored a notification on %s that is not base64", self.channel)
        self.counters.add_fetched(packets)
        return packets

    def close(self) -> None:
        self.listener.close()


class NotifyOnlyProfile(Profile):
    name = "notify-only"
    logged = False
    summary = "the follow-up's shortcut: the packet, base64, in the NOTIFY payload; no rows"

    def default_mtu(self, requested: int) -> int:
        return min(requested, MAX_PACKET)

    def open_uplink(self, session: Session) -> Uplink:
        channel = blog_channel("n", session.config.fixed_peer)

        def notify(conn: psycopg.Connection, packet: bytes) -> None:
            conn.execute("SELECT pg_notify(%s, %s)",
                         (channel, base64.b64encode(packet).decode("ascii")))

        return ConcurrentUplink(session, notify)

    def open_downlink(self, session: Session) -> Downlink:
        return NotifyOnlyDownlink(session)
