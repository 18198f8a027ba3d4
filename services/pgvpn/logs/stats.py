"""Aggregates over a window of the log: per-flow totals, top talkers, per-peer totals.

Computed by the server in one GROUP BY each, so a large window costs one pass
and only the top rows cross the wire. `packets` are packets on the wire, `rows` the
log's rows: they differ where a row holds a TCP super-packet (sql/009_offload.sql).
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
    packets: int  # on the wire
    bytes: int
    first: datetime
    last: datetime
    rows: int = 0  # in the log
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
        doc = {**self.key, "rows": self.rows, "packets": self.packets, "bytes": self.bytes,
               "first": self.first.isoformat(), "last": self.last.isoformat(),
               "bits_per_second": self.bits_per_second}
        if self.sent_bytes is not None:
            doc["sent_bytes"] = self.sent_bytes
            doc["received_bytes"] = self.received_bytes
        return doc


# A row's packets on the wire, for a query of pgvpn.packets (packet_headers has it).
WIRE = ("CASE WHEN h.offload IS NULL THEN 1 ELSE pgvpn.wire_packets(h.length, "
        "substring(h.data FROM 1 FOR 256), h.offload) END")
FLOWS = """
SELECT h.src, h.dst, h.protocol, h.src_port, h.dst_port,
       sum(h.wire_packets), sum(h.length), min(h.logged_at), max(h.logged_at), count(*)
FROM pgvpn.packet_headers h WHERE {where}
GROUP BY 1, 2, 3, 4, 5 ORDER BY 7 DESC, 6 DESC LIMIT %s
"""
# Each packet counts for its source (sent) and its destination (received).
TALKERS = """
SELECT t.addr, sum(h.wire_packets), sum(h.length), min(h.logged_at), max(h.logged_at),
       sum(h.length) FILTER (WHERE t.sent), sum(h.length) FILTER (WHERE NOT t.sent), count(*)
FROM pgvpn.packet_headers h
CROSS JOIN LATERAL (VALUES (h.src, true), (h.dst, false)) t(addr, sent)
WHERE {where}
GROUP BY 1 ORDER BY 3 DESC, 2 DESC LIMIT %s
"""
PEERS = """
SELECT h.sender, h.receiver, sum({wire}), sum(h.length), min(h.logged_at), max(h.logged_at),
       count(*)
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
                          r[7], r[8], rows=int(r[9])) for r in rows]
    if by == "host":
        rows = conn.execute(sql.SQL(TALKERS).format(where=where), [*params, top]).fetchall()
        return [Aggregate({"address": _address(r[0])}, int(r[1]), int(r[2]), r[3], r[4],
                          rows=int(r[7]), sent_bytes=int(r[5] or 0),
                          received_bytes=int(r[6] or 0)) for r in rows]
    if by == "peer":
        # Peer totals need no header decoding unless the filter does.
        source, wire = _source(flt)
        rows = conn.execute(sql.SQL(PEERS).format(source=source, wire=wire, where=where),
                            [*params, top]).fetchall()
        return [Aggregate({"sender": r[0], "receiver": r[1]}, int(r[2]), int(r[3]), r[4],
                          r[5], rows=int(r[6])) for r in rows]
    raise ValueError(f"unknown grouping {by!r}")


def _source(flt: LogFilter) -> tuple[sql.Composable, sql.Composable]:
    """The relation to read (headers decoded only if the filter needs them) and its
    expression for a row's packets on the wire."""
    if flt.needs_decoding:
        return sql.SQL("pgvpn.packet_headers"), sql.SQL("h.wire_packets")
    return sql.SQL("pgvpn.packets"), sql.SQL(WIRE)


def totals(conn: psycopg.Connection, flt: LogFilter) -> tuple[int, int, int]:
    """(packets on the wire, bytes, rows) of the whole selection, for the footer of a
    top-N table."""
    where, params = flt.where()
    source, wire = _source(flt)
    row = conn.execute(sql.SQL("SELECT coalesce(sum({}), 0), coalesce(sum(h.length), 0), "
                               "count(*) FROM {} h WHERE {}").format(wire, source, where),
                       params).fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
