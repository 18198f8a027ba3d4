"""The transport strategy interface: how packets get into the database and out again.

A profile opens one Uplink (TUN -> database) and one Downlink (database -> TUN).
Each owns its connections and cures lost connections itself, so the agent's
pumps only move packets and never see a database error they could act on.
"""

from __future__ import annotations

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

    @abstractmethod
    def close(self) -> None: ...


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
