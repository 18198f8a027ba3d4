"""`pgvpn show`: the `wg show` of pgvpn.

Each peer's tunnel addresses, whether its agent is up, and the packets and bytes it
sent and received since it started, as each agent reports them with its heartbeat
(sql/010_show.sql), and the prefixes the owner routes to each (sql/011). The database
decides what a connection sees: a peer its own row (RLS), the owner and readers every
peer. The figures are the agents' own word, at
most one heartbeat old; what crossed is in the log (`pgvpn stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pgvpn.config import HEARTBEAT_SECONDS
from pgvpn.logs.render import Table, human_bytes
from pgvpn.timespec import format_duration

# An agent whose last heartbeat is older than this is reported as not responding:
# three missed beats, so that one slow beat on a busy machine does not flap.
STALE_AFTER = 3 * HEARTBEAT_SECONDS

# A peer writes its own row: a time Python cannot hold ('infinity', a year past 9999)
# reads as unknown here, so that one peer's row cannot stop `pgvpn show` for all.
QUERY = """
SELECT name, tunnel_addr, tunnel_addr6,
       CASE WHEN agent_started BETWEEN %(first)s AND %(last)s THEN agent_started END,
       CASE WHEN last_seen BETWEEN %(first)s AND %(last)s THEN last_seen END,
       sent_packets, sent_bytes, received_packets, received_bytes, now(),
       ARRAY(SELECT r.prefix::text FROM pgvpn.routes r WHERE r.peer = p.name
             ORDER BY r.address IS NULL, family(r.prefix), r.prefix),
       NOT EXISTS (SELECT FROM pg_catalog.pg_roles o
                   WHERE o.rolname = 'pgvpn_' || replace(p.name, '-', '_') AND o.rolcanlogin)
FROM pgvpn.peers p ORDER BY name
"""
TIMES = {"first": datetime(1, 1, 2, tzinfo=UTC), "last": datetime(9999, 12, 30, tzinfo=UTC)}


@dataclass(frozen=True)
class PeerStatus:
    name: str
    addresses: list[str]
    agent_started: datetime | None
    last_seen: datetime | None
    sent_packets: int
    sent_bytes: int
    received_packets: int
    received_bytes: int
    now: datetime  # the database's clock, which also wrote last_seen
    routes: list[str]  # the owner's word (sql/011): its addresses' host routes, subnets
    removed: bool = False  # its role cannot log in (`pgvpn db remove-peer`)

    @property
    def last_seen_seconds(self) -> float | None:
        """How long ago, never negative (a clock that stepped back, or a peer's lie)."""
        if self.last_seen is None:
            return None
        return max((self.now - self.last_seen).total_seconds(), 0.0)

    @property
    def state(self) -> str:
        """removed (its role cannot log in), connected, not responding (it stopped
        beating without saying so: killed, cut off), stopped (it said so), or never
        connected."""
        if self.removed:
            return "removed"
        if self.last_seen is None:
            return "never connected"
        if self.agent_started is None:
            return "stopped"
        seen = self.last_seen_seconds
        return "connected" if seen is not None and seen <= STALE_AFTER else "not responding"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "addresses": self.addresses, "routes": self.routes,
                "state": self.state,
                "connected": self.state == "connected",
                "agent_started": self.agent_started.isoformat() if self.agent_started else None,
                "last_seen": self.last_seen.isoformat() if self.last_seen else None,
                "last_seen_seconds_ago": self.last_seen_seconds,
                "sent": {"packets": self.sent_packets, "bytes": self.sent_bytes},
                "received": {"packets": self.received_packets, "bytes": self.received_bytes}}


def read_status(conn: psycopg.Connection) -> list[PeerStatus]:
    """Every peers row this connection may see."""
    return [PeerStatus(name, [str(a) for a in (v4, v6) if a is not None], started, seen,
                       sent_packets, sent_bytes, received_packets, received_bytes, now,
                       list(routes), removed)
            for name, v4, v6, started, seen, sent_packets, sent_bytes, received_packets,
            received_bytes, now, routes, removed in conn.execute(QUERY, TIMES).fetchall()]


def status_table(peers: list[PeerStatus], title: str) -> Table:
    table = Table(title, ["peer", "addresses", "routes", "agent", "up", "last seen", "sent",
                          "received"], right=["up", "last seen", "sent", "received"])
    for peer in peers:
        up = (format_duration(peer.now - peer.agent_started)
              if peer.agent_started is not None and peer.state == "connected" else "-")
        seen = peer.last_seen_seconds
        table.add(peer.name, ", ".join(peer.addresses) or "-", ", ".join(peer.routes) or "-",
                  peer.state, up,
                  "-" if seen is None else f"{format_duration(timedelta(seconds=seen))} ago",
                  traffic(peer.sent_packets, peer.sent_bytes),
                  traffic(peer.received_packets, peer.received_bytes))
    table.caption = (f"sent and received: since the agent started, as it reports them every "
                     f"{HEARTBEAT_SECONDS:g} s; what crossed: pgvpn stats")
    return table


def traffic(packets: int, count: int) -> str:
    return f"{packets} pkts, {human_bytes(count)}"
