"""Measurements taken by exec-ing tools inside lab hosts: iperf3 and ping.

Backend-neutral: everything here goes through `Backend.exec`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lab.backends.base import Backend, LabError

IPERF_PORT = 5201
CONNECT_RETRY_SECONDS = 15.0
_REPLY = re.compile(r"^\d+ bytes from .* icmp_seq=(\d+) .*time=([\d.]+) ms$", re.MULTILINE)


@dataclass(frozen=True)
class IperfResult:
    receiver_mbps: float
    sender_mbps: float
    retransmits: int
    bytes_sent: int
    bytes_received: int
    intervals: list[dict[str, float]]
    raw: dict[str, Any]


def iperf(backend: Backend, *, server: str, address: str, client: str, duration: float,
          streams: int = 1, reverse: bool = False, port: int = IPERF_PORT,
          started: Callable[[], object] | None = None) -> IperfResult:
    """iperf3 TCP from `client` to `address` on `server`; the server serves one test.

    `intervals` are the receiver's per-second rates (the server's report, fetched with
    --get-server-output): on a slow tunnel the sender's first seconds only fill buffers.
    `port` lets several runs share a host; `started` is called once the server is up and
    before the client starts, so that concurrent runs can start their clients together.
    """
    # -1: serve one test then exit; --idle-timeout: never outlive a client that failed;
    # -J: so that --get-server-output brings its report back as JSON
    backend.exec(server, ["iperf3", "-s", "-1", "-D", "-J", "-B", address, "-p", str(port),
                          "--idle-timeout", str(int(duration) + 30)]).check(
        f"starting iperf3 server on {server}")
    if started is not None:
        started()
    argv = ["iperf3", "-c", address, "-p", str(port), "-t", str(duration), "-J",
            "-P", str(streams), "--connect-timeout", "3000", "--get-server-output"]
    if reverse:
        argv.append("-R")
    deadline = time.monotonic() + CONNECT_RETRY_SECONDS
    while True:  # the daemonised server may need a moment to listen
        result = backend.exec(client, argv, timeout=duration + 60)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            raise LabError(f"iperf3 on {client} printed no JSON: {result.stderr.strip()}"
                           ) from None
        error = report.get("error", "")
        if not error:
            break
        if "connect" not in error or time.monotonic() > deadline:
            raise LabError(f"iperf3 {client} -> {server} ({address}) failed: {error}")
        time.sleep(0.3)
    end = report["end"]
    # with -R the client is the receiver, so its own intervals are the receiver's
    receiver = report if reverse else report.get("server_output_json", report)
    return IperfResult(
        receiver_mbps=end["sum_received"]["bits_per_second"] / 1e6,
        sender_mbps=end["sum_sent"]["bits_per_second"] / 1e6,
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        bytes_sent=int(end["sum_sent"]["bytes"]),
        bytes_received=int(end["sum_received"]["bytes"]),
        intervals=[{"t": round(i["sum"]["end"], 3), "mbps": i["sum"]["bits_per_second"] / 1e6}
                   for i in receiver.get("intervals", [])],
        raw=report)


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    rtt_ms: dict[str, float]
    samples_ms: tuple[float, ...] = ()  # each reply's RTT, in the order they came

    @property
    def lost(self) -> int:
        return self.transmitted - self.received

    def percentiles(self) -> dict[str, float | int | None]:
        """p50 and p99 of the replies' RTTs (nearest rank), with the sample count."""
        return {"p50": percentile(self.samples_ms, 50), "p99": percentile(self.samples_ms, 99),
                "samples": len(self.samples_ms)}


def percentile(samples: tuple[float, ...] | list[float], rank: float) -> float | None:
    """The nearest-rank percentile: a value that was measured, never an interpolation
    (p99 of 50 samples is the largest); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    index = max(0, math.ceil(rank / 100 * len(ordered)) - 1)
    return ordered[min(index, len(ordered) - 1)]


def ping(backend: Backend, host: str, address: str, *, count: int = 10,
         interval: float = 0.2) -> PingResult:
    """ICMP echo from `host` to `address`; never raises for loss (it is in the result).

    Each of the `count` probes counts as received if its reply comes before the
    deadline, 3 s after the last probe is due. ping's own tally does not mean that:
    once a reply has come, it waits only
    max(2 x the largest RTT, interval) after its last probe, so one late reply at the end
    counts as lost (a CI run failed on a 3-probe ping that way). With a deadline (-w)
    ping waits for every reply, and sends extra probes after a loss, which are ignored
    here: the replies are counted by icmp_seq.
    """
    deadline = math.ceil(count * interval + 3)
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2",
            "-w", str(deadline), address]
    if ":" in address:
        argv.insert(1, "-6")
    result = backend.exec(host, argv, timeout=deadline + 10)
    replies = {int(seq): float(ms) for seq, ms in _REPLY.findall(result.stdout)
               if 1 <= int(seq) <= count}  # a duplicate reply is marked (DUP!), not matched
    samples = tuple(replies.values())
    return PingResult(
        transmitted=count, received=len(replies),
        rtt_ms={"min": min(samples), "avg": round(sum(samples) / len(samples), 3),
                "max": max(samples)}
        if samples else {},
        samples_ms=samples)


def wait_for_ping(backend: Backend, host: str, address: str, timeout: float) -> None:
    """Wait until one echo gets through, or say what did not come up."""
    deadline = time.monotonic() + timeout
    while True:
        if ping(backend, host, address, count=1).received:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{host} cannot ping {address} over the tunnel after {timeout:.0f}s;"
                           f" see 'lab logs {host}'")


# Fetches an agent's metrics from inside its host (they listen on its loopback), with
# the host's own Python and the standard library only.
SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          "'http://' + sys.argv[1] + '/metrics', timeout=5).read().decode())")


def scrape_metrics(backend: Backend, host: str, listen: str) -> dict[str, float]:
    """The agent's Prometheus samples, by name and labels:
    `pgvpn_packets_total{direction="up"}` -> value (the peer labels left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    done = backend.exec(host, ["python3", "-c", SCRAPE, listen], timeout=15)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"cannot scrape {host}'s metrics on {listen}: {detail}")
    samples = {}
    for family in text_string_to_metric_families(done.stdout):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("peer", "remote")}
            key = sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(
                labels.items())) + "}" if labels else "")
            samples[key] = sample.value
    return samples
