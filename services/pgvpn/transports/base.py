"""The transport strategy interface: how packets get into the database and out again.

A profile opens one Uplink (TUN -> database) and one Downlink (database -> TUN).
Each owns its connections and cures lost connections itself, so the agent's
pumps only move packets and never see a database error they could act on.
"""

from __future__ import annotations

import bisect
import builtins
import logging
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg

from pgvpn import db, dbhosts, tlspolicy
from pgvpn.config import AgentConfig

log = logging.getLogger(__name__)
# Synchronous commit as the agent promises it (a commit is flushed, and on a synchronous
# standby too), unless the session already asks for more (remote_apply).
WAIT_FOR_FLUSH = ("SELECT set_config('synchronous_commit', 'on', false) WHERE "
                  "current_setting('synchronous_commit') IN ('off', 'local', 'remote_write')")
T = TypeVar("T")


def channel_for(peer: str) -> str:
    """The LISTEN/NOTIFY channel that wakes `peer`'s downlink."""
    return f"pgvpn.{peer}"


# Upper bounds (seconds) of the latency histograms: a commit on a fast disk to a stall.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


@dataclass
class Latency:
    """A histogram of seconds in LATENCY_BUCKETS (and above), for the metrics."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass
class Counters:
    """Per-direction counters, read by the agent's debug log line, its metrics and
    its heartbeat (`pgvpn show`).

    Packets and bytes are what crossed this side's TUN device: the uplink counts what
    it committed, the agent what it wrote to the TUN (a row skipped as unusable was
    fetched but not carried). `seconds`: how long each batch took in the database (the
    uplink's write and commit, the downlink's reading statement), waits for a wake-up
    excluded."""

    packets: int = 0
    bytes: int = 0
    batches: int = 0
    reconnects: int = 0
    seconds: Latency = field(default_factory=Latency)
    #: remote peer -> [packets, bytes]: committed for it (up), fetched from it for the
    #: TUN (down); with routing 'table' the one place that says which peer carried what
    by_peer: dict[str, list[int]] = field(default_factory=dict)

    def add_for(self, peer: str, packets: int, size: int) -> None:
        counts = self.by_peer.setdefault(peer, [0, 0])
        counts[0] += packets
        counts[1] += size

    def add_batch(self, packets: Sequence[builtins.bytes | memoryview],
                  peer: str | None = None) -> None:
        """Count one batch of IP packets that went through (an empty one counts as
        nothing), also for `peer` if given."""
        if packets:
            size = sum(map(len, packets))
            self.packets += len(packets)
            self.bytes += size
            self.batches += 1
            if peer is not None:
                self.add_for(peer, len(packets), size)

    def add_fetched(self, frames: Sequence[builtins.bytes]) -> None:
        """Count one batch a downlink fetched (an empty one counts as nothing); its
        packets count as the agent writes them to the TUN (`add_delivered`)."""
        if frames:
            self.batches += 1

    def add_delivered(self, packet_bytes: int) -> None:
        """Count one packet written to the TUN device (its IP bytes, no header)."""
        self.packets += 1
        self.bytes += packet_bytes


APPLICATION_NAME_MAX = 63  # bytes PostgreSQL keeps of an application_name


def application_name(peer: str, role: str, instance: str) -> str:
    """`pgvpn PEER ROLE INSTANCE` in at most 63 bytes: a long peer name is shortened,
    never the instance mark that tells this process's sessions apart (pgvpn.locks)."""
    tail = f" {role} {instance}"
    return f"pgvpn {peer}"[:APPLICATION_NAME_MAX - len(tail)] + tail


