"""Warnings about input the agent drops (frames from the TUN that are not packets,
logged rows that are not, packets to no route), rate-limited: a flood of bad input
cannot flood the agent's log."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pgvpn.agent")  # the agent's own warnings, under its name

BAD_INPUT_EVERY = 1.0  # seconds between warnings about bad frames or rows


class BadInputLog:
    """Warnings about frames or rows that are not packets: the first at once, then at
    most one a second with a count, so that a flood of bad input cannot flood the log."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.pending = 0
        self.last_problem = ""
        self.next_at = 0.0
        self.lock = threading.Lock()

    def report(self, problem: str) -> None:
        with self.lock:
            self.pending += 1
            self.last_problem = problem
        if time.monotonic() >= self.next_at:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.pending:
                return
            log.warning("%s: %d (last: %s)", self.what, self.pending, self.last_problem)
            self.pending = 0
            self.next_at = time.monotonic() + BAD_INPUT_EVERY
