"""pgvpn's own transport: batches in (binary COPY, or one INSERT for a small batch),
binary SELECT out, one NOTIFY a batch.

Why no row is skipped or delivered twice:
- The uplink is the only writer for its sender (advisory lock on the sender's
  name, which only that peer's role may take: pgvpn.lock_own), numbers packets
  with its own gap-free `seq`, and commits one batch at a time, so a sender's
  rows become visible strictly in `seq` order.
- After a lost connection the uplink reads back the highest committed `seq`
  before resending, so an ambiguous commit is never logged twice.
- The database, not this code, decides who sends and who reads
  (sql/004_peer_isolation.sql): the COPY or INSERT leaves `sender` to the session's role,
  the downlink reads through the view pgvpn.inbox of packets addressed to it.
- The downlink advances its cursor in the same statement that selects a batch,
  and writes to the TUN only after that statement committed: a crash can drop
  packets in flight (TCP inside the tunnel recovers them) but never repeat one.

Why no row can crash or exhaust an agent (sql/006_bounds.sql refuses new rows no
TUN could carry; what it accepts, and rows logged before it, are bounded here):
- The downlink never fetches the data of a row larger than its TUN's MTU (it
  could not be written anyway): it reads that row's length, skips it, reports it
  and moves the cursor past it. A batch holds at most BATCH_BYTES of packet data.
- The uplink refuses to number past MAX_SEQ, with what the owner must do, instead
  of failing in the COPY encoder on every start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import psycopg
from psycopg import sql

from pgvpn import db
from pgvpn.copyformat import PACKET_COLUMNS, encode_packet_rows
from pgvpn.errors import DatabaseError, PgvpnError
from pgvpn.locks import take_own_lock
from pgvpn.offload import NO_OFFLOAD, VNET_HDR_LEN, wire_packets
from pgvpn.transports.base import (
    Counters,
    ListeningDownlink,
    Session,
    Uplink,
    channel_for,
)

log = logging.getLogger(__name__)

def copy_statement(table: sql.Identifier) -> sql.Composed:
    """The binary COPY of packet rows into `table` (the log, or the ceiling's scratch
    table): composed once, not per batch."""
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(PACKET_COLUMNS))


COPY_PACKETS = copy_statement(sql.Identifier("pgvpn", "packets"))
# A small batch (an echo, an ACK, a keystroke) goes in one prepared statement with its
# NOTIFY: one round trip and one commit instead of three and two. Its commit then
# holds the database's notify lock, which serialises it with other notifying
# commits, so bulk batches keep COPY and a NOTIFY of their own. Measured from a peer
# (TLS, synchronous commit): 1 packet 0.41 ms against 0.81 ms; 4 x 1500 B equal;
# 256 x 1500 B 19 ms against 3.6 ms (unnest is slower than COPY per row).
SMALL_BATCH = 4
INSERT_AND_NOTIFY = """
WITH logged AS (
    INSERT INTO pgvpn.packets (seq, receiver, length, data, offload)
    SELECT %(first)s + batch.ordinality - 1, %(receiver)s, octet_length(batch.data), batch.data,
           batch.offload
    FROM unnest(%(packets)b::bytea[], %(offloads)b::bytea[])
         WITH ORDINALITY AS batch(data, offload, ordinality)
)
SELECT pg_notify(%(channel)s, '')
"""
# The highest `seq` the database accepts (CHECK packets_seq_in_range, sql/006_bounds.sql).
MAX_SEQ = 2**62 - 1
# At most this much packet data in one batch read, whatever the MTU and batch_packets.
BATCH_BYTES = 4 * 2**20
MAX_ROW = 65535  # the largest row (sql/006): a super-packet may exceed the MTU
# A batch: the next rows in seq order, at most %(limit)s of them and %(max_bytes)s bytes
# of data; a row larger than %(max_packet)s (the TUN's MTU) comes without its data
# (CASE: its TOAST chunks are never read), so that its size costs nothing here,
# unless it has an offload header: a super-packet is larger than the MTU by design,
# and whether its segments fit is checked when it arrives (pgvpn.offload).
NEXT_BATCH = """
WITH candidate AS (
    SELECT seq, length, offload,
           CASE WHEN length <= %(max_packet)s OR offload IS NOT NULL THEN data END AS data
    FROM pgvpn.inbox
    WHERE receiver = %(me)s AND sender = %(peer)s AND seq > %(after)s
    ORDER BY seq LIMIT %(limit)s
), batch AS (
    SELECT seq, length, data, offload FROM (
        SELECT seq, length, data, offload, sum(CASE WHEN data IS NULL THEN 0 ELSE length END)
                                  OVER (ORDER BY seq) AS fetched
        FROM candidate) c
    WHERE fetched <= %(max_bytes)s
), advanced AS (
    UPDATE pgvpn.cursors
    SET last_seq = (SELECT max(seq) FROM batch), updated_at = now()
    WHERE receiver = %(me)s AND sender = %(peer)s AND EXISTS (SELECT FROM batch)
)
SELECT seq, length, data, offload FROM batch ORDER BY seq
"""
# The cursor moves past packets older than max_replay_age; returns (new, old) last_seq.
SKIP_STALE = """
WITH old AS (SELECT last_seq FROM pgvpn.cursors WHERE receiver = %(me)s AND sender = %(peer)s)
UPDATE pgvpn.cursors SET last_seq = greatest(last_seq, coalesce((
    SELECT max(seq) FROM pgvpn.inbox
    WHERE receiver = %(me)s AND sender = %(peer)s
      AND logged_at < now() - make_interval(secs => %(max_age)s)), 0)), updated_at = now()
