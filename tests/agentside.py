"""What the bounds and fuzz tests watch in an agent: its memory, its log, its stream.

The agent is found from inside its host as the `pgvpn ... run` process in the same
network namespace as the probe, so the same code works in a container (where it is
the container's main process) and in a lab namespace (where every process of the
machine is visible, but only that agent shares the namespace).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from lab.measure import ping
from pgvpn.copyformat import PACKET_COLUMNS, encode_packet_rows
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_log, lab_cli, owner_execute, peer_conninfo, wait_for

# The start of a script run in an agent's host: agent_pids() yields the pgvpn agents
# running in this network namespace (a host's own, whatever the backend).
AGENT_PIDS = """\
import os, sys
me = os.readlink("/proc/self/ns/net")
def agent_pids():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
            if os.readlink(f"/proc/{pid}/ns/net") != me or b"run" not in argv:
                continue
        except OSError:
            continue
        if any(a.endswith((b"pgvpn", b"pgvpn.cli")) for a in argv):
            yield pid
"""
# argv[1] == "reset": clear the peak first (clear_refs 5 resets VmHWM), so that the
# peak measured afterwards is the test's own, not that of earlier traffic.
MEMORY_PROBE = AGENT_PIDS + """\
found = []
for pid in agent_pids():
    try:
        if sys.argv[1:] == ["reset"]:
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    except OSError:
        continue
    found.append(f"{pid} {status['VmRSS'].split()[0]} {status['VmHWM'].split()[0]}")
print(*found, sep="\\n")
"""


@dataclass(frozen=True)
class AgentMemory:
    pid: int
    rss_mb: float
    peak_mb: float  # VmHWM: the most it held since start or since the last reset

    @classmethod
    def parse(cls, probed: list[str]) -> AgentMemory:
        """From MEMORY_PROBE's output split in words: exactly one agent must be running."""
        assert len(probed) == 3, f"expected one agent, found {probed}"
        pid, rss_kb, peak_kb = map(int, probed)
        return cls(pid, rss_kb / 1024, peak_kb / 1024)


def agent_memory(lab: LabHandle, host: str, *, reset: bool = False) -> AgentMemory:
    """The host's agent process and its memory."""
    argv = ["python3", "-c", MEMORY_PROBE, *(["reset"] if reset else [])]
    return AgentMemory.parse(lab.exec(host, *argv).stdout.split())


def tracebacks(lab: LabHandle, host: str) -> int:
    return agent_log(lab, host, 100_000).count("Traceback")


@functools.cache
def conninfo(lab: LabHandle, peer: str | None = None) -> str:
    """The owner's (or a peer's) connection string, asked of the lab once: polling
    through LabHandle.sql would start a Python process per query."""
    return lab.conninfo() if peer is None else peer_conninfo(lab, peer)


def owner_query(lab: LabHandle, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo(lab), autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def connect_as(lab: LabHandle, peer: str) -> psycopg.Connection:
    return psycopg.connect(conninfo(lab, peer), autocommit=True)


def last_seq(lab: LabHandle, sender: str) -> int:
    rows = owner_query(lab, "SELECT coalesce(max(seq), 0) FROM pgvpn.packets "
                       "WHERE sender = %s", [sender])
    return int(rows[0][0])


def cursor(lab: LabHandle, receiver: str, sender: str) -> int:
    rows = owner_query(lab, "SELECT last_seq FROM pgvpn.cursors WHERE receiver = %s "
                       "AND sender = %s", [receiver, sender])
    return int(rows[0][0])


def log_as(lab: LabHandle, peer: str, receiver: str, first_seq: int,
           packets: list[bytes]) -> None:
    """Log `packets` as `peer` with its own role, numbered from `first_seq`, one COPY."""
    with connect_as(lab, peer) as conn, conn.cursor() as cur, cur.copy(
            f"COPY pgvpn.packets ({PACKET_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(encode_packet_rows(receiver, first_seq, packets))


def wait_read_past(lab: LabHandle, receiver: str, sender: str, seq: int,
                   timeout: float = 60) -> None:
    """Wait until `receiver`'s cursor for `sender` reached `seq`: it read past those rows."""
    wait_for(lambda: cursor(lab, receiver, sender) >= seq,
             f"{receiver} to read {sender}'s rows up to seq {seq}", timeout)


@contextmanager
def stream_restored(lab: LabHandle) -> Iterator[None]:
    """Afterwards peer-a's stream ends where it ended before, and both agents run.

    The owner removes what was logged as peer-a since then, so that no other test
    meets it: past that point, and below it too (a fuzz steps back and repeats seqs,
    which would break the gap-free numbering later tests check). It moves peer-b's
    cursor back (peer-b restarted: it keeps its cursor in memory).
    """
    last = last_seq(lab, "peer-a")
    (started,), = owner_query(lab, "SELECT clock_timestamp()")
    yield
    lab_cli(lab, "stop", "peer-a")
    lab_cli(lab, "stop", "peer-b")
    owner_execute(lab, "DELETE FROM pgvpn.packets WHERE sender = 'peer-a' "
                  "AND (seq > %s OR logged_at >= %s)", [last, started])
    owner_execute(lab, "UPDATE pgvpn.cursors SET last_seq = least(last_seq, %s) "
                  "WHERE receiver = 'peer-b' AND sender = 'peer-a'", [last])
    lab_cli(lab, "start", "peer-b")
    lab_cli(lab, "start", "peer-a")
    assert ping(CliBackend(lab), "peer-a", "10.230.0.2", count=2).received == 2