@dataclass
class Session:
    """What every uplink and downlink needs: settings, a stop signal, connections."""

    config: AgentConfig
    stop: threading.Event = field(default_factory=threading.Event)
    #: A random mark of this process in the application_name of each of its
    #: connections: a session with our mark and role that holds our lock is one this
    #: process lost, never another agent's (pgvpn.locks).
    instance: str = field(default_factory=lambda: secrets.token_hex(4))
    #: Frames to and from the TUN start with a virtio_net_hdr (pgvpn.offload); set by
    #: the agent from its device before the links open, for a profile that
    #: `carries_offload`.
    offload: bool = False
    #: The order in which every connection of this process tries the database's hosts,
    #: when it has several (a replicated database): lost ones last (pgvpn.dbhosts).
    hosts: dbhosts.HostOrder = field(default_factory=dbhosts.HostOrder)

    def connect(self, role: str, *, autocommit: bool = True, attempts: int | None = None,
                bounded: bool = True, statements: bool = False) -> psycopg.Connection:
        """A connection for one job (`role`), refused if it would carry packets in clear.

        TCP keepalives and a user timeout make a silently dead path an error within
        seconds; `bounded` also bounds its lock waits, `statements` its statements
        (see `bound`). Every connection writes, so it goes to a read-write server
        unless the user chose other target_session_attrs.
        """
        config = self.config
        conninfo = dbhosts.read_write(
            tlspolicy.agent_conninfo(config.database_url, config.allow_plaintext))
        conn = db.connect(conninfo, autocommit=autocommit, hosts=self.hosts,
                          attempts=config.connect_attempts if attempts is None else attempts,
                          application_name=application_name(config.name, role, self.instance),
                          libpq={"keepalives": 1, "keepalives_idle": config.keepalive_idle,
                                 "keepalives_interval": config.keepalive_interval,
                                 "keepalives_count": config.keepalive_count,
                                 "tcp_user_timeout": round(config.tcp_user_timeout * 1000)})
        try:
            tlspolicy.check(conn, config.allow_plaintext)
            if not config.synchronous_commit:
                conn.execute("SET synchronous_commit = off")
            else:  # a weaker default (the role's, PGOPTIONS) must not win unseen
                conn.execute(WAIT_FOR_FLUSH)
            if bounded:
                self.bound(conn, statements=statements)
        except BaseException:
            conn.close()
            raise
        return conn

    def bound(self, conn: psycopg.Connection, *, statements: bool) -> None:
        """Bound every lock wait and, with `statements`, every statement of `conn`.

        Statements only where each is small (the control connection): a batch's
        COPY or SELECT takes as long as the link needs, so the data path has only
        the lock bound, and the TCP settings for a dead path.
        """
        conn.execute("SELECT set_config('lock_timeout', %s, false)",
                     [f"{round(self.config.lock_timeout * 1000)}ms"])
        if statements:
            conn.execute("SELECT set_config('statement_timeout', %s, false)",
                         [f"{round(self.config.statement_timeout * 1000)}ms"])

    def retrying(self, action: Callable[[], T], *, what: str,
                 reconnect: Callable[[], None], counters: Counters) -> T | None:
        """Run a database action until it succeeds: reconnect after a lost connection,
        retry a transient error, back off while the server lacks resources
        (db.retry_forever); other errors propagate and stop the agent."""

        def on_lost() -> None:
            counters.reconnects += 1
            reconnect()

        return db.retry_forever(action, what=what, should_stop=self.stop.is_set,
                                on_lost=on_lost)


class Uplink(ABC):
    """Writes packets read from the TUN device to the database."""

    counters: Counters

    @abstractmethod
    def send(self, packets: list[bytes]) -> None:
        """Return once `packets` (frames as read from the TUN, with a virtio_net_hdr if
        the session's `offload`) are committed, or the agent is stopping."""

    def send_to(self, receiver: str, packets: list[bytes]) -> None:
        """`send`, to `receiver` rather than the fixed peer: a profile that
        `routes_by_table` (the agent never calls it on another)."""
        raise NotImplementedError(f"{type(self).__name__} sends to its fixed peer only")

    @abstractmethod
    def close(self) -> None: ...


class Downlink(ABC):
    """Reads packets addressed to this peer from the database."""

    counters: Counters

    @abstractmethod
    def receive(self, timeout: float) -> list[bytes]:
        """Frames ready for the TUN device (with a virtio_net_hdr if the session's
        `offload`), waiting at most `timeout` s for some."""

    def take_unfetched(self) -> list[str]:
        """Why each row read since the last call was skipped without fetching its data
        (too large for the TUN), so that the agent counts and reports it like any row
        that is not a packet; none for a profile that fetches every row whole."""
        return []

    @abstractmethod
    def close(self) -> None: ...