WHERE receiver = %(me)s AND sender = %(peer)s
RETURNING last_seq, (SELECT last_seq FROM old)
"""
# The reader's session plans NEXT_BATCH (prepared) once, not once per batch: the custom
# plans PostgreSQL otherwise chooses for the partitioned log cost 0.5 ms each, most of a
# one-packet batch (measured over a Unix socket, 4 partitions: 0.75 ms a statement,
# 0.22 ms with the generic plan). Both plans probe every partition's (receiver, sender,
# seq) index: NEXT_BATCH has no condition on logged_at.
READER_SETUP = "SET plan_cache_mode = force_generic_plan"
IDLE_POLL = 1.0  # seconds: a lost notification costs at most this much latency


def copy_batch(conn: psycopg.Connection, statement: sql.Composed, receiver: str,
               first_seq: int, packets: Sequence[bytes | memoryview],
               headers: Sequence[bytes | None] | None = None) -> None:
    """A bulk batch's write: one binary COPY (`copy_statement`), committed on its own
    (autocommit). `pgvpn ceiling` measures the database with this same function."""
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.write(encode_packet_rows(receiver, first_seq, packets, headers))


def split_frames(frames: list[bytes]) -> tuple[list[memoryview], list[bytes | None]]:
    """Frames read from an offloading TUN as (packets, headers): the header of a packet
    the kernel marked nothing on is None, a NULL in the log."""
    headers: list[bytes | None] = [
        None if frame.startswith(NO_OFFLOAD) else frame[:VNET_HDR_LEN] for frame in frames]
    return [memoryview(frame)[VNET_HDR_LEN:] for frame in frames], headers


def notify(conn: psycopg.Connection, channel: str) -> None:
    """A bulk batch's wake-up, in a transaction of its own: the commit of a transaction
    that notifies holds the database's notify lock, which the COPY need not wait for."""
    conn.execute("SELECT pg_notify(%s, '')", [channel], prepare=True)


class BatchedUplink(Uplink):
    def __init__(self, session: Session) -> None:
        self.session = session
        self.config = session.config
        self.counters = Counters()
        self.conn = self._open()

    def _open(self) -> psycopg.Connection:
        conn = self.session.connect("uplink")
        try:  # refused (another agent, our lost session still committing): not left open
            take_own_lock(conn, "sender", self.config.name)
            row = conn.execute("SELECT pgvpn.last_sent_seq()").fetchone()
        except BaseException:
            conn.close()
            raise
        self.committed_seq = int(row[0]) if row else 0
        if not 0 <= self.committed_seq < MAX_SEQ:
            conn.close()
            raise self._out_of_numbers()
        return conn

    def _out_of_numbers(self) -> PgvpnError:
        """Why the next packets cannot be numbered, and what the owner must do.

        Not a DatabaseError: reconnecting would read the same row again, forever.
        """
        name = self.config.name
        return PgvpnError(
            f"peer {name} cannot number its next packets: its highest logged seq is "
            f"{self.committed_seq} and the database accepts only 1..{MAX_SEQ} (a row was "
            f"logged as {name} outside its agent's numbering). The database owner must "
            f"delete {name}'s rows above its real numbering (DELETE FROM pgvpn.packets "
            f"WHERE sender = '{name}' AND seq > N), then start this agent again")

    def _reconnect(self) -> None:
        self.conn.close()
        self.conn = self._open()

    def send(self, frames: list[bytes]) -> None:
        assert self.config.peer is not None  # routing 'peer' (config)
        self.send_to(self.config.peer, frames)

    def send_to(self, receiver: str, frames: list[bytes]) -> None:
        """One batch to one receiver, in one commit; a batch the agent routed to several
        peers comes as one call per receiver, numbered on in the order read."""
        channel = channel_for(receiver)
        if self.committed_seq + len(frames) > MAX_SEQ:
            raise self._out_of_numbers()
        first_seq = self.committed_seq + 1
        headers: list[bytes | None] | None = None
        packets: Sequence[bytes | memoryview] = frames
        if self.session.offload:
            packets, headers = split_frames(frames)

        def write() -> None:
            if self.committed_seq >= first_seq:  # _open reread it after a lost connection
                log.info("uplink: the batch seq %d..%d was committed before the connection "
                         "was lost; not sent again", first_seq, first_seq + len(packets) - 1)
                notify(self.conn, channel)  # its wake-up may have been lost with it
                return
            if len(packets) <= SMALL_BATCH:
                self.conn.execute(INSERT_AND_NOTIFY, {
                    "first": first_seq, "receiver": receiver,
                    "packets": list(map(bytes, packets)),
                    "offloads": headers if headers and any(headers) else None,
                    "channel": channel}, prepare=True)
                self.committed_seq = first_seq + len(packets) - 1
                return
            copy_batch(self.conn, COPY_PACKETS, receiver, first_seq, packets, headers)
            self.committed_seq = first_seq + len(packets) - 1
            notify(self.conn, channel)

        started = time.perf_counter()
        self.session.retrying(write, what="uplink", reconnect=self._reconnect,
                              counters=self.counters)
        self.counters.seconds.observe(time.perf_counter() - started)
        self.counters.add_batch(packets, receiver)

    def close(self) -> None:
        self.conn.close()


