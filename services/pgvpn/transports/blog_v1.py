"""blog-v1: the first blog post's design, reproduced so that the lab can measure it.

Per packet: one INSERT (its own transaction) into pgvpn.blog_v1_packets, whose
AFTER INSERT trigger calls pg_notify. Per notification: the receiver SELECTs
up to 50 unreceived rows from its peer and UPDATEs each as received, one
statement (and so one commit) per packet. Every step is a commit (synchronous
by default), which is why it is slow; the point of the profile is to show that.

Delivery rests on the `received` flag rather than a cursor, so a row that
commits late is not skipped, only read later. Two weak spots of the design are
accepted: a packet flagged as received just before a lost connection is not
delivered (TCP inside the tunnel resends it), and an INSERT whose commit was
lost with the connection may be logged twice.
"""

from __future__ import annotations

import logging

import psycopg

from pgvpn.transports.base import (
    Counters,
    Downlink,
    ListeningDownlink,
    Profile,
    Session,
    Uplink,
)

log = logging.getLogger(__name__)

TABLE = "pgvpn.blog_v1_packets"
READ_LIMIT = 50  # rows per notification, as in the post
IDLE_POLL = 1.0  # seconds: read once in a while even without a notification


def blog_channel(kind: str, peer: str) -> str:
    """The NOTIFY channel of a blog profile; the v1 trigger builds the same name in SQL."""
    return f"pgvpn.{kind}.{peer}"


class PerPacketUplink(Uplink):
    """One INSERT per packet, in TUN order, each in its own transaction."""

    def __init__(self, session: Session, table: str) -> None:
        self.session = session
        self.config = session.config
        self.counters = Counters()
        self.insert = (f"INSERT INTO {table} (sender, receiver, payload) "
                       "VALUES (%s, %s, %b)")
        self.conn = session.connect("uplink")

    def _reconnect(self) -> None:
        self.conn.close()
        self.conn = self.session.connect("uplink")

    def send(self, packets: list[bytes]) -> None:
        for packet in packets:
            def insert(packet: bytes = packet) -> None:
                self.conn.execute(self.insert, (self.config.name, self.config.fixed_peer, packet))

            self.session.retrying(insert, what="uplink", reconnect=self._reconnect,
                                  counters=self.counters)
            self.counters.packets += 1
            self.counters.bytes += len(packet)
        self.counters.batches += 1

    def close(self) -> None:
        self.conn.close()


class FlaggedDownlink(ListeningDownlink):
    """Per notification: SELECT unreceived rows (LIMIT 50), UPDATE each as received."""

    def __init__(self, session: Session, table: str, channel: str) -> None:
        config = session.config
        self.params = {"me": config.name, "peer": config.fixed_peer,
                       "max_age": config.max_replay_age}
        self.select = (f"SELECT id, payload FROM {table} WHERE receiver = %(me)s "
                       f"AND sender = %(peer)s AND NOT received ORDER BY id LIMIT {READ_LIMIT}")
        self.mark = f"UPDATE {table} SET received = true WHERE id = %s"
        # At start, rows older than max_replay_age are not written to a live TUN: they
        # are flagged as handled, as the batched profile's cursor skips them.
        self.expire = (f"UPDATE {table} SET received = true WHERE receiver = %(me)s "
                       "AND sender = %(peer)s AND NOT received "
                       "AND sent_at < now() - make_interval(secs => %(max_age)s)")
        self.read_now = True  # read once at start, notified or not
        super().__init__(session, channel)

    def prepare(self, reader: psycopg.Connection) -> None:
        expired = reader.execute(self.expire, self.params).rowcount
        if expired > 0:
            log.info("skipped %d unreceived packets older than %gs", expired,
                     self.config.max_replay_age)
        self.read_now = True

    def fetch(self, timeout: float) -> list[bytes]:
        if not self.read_now:
            # the post reads once per notification, not per batch
            for _ in self.listener.notifies(timeout=min(timeout, IDLE_POLL), stop_after=1):
                pass
        self.read_now = False
        with self.reader.cursor(binary=True) as cur:
            rows = cur.execute(self.select, self.params).fetchall()
        for row_id, _ in rows:
            self.reader.execute(self.mark, [row_id])
        return [bytes(payload) for _, payload in rows]


class BlogV1Profile(Profile):
    name = "blog-v1"
    logged = True
    summary = ("the first post: INSERT per packet, trigger pg_notify per row, SELECT "
               "unreceived (LIMIT 50) and UPDATE per packet")
    log_table = TABLE
    log_bytes = "octet_length(payload)"
    tables = (TABLE,)

    def open_uplink(self, session: Session) -> Uplink:
        return PerPacketUplink(session, TABLE)

    def open_downlink(self, session: Session) -> Downlink:
        return FlaggedDownlink(session, TABLE,
                               blog_channel("v1", session.config.name))
