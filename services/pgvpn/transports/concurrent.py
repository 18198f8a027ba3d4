"""An uplink that writes packets concurrently, off the TUN read loop.

The blog's follow-up ran the database work for each packet in a goroutine, so
the TUN reader never waited for a commit. The equivalent here: a bounded queue
and a few worker threads, each with its own connection (psycopg releases the
GIL while it waits on the server). Packets therefore commit, and may arrive, out
of order; that is part of the design being measured, not of pgvpn's own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import psycopg

from pgvpn.transports.base import Counters, Session, Uplink

log = logging.getLogger(__name__)

WORKERS = 4  # pgx's default pool size on a small machine: max(4, CPUs)
MAX_PENDING = 256  # packets read but not yet written; beyond it the TUN queue fills
POLL = 0.2  # seconds: how often waiting threads look at the stop signal

Action = Callable[[psycopg.Connection, bytes], None]


class ConcurrentUplink(Uplink):
    """`send` queues packets and returns; WORKERS threads run `action` for each one."""

    def __init__(self, session: Session, action: Action, *, role: str = "uplink",
                 workers: int = WORKERS) -> None:
        self.session = session
        self.action = action
        self.role = role
        self.counters = Counters()
        self.pending: queue.Queue[bytes] = queue.Queue(maxsize=MAX_PENDING)
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        # Connect before any thread starts, so that a bad database fails the agent at once.
        self.conns = [session.connect(f"{role} {i}") for i in range(workers)]
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                         name=f"{role}-{i}") for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def send(self, packets: list[bytes]) -> None:
        """Queue `packets` for the workers; blocks only while the queue is full."""
        if self.failure is not None:
            raise self.failure  # surfaces a worker's error in the agent's guarded pump
        for packet in packets:
            while not self.session.stop.is_set():
                try:
                    self.pending.put(packet, timeout=POLL)
                    break
                except queue.Full:
                    continue
        with self._lock:
            self.counters.batches += 1

    def _work(self, index: int) -> None:
        def reconnect() -> None:
            self.conns[index].close()
            self.conns[index] = self.session.connect(f"{self.role} {index}")

        while not (self.session.stop.is_set() or self._closing.is_set()):
            try:
                packet = self.pending.get(timeout=POLL)
            except queue.Empty:
                continue
            def write(packet: bytes = packet) -> None:
                self.action(self.conns[index], packet)

            try:
                self.session.retrying(write, what=f"{self.role} {index}", reconnect=reconnect,
                                      counters=self.counters)
            except BaseException as exc:  # the agent learns of it at the next send
                log.exception("%s worker %d failed", self.role, index)
                self.failure = exc
                return
            with self._lock:
                self.counters.packets += 1
                self.counters.bytes += len(packet)

    def close(self) -> None:
        """Stop the workers; packets still queued are dropped, as a stopping router would."""
        self._closing.set()
        for thread in self.threads:
            thread.join(timeout=5)
        if not self.pending.empty():
            log.debug("%s: %d queued packets dropped at close", self.role, self.pending.qsize())
        for conn in self.conns:
            conn.close()
