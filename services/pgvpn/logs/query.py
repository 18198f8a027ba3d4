"""Reading packets out of the log: the newest few, a whole window in order, or a live tail.

Everything reads the pgvpn.packet_headers view, so headers are decoded by the
server at query time and only the rows asked for cross the wire.

Following the log uses the same rule as the agents' receivers: commit order is not
id order, but each sender's rows become visible strictly in `seq` order, so a
per-sender "highest seq seen" cursor never passes over a row that commits late.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgvpn.logs.filter import LogFilter
from pgvpn.offload import wire_packets

COLUMNS = ("id", "logged_at", "sender", "receiver", "seq", "length", "ip_version", "src",
           "dst", "protocol", "src_port", "dst_port", "tcp_flags", "icmp_type", "icmp_code",
           "wire_packets")
DATA_COLUMNS = ("data", "offload")  # only when asked for
FETCH_BATCH = 2000
NEW_SENDER_MARGIN = timedelta(minutes=1)  # how far back a sender first seen is read


@dataclass(frozen=True)
class LoggedPacket:
    """One row of the log with its decoded headers (`data` only when asked for)."""

    id: int
    logged_at: datetime
    sender: str
    receiver: str
    seq: int
    length: int
    ip_version: int | None = None
    src: str | None = None
    dst: str | None = None
    protocol: str | None = None
    src_port: int | None = None
    dst_port: int | None = None
    tcp_flags: tuple[str, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    #: The packets on the wire this row stands for: more than 1 for a TCP super-packet
    #: read from an offloading TUN (sql/009_offload.sql).
    wire_packets: int = 1
    data: bytes | None = field(default=None, repr=False)
    #: The row's virtio_net_hdr (pgvpn.offload), fetched with `data`.
    offload: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LoggedPacket:
        values = dict(zip((*COLUMNS, *DATA_COLUMNS), row, strict=False))
        for key in ("src", "dst"):
            if values.get(key) is not None:
                values[key] = str(values[key]).removesuffix("/32").removesuffix("/128")
        values["tcp_flags"] = tuple(values.get("tcp_flags") or ())
        for key in DATA_COLUMNS:
            if values.get(key) is not None:
                values[key] = bytes(values[key])
        return cls(**values)

    def on_the_wire(self) -> list[bytes]:
        """The packets this row stands for as they would cross a wire: a super-packet
        segmented, a partial checksum completed (pgvpn.offload); one packet otherwise.
        A row whose header is not usable is kept as it was logged."""
        data = self.data or b""
        try:
            return wire_packets(self.offload, data)
        except ValueError:
            return [data]

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values: ISO time, hex data when present."""
        doc: dict[str, Any] = {name: getattr(self, name) for name in COLUMNS}
        doc["logged_at"] = self.logged_at.isoformat()
        doc["tcp_flags"] = list(self.tcp_flags) if self.tcp_flags else None
        if self.data is not None:
            doc["data"] = self.data.hex()
            doc["offload"] = self.offload.hex() if self.offload is not None else None
        return doc


def _select_list(with_data: bool, alias: str = "h") -> sql.Composable:
    names = (*COLUMNS, *DATA_COLUMNS) if with_data else COLUMNS
    return sql.SQL(", ").join(sql.Identifier(alias, name) for name in names)


def count(conn: psycopg.Connection, flt: LogFilter) -> int:
    """How many logged packets the filter selects."""
    where, params = flt.where()
    source = "pgvpn.packet_headers" if flt.needs_decoding else "pgvpn.packets"
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} h WHERE {}").format(
        sql.SQL(source), where), params).fetchone()
    return int(row[0]) if row else 0


def select(conn: psycopg.Connection, flt: LogFilter, *, with_data: bool = False,
           limit: int | None = None) -> Iterator[LoggedPacket]:
    """Every selected packet, oldest first, streamed from a server-side cursor."""
    where, params = flt.where()
    query = sql.SQL("SELECT {} FROM pgvpn.packet_headers h WHERE {} "
                    "ORDER BY h.logged_at, h.id").format(_select_list(with_data), where)
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
    with conn.transaction(), conn.cursor(name="pgvpn_log_select", binary=True) as cur:
        cur.itersize = FETCH_BATCH
        cur.execute(query, params)
        for row in cur:
            yield LoggedPacket.from_row(row)


def heads(conn: psycopg.Connection) -> dict[str, int]:
    """Each registered peer's highest logged seq (index lookups, not a scan)."""
    rows = conn.execute("SELECT s.name, (SELECT max(p.seq) FROM pgvpn.packets p "
                        "WHERE p.sender = s.name) FROM pgvpn.peers s").fetchall()
    return {name: int(seq) for name, seq in rows if seq is not None}


def latest(conn: psycopg.Connection, flt: LogFilter, limit: int, *,
           with_data: bool = False) -> list[LoggedPacket]:
    """The newest `limit` selected packets, oldest first.

    Read per sender backwards along its (sender, seq) index and merged, so the
    newest rows of a large log come back without sorting all of it. Packets of
    senders that are not registered peers are only shown with a time window.
    """
    where, params = flt.where()
    query = sql.SQL(
        "SELECT x.* FROM pgvpn.peers s CROSS JOIN LATERAL ("
        " SELECT {cols} FROM pgvpn.packet_headers h WHERE h.sender = s.name AND {where}"
        " ORDER BY h.seq DESC LIMIT %s) x "
        "ORDER BY x.logged_at DESC, x.id DESC LIMIT %s").format(
        cols=_select_list(with_data), where=where)
    with conn.cursor(binary=True) as cur:
        rows = cur.execute(query, [*params, limit, limit]).fetchall()
    return [LoggedPacket.from_row(row) for row in reversed(rows)]


def follow(conn: psycopg.Connection, flt: LogFilter, after: dict[str, int], *,
           with_data: bool = False, poll: float = 0.5,
           should_stop: Callable[[], bool] = lambda: False) -> Iterator[LoggedPacket]:
    """Selected packets as they are committed, from per-sender cursor `after` on.

    Every poll reads all new rows (to move the cursors) but ships headers only
    for the ones that match, and data only when asked for.
    """
    cursors = dict(after)
    started = datetime.now(UTC) - NEW_SENDER_MARGIN
    matches, params_match = flt.where()
    while not should_stop():
        known = [sql.SQL("(h.sender = {} AND h.seq > {})").format(
            sql.Literal(sender), sql.Literal(seq)) for sender, seq in cursors.items()]
        known.append(sql.SQL("(h.sender <> ALL({}) AND h.logged_at >= {})").format(
            sql.Literal(list(cursors)), sql.Literal(started)))
        data = (sql.SQL(", CASE WHEN m THEN h.data END, CASE WHEN m THEN h.offload END")
                if with_data else sql.SQL(""))
        query = sql.SQL(
            "SELECT {cols}{data}, m FROM (SELECT h.*, ({matches}) AS m "
            "FROM pgvpn.packet_headers h WHERE {fresh}) h ORDER BY h.logged_at, h.id").format(
            cols=_select_list(False), data=data, matches=matches,
            fresh=sql.SQL(" OR ").join(known))
        with conn.cursor(binary=True) as cur:
            rows = cur.execute(query, params_match).fetchall()
        for row in rows:
            *fields, matched = row
            sender, seq = fields[2], fields[4]
            cursors[sender] = max(cursors.get(sender, 0), seq)
            if matched:
                yield LoggedPacket.from_row(tuple(fields))
        if not rows:
            time.sleep(poll)
