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
does: a peer added to a running fleet costs the others no restart. A peer whose
routes are all gone is no longer read (its cursor stays, for if it comes back).

A packet is written to the TUN only if its source address is in its sender's routes
(as WireGuard checks AllowedIPs): with many senders, one must not pass its packets
off as another's, or inject them into a subnet behind this peer. Any other row is
skipped and reported like every row that is not a packet for this TUN.
"""

from __future__ import annotations

import logging
import time

import psycopg

from pgvpn import db
from pgvpn.locks import take_own_lock
from pgvpn.routing import ROUTES_CHANNEL, ROUTES_MIN_INTERVAL, RoutingTable, source
from pgvpn.transports.batched import IDLE_POLL, MAX_ROW, READER_SETUP, BatchedDownlink

log = logging.getLogger(__name__)

# Each sender's next rows after its cursor, at most %(limit)s each; then, taking the
# senders in turn (rank, sender), as many as fit %(limit)s rows and %(max_bytes)s
# bytes: for each sender a prefix of its rows in seq order, so its cursor skips none.
NEXT_BATCH_ALL = """
WITH cursor AS (
    SELECT c.sender, c.last_seq FROM pgvpn.cursors c
    WHERE c.receiver = %(me)s AND EXISTS (SELECT FROM pgvpn.routes r WHERE r.peer = c.sender)
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
    #: The owner's routes as last read: who may send which source addresses.
    table: RoutingTable
    routes_read_at = 0.0  # time.monotonic() of the last read
    routes_changed = False  # a change notified and not read yet

    def prepare(self, reader: psycopg.Connection) -> None:
        take_own_lock(reader, "receiver", self.config.name)
        reader.execute(READER_SETUP)
        reader.execute(f'LISTEN "{ROUTES_CHANNEL}"')  # before reading them: none missed
        senders = [s for (s,) in reader.execute(
            "SELECT sender FROM pgvpn.cursors WHERE receiver = %(me)s", self.params)]
        self._skip_stale(reader, senders)  # as a restart does, for every sender
        self._read_routes(reader)
        self.more_waiting = True

    def _read_routes(self, reader: psycopg.Connection) -> None:
        """The table, and a cursor for each new sender in it."""
        self.routes_read_at, self.routes_changed = time.monotonic(), False
        self.table = RoutingTable.load(reader, self.config.name)
        new = [s for (s,) in reader.execute(NEW_CURSORS, self.params).fetchall()]
        if new:
            log.info("reading from %s (new in the routing table)", ", ".join(sorted(new)))
            self._skip_stale(reader, new)
            self.more_waiting = True

    def _skip_stale(self, reader: psycopg.Connection, senders: list[str]) -> None:
        if not senders:
            return
        for sender, skipped in reader.execute(SKIP_STALE_ALL, {**self.params,
                                                               "senders": senders}):
            log.info("skipped %d packets from %s older than %gs: not replayed into a live "
                     "interface", skipped, sender, self.config.max_replay_age)

    def _notified(self, timeout: float) -> None:
        """Wait up to `timeout` s for a notification (0: only take those queued, which
        also keeps psycopg's queue short under a flood); a change of the routes is read
        at most every ROUTES_MIN_INTERVAL s (it waits meanwhile, never lost)."""
        self.routes_changed |= ROUTES_CHANNEL in db.notified(self.listener, timeout)
        if self.routes_changed and (time.monotonic() - self.routes_read_at
                                    >= ROUTES_MIN_INTERVAL):
            self._read_routes(self.reader)

    def fetch(self, timeout: float) -> list[bytes]:
        # idle: sleep until a sender commits; busy: only look at what is queued, so
        # that a route change (a new sender) is not kept waiting by a busy one
        self._notified(0 if self.more_waiting else min(timeout, IDLE_POLL))
        started = time.perf_counter()
        with self.reader.cursor(binary=True) as cur:
            rows = cur.execute(NEXT_BATCH_ALL, self.params, prepare=True).fetchall()
        if rows:
            self.counters.seconds.observe(time.perf_counter() - started)
        usable = []
        for sender, seq, length, data, offload, _ in rows:
            if data is None:
                self.unfetched.append(f"{length}-byte row from {sender} exceeds the MTU of "
                                      f"{self.max_packet} (not fetched)")
            elif (owner := self.table.sent_by(data)) != sender:
                self.unfetched.append(
                    f"row from {sender} with source address {source(data)}, which is "
                    + (f"routed to {owner}" if owner else "no peer's route")
                    + " (a peer sends only from the addresses it routes)")
            else:
                usable.append((seq, length, data, offload))
                self.counters.add_for(sender, 1, length)
        packets = self._frames(usable)
        # Full (rows, bytes, or one sender's share): more may be waiting, read on.
        fetched = sum(length for _, _, length, data, _, _ in rows if data is not None)
        self.more_waiting = (len(rows) >= self.config.batch_packets
                             or fetched > self.max_bytes - MAX_ROW
                             or any(rank >= self.config.batch_packets
                                    for *_, rank in rows))
        return packets