class BatchedDownlink(ListeningDownlink):
    listens_on_reader = True

    def __init__(self, session: Session, max_packet: int) -> None:
        """`max_packet`: the largest row whose data is fetched (the TUN's MTU)."""
        config = session.config
        self.max_packet = max_packet
        self.max_bytes = max(BATCH_BYTES, max_packet)
        self.params: dict[str, object] = {
            "me": config.name, "peer": config.peer, "limit": config.batch_packets,
            "max_packet": max_packet, "max_bytes": self.max_bytes,
            "max_age": config.max_replay_age}
        self.more_waiting = True  # check the log once at start, notified or not
        self.unfetched: list[str] = []
        super().__init__(session, channel_for(config.name))

    def prepare(self, reader: psycopg.Connection) -> None:
        take_own_lock(reader, "receiver", self.config.name)
        reader.execute(READER_SETUP)
        try:
            reader.execute("INSERT INTO pgvpn.cursors (receiver, sender) "
                           "VALUES (%(me)s, %(peer)s) ON CONFLICT DO NOTHING", self.params)
        except psycopg.errors.ForeignKeyViolation:
            raise DatabaseError(f"peer {self.config.peer!r} is not registered: the database "
                                f"owner adds it with 'pgvpn db add-peer {self.config.peer}'"
                                ) from None
        row = reader.execute(SKIP_STALE, self.params).fetchone()
        self.params["after"] = int(row[0]) if row else 0
        if row and row[0] > row[1]:
            log.info("skipped %d packets from %s older than %gs: not replayed into a live "
                     "interface", row[0] - row[1], self.config.peer, self.config.max_replay_age)
        self.more_waiting = True

    def _wait_for_notification(self, timeout: float) -> None:
        """Sleep until the uplink of our peer says it committed, then drain the queue."""
        db.notified(self.listener, timeout)

    def fetch(self, timeout: float) -> list[bytes]:
        if not self.more_waiting:
            self._wait_for_notification(min(timeout, IDLE_POLL))
        started = time.perf_counter()
        with self.reader.cursor(binary=True) as cur:
            rows = cur.execute(NEXT_BATCH, self.params, prepare=True).fetchall()
        if rows:
            self.counters.seconds.observe(time.perf_counter() - started)
            self.params["after"] = rows[-1][0]
            fetched_rows = [length for _, length, data, _ in rows if data is not None]
            self.counters.add_for(self.config.fixed_peer, len(fetched_rows), sum(fetched_rows))
        packets = self._frames(rows)
        self.unfetched += [f"{length}-byte row exceeds the MTU of {self.max_packet} "
                           "(not fetched)" for _, length, data, _ in rows if data is None]
        # A batch full of rows or bytes means more may be waiting: read on without a wake-up.
        fetched = sum(length for _, length, data, _ in rows if data is not None)
        self.more_waiting = (len(rows) >= self.config.batch_packets
                             or fetched > self.max_bytes - MAX_ROW)
        return packets

    def _frames(self, rows: list[tuple[int, int, bytes | None, bytes | None]]) -> list[bytes]:
        """The fetched rows as frames for this agent's TUN: each header before its packet
        on an offloading device; otherwise the packets a wire would carry (a super-packet
        segmented, a partial checksum completed: pgvpn.offload)."""
        if self.session.offload:
            return [(header or NO_OFFLOAD) + data for _, _, data, header in rows
                    if data is not None]
        frames: list[bytes] = []
        for _, _, data, header in rows:
            if data is None:
                continue
            if header is None:
                frames.append(bytes(data))
                continue
            try:
                frames += wire_packets(header, bytes(data))
            except ValueError as exc:
                self.unfetched.append(f"offload header not usable: {exc}")
        return frames

    def take_unfetched(self) -> list[str]:
        taken, self.unfetched = self.unfetched, []
        return taken
