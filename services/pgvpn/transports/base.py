"""The transport strategy interface: how packets get into the database and out again.

A profile opens one Uplink (TUN -> database) and one Downlink (database -> TUN).
Each owns its connections and cures lost connections itself, so the agent's
pumps only move packets and never see a database error they could act on.
"""

from __future__ import annotations

import builtins
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg

from pgvpn import db, tlspolicy
from pgvpn.config import AgentConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def channel_for(peer: str) -> str:
    """The LISTEN/NOTIFY channel that wakes `peer`'s downlink."""
    return f"pgvpn.{peer}"


@dataclass
class Counters:
    """Per-direction counters, read by the agent's debug log line."""

    packets: int = 0
    bytes: int = 0
    batches: int = 0
    reconnects: int = 0

    def add_batch(self, packets: list[builtins.bytes]) -> None:
        """Count one batch that went through (an empty one counts as nothing)."""
        if packets:
            self.packets += len(packets)
            self.bytes += sum(map(len, packets))
            self.batches += 1


@dataclass
class Session:
    """What every uplink and downlink needs: settings, a stop signal, connections."""

    config: AgentConfig
    stop: threading.Event = field(default_factory=threading.Event)

    def connect(self, role: str, *, autocommit: bool = True,
                attempts: int | None = None) -> psycopg.Connection:
        """A connection for one job (`role`), refused if it would carry packets in clear."""
        conninfo = tlspolicy.agent_conninfo(self.config.database_url,
                                            self.config.allow_plaintext)
        conn = db.connect(conninfo, autocommit=autocommit,
                          attempts=self.config.connect_attempts if attempts is None else attempts,
                          application_name=f"pgvpn {self.config.name} {role}")
        try:
            tlspolicy.check(conn, self.config.allow_plaintext)
        except BaseException:
            conn.close()
            raise
        if not self.config.synchronous_commit:
            conn.execute("SET synchronous_commit = off")
        return conn

    def retrying(self, action: Callable[[], T], *, what: str,
                 reconnect: Callable[[], None], counters: Counters) -> T | None:
        """Run a database action, reconnecting after lost connections until it succeeds."""

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
        """Return once `packets` are committed (or the agent is stopping)."""

    @abstractmethod
    def close(self) -> None: ...


class Downlink(ABC):
    """Reads packets addressed to this peer from the database."""

    counters: Counters

    @abstractmethod
    def receive(self, timeout: float) -> list[bytes]:
        """Packets ready for the TUN device, waiting at most `timeout` s for some."""

    def take_unfetched(self) -> list[str]:
        """Why each row read since the last call was skipped without fetching its data
        (too large for the TUN), so that the agent counts and reports it like any row
        that is not a packet; none for a profile that fetches every row whole."""
        return []

    @abstractmethod
    def close(self) -> None: ...


class ListeningDownlink(Downlink):
    """A downlink with two connections: one LISTENs for wake-ups, one reads rows.

    Both are reopened together after a lost connection; `prepare` redoes whatever a
    profile sets up on a fresh reader (locks, cursors, skipping stale rows).
    """

    def __init__(self, session: Session, channel: str) -> None:
        self.session = session
        self.config = session.config
        self.counters = Counters()
        self.channel = channel
        self.reader, self.listener = self._open()

    def _open(self) -> tuple[psycopg.Connection, psycopg.Connection]:
        listener = self.session.connect("listener")
        reader = None
        try:
            listener.execute(f'LISTEN "{self.channel}"')
            reader = self.session.connect("downlink")
            self.prepare(reader)
        except BaseException:
            listener.close()
            if reader is not None:
                reader.close()
            raise
        return reader, listener

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
        self.counters.add_batch(packets or [])
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
    #: Every table the profile writes, so that a benchmark can start each run empty.
    tables: tuple[str, ...] = ()

    def default_mtu(self, requested: int) -> int:
        return requested

    def log_totals_query(self) -> str | None:
        """SELECT (packets, bytes) logged so far; None for a profile that logs nothing."""
        if self.log_table is None:
            return None
        return (f"SELECT count(*), coalesce(sum({self.log_bytes}), 0) "
                f"FROM {self.log_table}")

    @abstractmethod
    def open_uplink(self, session: Session) -> Uplink: ...

    @abstractmethod
    def open_downlink(self, session: Session) -> Downlink: ...
