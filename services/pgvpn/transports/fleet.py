"""The downlink of an agent that routes by the owner's table (routing 'table'): it
reads the packets of every sender that addresses it, not of one fixed peer.

The guarantees are the batched downlink's, per sender (pgvpn.transports.batched):
one cursor per (receiver, sender), moved in the statement that selects the batch,
so each sender's packets arrive in its `seq` order and none twice. A batch takes
from all senders in turn (each sender's first row, then each one's second ...), so
one bulk sender cannot starve the others, and stays within the batch's row and
byte limits.

The senders are the peers with a route (pgvpn.routes): a cursor is made for each
one when the downlink starts and whenever the owner changes the routes (NOTIFY
pgvpn_routes, LISTENed on the reading connection beside this peer's own channel).
A new cursor starts past that sender's rows older than max_replay_age, as a restart
does: a peer added to a running fleet costs the others no restart.
"""

from __future__ import annotations

import logging
import time

import psycopg

from pgvpn.locks import take_own_lock
from pgvpn.routing import ROUTES_CHANNEL
from pgvpn.transports.batched import IDLE_POLL, MAX_ROW, READER_SETUP, BatchedDownlink

log = logging.getLogger(__name__)

# Each sender's next rows after its cursor, at most %(limit)s each; then, taking the
# senders in turn (rank, sender), as many as fit %(limit)s rows and %(max_bytes)s
# bytes: for each sender a prefix of its rows in seq order, so its cursor skips none.
NEXT_BATCH_ALL = """
WITH cursor AS (
    SELECT sender, last_seq FROM pgvpn.cursors WHERE receiver = %(me)s
), candidate AS (
    SELECT p.sender, p.seq, p.length, p.offload, p.data,
           row_number() OVER (PARTITION BY p.sender ORDER BY p.seq) AS rank
    FROM cursor c CROSS JOIN LATERAL (
        SELECT i.sender, i.seq, i.length, i.offload,
               CASE WHEN i.length <= %(max_packet)s OR i.offload IS NOT NULL
                    THEN i.data END AS data
        FROM pgvpn.inbox i
        WHERE i.receiver = %(me)s AND i.sender = c.sender AND i.seq > c.last_seq
        ORDER BY i.seq LIMIT %(limit)s) p
), batch AS (
    SELECT sender, seq, length, data, offload, rank FROM (
        SELECT *, sum(CASE WHEN data IS NULL THEN 0 ELSE length END) OVER taking AS fetched,
               count(*) OVER taking AS taken
        FROM candidate WINDOW taking AS (ORDER BY rank, sender)) c
    WHERE fetched <= %(max_bytes)s AND taken <= %(limit)s
), advanced AS (
    UPDATE pgvpn.cursors c SET last_seq = b.last_seq, updated_at = now()
    FROM (SELECT sender, max(seq) AS last_seq FROM batch GROUP BY sender) b
    WHERE c.receiver = %(me)s AND c.sender = b.sender
)
SELECT sender, seq, length, data, offload, rank FROM batch ORDER BY rank, sender
"""
# A cursor for every peer with a route that has none yet; returns the new senders.
NEW_CURSORS = """
INSERT INTO pgvpn.cursors (receiver, sender)
SELECT DISTINCT %(me)s, r.peer FROM pgvpn.routes r WHERE r.peer <> %(me)s
ON CONFLICT DO NOTHING
RETURNING sender
"""
# Cursors of `senders` moved past rows older than max_replay_age (a restart's rule);
# returns (sender, rows skipped).
SKIP_STALE_ALL = """
WITH old AS (
    SELECT sender, last_seq FROM pgvpn.cursors
    WHERE receiver = %(me)s AND sender = ANY(%(senders)s)
), moved AS (
    UPDATE pgvpn.cursors c SET last_seq = greatest(c.last_seq, coalesce((
        SELECT max(i.seq) FROM pgvpn.inbox i
        WHERE i.receiver = %(me)s AND i.sender = c.sender
          AND i.logged_at < now() - make_interval(secs => %(max_age)s)), 0)), updated_at = now()
    FROM old WHERE c.receiver = %(me)s AND c.sender = old.sender
    RETURNING c.sender, c.last_seq - old.last_seq AS skipped
)
SELECT sender, skipped FROM moved WHERE skipped > 0 ORDER BY sender
"""


class FleetDownlink(BatchedDownlink):
    def prepare(self, reader: psycopg.Connection) -> None:
        take_own_lock(reader, "receiver", self.config.name)
        reader.execute(READER_SETUP)
        reader.execute(f'LISTEN "{ROUTES_CHANNEL}"')
        senders = [s for (s,) in reader.execute(
            "SELECT sender FROM pgvpn.cursors WHERE receiver = %(me)s", self.params)]
        self._skip_stale(reader, senders)  # as a restart does, for every sender
        self._new_senders(reader)
        self.more_waiting = True

    def _new_senders(self, reader: psycopg.Connection) -> None:
        new = [s for (s,) in reader.execute(NEW_CURSORS, self.params).fetchall()]
        if new:
            log.info("reading from %s too (new routes)", ", ".join(sorted(new)))
            self._skip_stale(reader, new)
            self.more_waiting = True

    def _skip_stale(self, reader: psycopg.Connection, senders: list[str]) -> None:
        if not senders:
            return
        for sender, skipped in reader.execute(SKIP_STALE_ALL, {**self.params,
                                                               "senders": senders}):
            log.info("skipped %d packets from %s older than %gs: not replayed into a live "
                     "interface", skipped, sender, self.config.max_replay_age)

    def _wait_for_notification(self, timeout: float) -> None:
        """Sleep until a sender says it committed, then drain the queue; a change of
        the routes (a new peer, maybe) makes its cursor first."""
        channels = {n.channel for n in self.listener.notifies(timeout=timeout, stop_after=1)}
        channels |= {n.channel for n in self.listener.notifies(timeout=0)}
        if ROUTES_CHANNEL in channels:
            self._new_senders(self.reader)
            self.more_waiting = True

    def fetch(self, timeout: float) -> list[bytes]:
        if not self.more_waiting:
            self._wait_for_notification(min(timeout, IDLE_POLL))
        started = time.perf_counter()
        with self.reader.cursor(binary=True) as cur:
            rows = cur.execute(NEXT_BATCH_ALL, self.params, prepare=True).fetchall()
        if rows:
            self.counters.seconds.observe(time.perf_counter() - started)
        packets = self._frames([(seq, length, data, offload)
                                for _, seq, length, data, offload, _ in rows])
        self.unfetched += [f"{length}-byte row from {sender} exceeds the MTU of "
                           f"{self.max_packet} (not fetched)"
                           for sender, _, length, data, _, _ in rows if data is None]
        # Full (rows, bytes, or one sender's share): more may be waiting, read on.
        fetched = sum(length for _, _, length, data, _, _ in rows if data is not None)
        self.more_waiting = (len(rows) >= self.config.batch_packets
                             or fetched > self.max_bytes - MAX_ROW
                             or any(rank >= self.config.batch_packets
                                    for *_, rank in rows))
        return packets
