"""The agent's Prometheus metrics (`--metrics-listen ADDR:PORT`), served over HTTP.

Read at scrape time from the counters the pumps keep anyway, so the data path pays
nothing for them: packets, bytes, batches and reconnects per direction, each batch's
time in the database, frames dropped on the way in (not packets, or to no peer's route)
and rows skipped on the way out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pgvpn.config import listen_parts
from pgvpn.errors import PgvpnError
from pgvpn.transports.base import LATENCY_BUCKETS, Counters

log = logging.getLogger(__name__)


@dataclass
class Readings:
    """What a scrape reads: this agent, its peer, and its counters as they are now."""

    name: str
    peer: str  # the fixed peer; "" for an agent that routes by the table
    up: Counters
    down: Counters
    dropped_frames: int
    skipped_rows: int
    unrouted: int = 0
    queue_drops: int = 0


class AgentCollector(Collector):
    def __init__(self, read: Callable[[], Readings]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        now = self.read()
        labels = ["peer", "remote", "direction"]
        sides = (("up", now.up), ("down", now.down))
        for field, text in (
                ("packets", "packets carried (up: TUN to database, down: database to TUN); "
                 "a TCP super-packet of an offloading TUN counts once, as the TUN does"),
                ("bytes", "bytes of packets carried"),
                ("batches", "batches written (up) or read (down)"),
                ("reconnects", "database connections lost and made again")):
            family = CounterMetricFamily(f"pgvpn_{field}", text, labels=labels)
            for direction, counters in sides:
                family.add_metric([now.name, now.peer, direction], getattr(counters, field))
            yield family
        latency = HistogramMetricFamily(
            "pgvpn_batch_seconds", "each batch's time in the database: the uplink's write "
            "and commit, the downlink's reading statement (waits for a wake-up excluded)",
            labels=labels)
        bounds = [*map(repr, LATENCY_BUCKETS), "+Inf"]
        for direction, counters in sides:
            buckets = list(zip(bounds, accumulate(counters.seconds.counts), strict=True))
            latency.add_metric([now.name, now.peer, direction], buckets,
                               counters.seconds.total)
        yield latency
        for field, text in (("packets", "packets committed for each remote peer (up) and "
                             "fetched from it for the TUN (down)"),
                            ("bytes", "bytes of those packets")):
            family = CounterMetricFamily(f"pgvpn_peer_{field}", text,
                                         labels=["peer", "remote_peer", "direction"])
            for direction, counters in sides:
                for remote, counts in sorted(dict(counters.by_peer).items()):
                    family.add_metric([now.name, remote, direction],
                                      counts[0 if field == "packets" else 1])
            yield family
        for name, text, number in (
                ("pgvpn_dropped_frames", "frames read from the TUN device that are not "
                 "IPv4/IPv6 packets (dropped, never logged)", now.dropped_frames),
                ("pgvpn_skipped_rows", "logged rows not written to the TUN device (not a "
                 "packet for it, or larger than its MTU)", now.skipped_rows),
                ("pgvpn_routing_misses", "packets read from the TUN device to an address no "
                 "other peer routes (dropped, never logged; routing 'table')", now.unrouted),
                ("pgvpn_queue_drops", "packets of bulk flows dropped by the uplink's queue "
                 "control (CoDel, PGVPN_QUEUE_TARGET_MS; never logged)", now.queue_drops)):
            family = CounterMetricFamily(name, text, labels=["peer"])
            family.add_metric([now.name], number)
            yield family


class MetricsServer:
    """An HTTP server for /metrics on its own thread, stopped with the agent."""

    def __init__(self, listen: str, read: Callable[[], Readings]) -> None:
        host, port = listen_parts(listen)
        registry = CollectorRegistry()
        registry.register(AgentCollector(read))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise PgvpnError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
        log.info("metrics on http://%s/metrics", listen)

    def close(self) -> None:
        server: WSGIServer = self.server
        server.shutdown()
        server.server_close()
        thread: threading.Thread = self.thread
        thread.join(timeout=5)
