"""Aggregates over a window of the log: per-flow totals, top talkers, per-peer totals.

Computed by the server in one GROUP BY each, so a large window costs one pass
and only the top rows cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgvpn.logs.filter import LogFilter

GROUPINGS = ("flow", "host", "peer")


@dataclass(frozen=True)
class Aggregate:
    """One line of `pgvpn stats`: a key (flow, address or peer pair) and its totals."""

    key: dict[str, Any]
    packets: int
    bytes: int
    first: datetime
    last: datetime
    sent_bytes: int | None = None      # talkers only: as source
    received_bytes: int | None = None  # talkers only: as destination

    @property
    def seconds(self) -> float:
        return (self.last - self.first).total_seconds()

    @property
    def bits_per_second(self) -> float | None:
        """Average rate over the key's own first..last packets; None for a single instant."""
        return self.bytes * 8 / self.seconds if self.seconds > 0 else None

    def as_json(self) -> dict[str, Any]:
        doc = {**self.key, "packets": self.packets, "bytes": self.bytes,
               "first": self.first.isoformat(), "last": self.last.isoformat(),
               "bits_per_second": self.bits_per_second}
        if self.sent_bytes is not None:
            doc["sent_bytes"] = self.sent_bytes
            doc["received_bytes"] = self.received_bytes
        return doc


FLOWS = """
SELECT h.src, h.dst, h.protocol, h.src_port, h.dst_port,
       count(*), sum(h.length), min(h.logged_at), max(h.logged_at)
FROM pgvpn.packet_headers h WHERE {where}
GROUP BY 1, 2, 3, 4, 5 ORDER BY 7 DESC, 6 DESC LIMIT %s
"""
# Each packet counts for its source (sent) and its destination (received).
TALKERS = """
SELECT t.addr, count(*), sum(h.length), min(h.logged_at), max(h.logged_at),
       sum(h.length) FILTER (WHERE t.sent), sum(h.length) FILTER (WHERE NOT t.sent)
FROM pgvpn.packet_headers h
CROSS JOIN LATERAL (VALUES (h.src, true), (h.dst, false)) t(addr, sent)
WHERE {where}
GROUP BY 1 ORDER BY 3 DESC, 2 DESC LIMIT %s
"""
PEERS = """
SELECT h.sender, h.receiver, count(*), sum(h.length), min(h.logged_at), max(h.logged_at)
FROM {source} h WHERE {where}
GROUP BY 1, 2 ORDER BY 4 DESC LIMIT %s
"""


def _address(value: Any) -> str | None:
    return None if value is None else str(value).removesuffix("/32").removesuffix("/128")


def aggregate(conn: psycopg.Connection, flt: LogFilter, by: str, top: int) -> list[Aggregate]:
    """The `top` biggest keys by bytes; `by` is one of GROUPINGS."""
    where, params = flt.where()
    if by == "flow":
        rows = conn.execute(sql.SQL(FLOWS).format(where=where), [*params, top]).fetchall()
        return [Aggregate({"src": _address(r[0]), "dst": _address(r[1]), "protocol": r[2],
                           "src_port": r[3], "dst_port": r[4]}, int(r[5]), int(r[6]),
                          r[7], r[8]) for r in rows]
    if by == "host":
        rows = conn.execute(sql.SQL(TALKERS).format(where=where), [*params, top]).fetchall()
        return [Aggregate({"address": _address(r[0])}, int(r[1]), int(r[2]), r[3], r[4],
                          int(r[5] or 0), int(r[6] or 0)) for r in rows]
    if by == "peer":
        # Peer totals need no header decoding unless the filter does.
        source = sql.SQL("pgvpn.packet_headers" if flt.needs_decoding else "pgvpn.packets")
        rows = conn.execute(sql.SQL(PEERS).format(source=source, where=where),
                            [*params, top]).fetchall()
        return [Aggregate({"sender": r[0], "receiver": r[1]}, int(r[2]), int(r[3]), r[4],
                          r[5]) for r in rows]
    raise ValueError(f"unknown grouping {by!r}")


def totals(conn: psycopg.Connection, flt: LogFilter) -> tuple[int, int]:
    """(packets, bytes) of the whole selection, for the footer of a top-N table."""
    where, params = flt.where()
    source = sql.SQL("pgvpn.packet_headers" if flt.needs_decoding else "pgvpn.packets")
    row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(h.length), 0) FROM {} h "
                               "WHERE {}").format(source, where), params).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)
