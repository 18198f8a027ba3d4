"""blog-v2: the follow-up post's design, reproduced so that the lab can measure it.

What the follow-up changed (its code: github.com/nickhuber/pgVPN, tunnel/main.go):
- no trigger: after its INSERT the sender itself calls pg_notify, with the row id;
- the INSERT + NOTIFY of each packet run concurrently, off the TUN read loop
  (a goroutine per packet there; a few worker connections here, see
  pgvpn.transports.concurrent), so packets may commit and arrive out of order;
- the receiver reads exactly the row each notification names, by id, and no
  longer flags it as received.

Kept as published: a notification that is lost (receiver restarting) loses its
packet, which TCP inside the tunnel resends; the row stays in the log.
"""

from __future__ import annotations

import psycopg

from pgvpn.transports.base import Downlink, ListeningDownlink, Profile, Session, Uplink
from pgvpn.transports.blog_v1 import blog_channel
from pgvpn.transports.concurrent import ConcurrentUplink

TABLE = "pgvpn.blog_v2_packets"
INSERT = f"INSERT INTO {TABLE} (sender, receiver, payload) VALUES (%s, %s, %b) RETURNING id"
# `receiver` too: a notification names a row, it does not grant access to any row.
SELECT_ONE = f"SELECT payload FROM {TABLE} WHERE id = %s AND receiver = %s"
DRAIN_LIMIT = 256  # notifications handled per receive() at most


class ByIdDownlink(ListeningDownlink):
    """Per notification: SELECT the one row it names, by id."""

    def __init__(self, session: Session) -> None:
        super().__init__(session, blog_channel("v2", session.config.name))

    def fetch(self, timeout: float) -> list[bytes]:
        ids = [n.payload for n in self.listener.notifies(timeout=timeout, stop_after=1)]
        if ids:  # and whatever else is already queued, without waiting again
            ids += [n.payload for n in self.listener.notifies(timeout=0,
                                                              stop_after=DRAIN_LIMIT)]
        packets = []
        with self.reader.cursor(binary=True) as cur:
            for row_id in ids:
                if not row_id.isdigit():
                    continue  # not one of ours: NOTIFY needs no privilege
                row = cur.execute(SELECT_ONE, [int(row_id), self.config.name]).fetchone()
                if row is not None:
                    packets.append(bytes(row[0]))
        return packets


class BlogV2Profile(Profile):
    name = "blog-v2"
    logged = True
    summary = ("the follow-up: concurrent INSERT per packet, then NOTIFY with its id from "
               "the agent; the receiver SELECTs each row by id")
    log_table = TABLE
    log_bytes = "octet_length(payload)"
    tables = (TABLE,)

    def open_uplink(self, session: Session) -> Uplink:
        me, peer = session.config.name, session.config.fixed_peer
        channel = blog_channel("v2", peer)

        def insert_then_notify(conn: psycopg.Connection, packet: bytes) -> None:
            row = conn.execute(INSERT, (me, peer, packet)).fetchone()
            assert row is not None
            conn.execute("SELECT pg_notify(%s, %s)", (channel, str(row[0])))

        return ConcurrentUplink(session, insert_then_notify)

    def open_downlink(self, session: Session) -> Downlink:
        return ByIdDownlink(session)