class ListeningDownlink(Downlink):
    """A downlink that LISTENs for wake-ups and reads rows: on one connection
    (`listens_on_reader`), or on two, one LISTENing and one reading, as the blog's
    posts did.

    The connections are reopened together after a lost one; `prepare` redoes whatever
    a profile sets up on a fresh reader (locks, cursors, skipping stale rows).
    """

    #: One connection: the reader's backend, just awake from sending the notification,
    #: takes the reading statement at once, where a second backend would have to be
    #: woken first (idle RTT p50 about 0.3 ms lower here, README "one packet's walk").
    #: A notification that arrives while a statement runs waits in psycopg's backlog
    #: (psycopg >= 3.3) for the next `notifies()`, so no wake-up is lost.
    listens_on_reader = False

    def __init__(self, session: Session, channel: str) -> None:
        self.session = session
        self.config = session.config
        self.counters = Counters()
        self.channel = channel
        self.reader, self.listener = self._open()

    def _open(self) -> tuple[psycopg.Connection, psycopg.Connection]:
        listen = f'LISTEN "{self.channel}"'
        listener = None if self.listens_on_reader else self.session.connect("listener")
        reader = None
        try:
            if listener is not None:
                listener.execute(listen)
            reader = self.session.connect("downlink")
            if listener is None:
                reader.execute(listen)
            self.prepare(reader)
        except BaseException:
            for conn in (listener, reader):
                if conn is not None:
                    conn.close()
            raise
        return reader, listener or reader

    def prepare(self, reader: psycopg.Connection) -> None:
        """Set up a fresh reader connection; nothing by default."""

    def _reconnect(self) -> None:
        self.close()
        self.reader, self.listener = self._open()

    @abstractmethod
    def fetch(self, timeout: float) -> list[bytes]:
        """One wait-and-read step; may raise psycopg errors (the caller reconnects)."""

    def receive(self, timeout: float) -> list[bytes]:
        packets = self.session.retrying(lambda: self.fetch(timeout), what="downlink",
                                        reconnect=self._reconnect, counters=self.counters)
        self.counters.add_fetched(packets or [])
        return packets or []

    def close(self) -> None:
        self.reader.close()
        self.listener.close()


class Profile(ABC):
    """A transport design: one way of carrying packets through PostgreSQL."""

    name: str
    logged: bool  # False when packets are not kept in the database
    summary: str
    #: The table with one row per packet carried (columns `sender`, `receiver`), which
    #: reports count; None when nothing is stored.
    log_table: str | None = None
    #: SQL for one `log_table` row's packet size in bytes.
    log_bytes: str = "length"
    #: SQL for the packets on the wire one `log_table` row stands for (a super-packet
    #: is several: sql/009_offload.sql).
    log_wire_packets: str = "1"
    #: Every table the profile writes, so that a benchmark can start each run empty.
    tables: tuple[str, ...] = ()
    #: Whether its links carry TUN offload's super-packets and headers (pgvpn.offload);
    #: the blog's profiles keep one packet per row, as in the posts.
    carries_offload: bool = False
    #: Whether it can route each packet to any peer by the owner's table (routing
    #: 'table'); the blog's profiles carry one fixed pair, as in the posts.
    routes_by_table: bool = False

    def default_mtu(self, requested: int) -> int:
        return requested

    def log_totals_query(self) -> str | None:
        """SELECT (rows, bytes, packets on the wire) logged so far; None for a profile
        that logs nothing."""
        if self.log_table is None:
            return None
        return (f"SELECT count(*), coalesce(sum({self.log_bytes}), 0), "
                f"coalesce(sum({self.log_wire_packets}), 0) FROM {self.log_table}")

    @abstractmethod
    def open_uplink(self, session: Session) -> Uplink: ...

    @abstractmethod
    def open_downlink(self, session: Session) -> Downlink: ...
