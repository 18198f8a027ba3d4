"""`lab bench --failover`: a TCP stream through the tunnel while the primary database is
killed (SIGKILL, a crash) again and again, each time after the old primary has come
back as a standby. Reports, per kill, how long the tunnel carried nothing, and at the
end whether the log lost or repeated any row.

How long the tunnel was down is measured with a ping every 0.1 s through it: the kill,
and the first reply after it. iperf3's seconds with no throughput are reported beside
it: TCP's retransmission backoff (200 ms, doubling) can make a stall look longer than
the outage was.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from typing import Any

from lab.backends.base import LabError, Progress
from lab.controller import Lab
from lab.measure import IperfResult, iperf
from lab.report import write_report_files
from lab.topology import Host

MAX_KILLS = 20
WINDOW = 30.0  # seconds of iperf3 (and pings) around each kill
STEADY = 4.0  # seconds of traffic before each kill
PING_INTERVAL = 0.1
GAP = 0.5  # seconds with no echo reply that count as the tunnel carrying nothing
# ping -D: "[1765152000.123456] 64 bytes from 10.230.0.2: icmp_seq=7 ttl=64 time=3.1 ms"
_REPLY = re.compile(r"^\[(?P<at>\d+\.\d+)\] \d+ bytes from .*icmp_seq=\d+", re.MULTILINE)
# Per sender, the rows it logged since a mark: counted, distinct, and the last seq.
STREAM = """
SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0)
FROM pgvpn.packets WHERE sender = %s AND seq > %s
"""
MARKS = "SELECT name, (SELECT max(seq) FROM pgvpn.packets WHERE sender = name) FROM pgvpn.peers"


def bench_failover(lab: Lab, kills: int, progress: Progress, raw_dir: Any = None
                   ) -> dict[str, Any]:
    """The whole run: returns the report (report.json's content). Each kill has a
    stream of its own (STEADY s of traffic, the kill, the failover, the rest of
    WINDOW s); the old primary rejoins between streams, so that a slow rejoin shifts
    the next kill rather than cutting its measurement short."""
    cluster = lab.cluster()
    cluster.wait_healthy(progress)
    client = lab.topology.agents[0]
    server = lab.topology.hosts.get(next((a.name for a in lab.topology.agents
                                          if a.tunnel_address == client.tunnel_peer), ""))
    if server is None or client.tunnel_peer is None:
        raise LabError(f"{client.name} has no tunnel peer among the agents (TUN_PEER)")
    marks = _marks(lab)
    progress(f"{kills} kill(s) of the primary, each during {WINDOW:g}s of iperf3 "
             f"{client.name} -> {server.name}")
    events, streams = [], []
    for number in range(1, kills + 1):
        results, threads = _start_window(lab, client, server)
        time.sleep(STEADY)
        event, killed = _kill_leader(lab, number, progress)
        for thread in threads:
            thread.join(WINDOW + 120)
        event.update(outage(results.get("ping", []), event["killed_at"]))
        stream = results.get("iperf", LabError("iperf3 through the tunnel did not finish"))
        if isinstance(stream, LabError):
            event.setdefault("error", str(stream))
        else:
            streams.append(stream)
            event["zero_throughput_s"] = sum(1 for i in stream.intervals if i["mbps"] < 0.01)
        if killed is not None:
            _rejoin(lab, killed, event, progress)
        events.append(event)
    integrity = _integrity(lab, marks)
    report = {"kind": "failover", "backend": lab.backend.name,
              "topology": lab.topology.path.name, "client": client.name,
              "server": server.name, "kills": events, "integrity": integrity,
              "seconds": WINDOW}
    if streams:
        report.update(
            receiver_mbps=round(sum(s.receiver_mbps for s in streams) / len(streams), 1),
            zero_throughput_s=sum(e.get("zero_throughput_s", 0) for e in events),
            bytes_sent=sum(s.bytes_sent for s in streams),
            bytes_received=sum(s.bytes_received for s in streams))
    resumed = [e["resumed_s"] for e in events if e["resumed_s"] is not None]
    report["summary"] = {
        "kills": kills, "resumed": len(resumed),
        "resumed_max_s": max(resumed) if resumed else None,
        "resumed_median_s": sorted(resumed)[len(resumed) // 2] if resumed else None,
        "rows_lost": integrity["rows_lost"], "duplicates": integrity["duplicates"],
        "gaps": integrity["gaps"]}
    report["failed"] = failures(report)
    return report


def outage(replies: list[float], killed_at: float) -> dict[str, float | None]:
    """When the tunnel carried echoes again after a kill: the end of the first silence
    (no reply for more than GAP s) from the last reply before the kill on. Replies
    just after the kill are echoes already committed before it, delivered from the
    receiver's backlog, so the first reply after the kill is not the answer."""
    before = [at for at in replies if at <= killed_at][-1:]
    around = before + [at for at in replies if at > killed_at]
    for previous, following in itertools.pairwise(around):
        if following - previous > GAP:
            return {"resumed_s": round(following - killed_at, 2),
                    "silent_s": round(following - previous, 2)}
    return {"resumed_s": None, "silent_s": None}


def failures(report: dict[str, Any]) -> list[str]:
    """What went wrong, one line each: the run's exit status is 1 if any."""
    summary = report["summary"]
    found = [f"kill {e['number']}: the tunnel did not resume" for e in report["kills"]
             if e["resumed_s"] is None]
    found += [f"kill {e['number']}: {e['error']}" for e in report["kills"] if e.get("error")]
    if summary["rows_lost"] or summary["duplicates"] or summary["gaps"]:
        found.append(f"log: {summary['rows_lost']} row(s) lost, {summary['duplicates']} "
                     f"duplicate(s), {summary['gaps']} gap(s)")
    if "iperf_error" in report:
        found.append(report["iperf_error"])
    return found


def _start_window(lab: Lab, client: Host, server: Host
                  ) -> tuple[dict[str, Any], list[threading.Thread]]:
    """iperf3 client -> server and pings through the tunnel for WINDOW s, in threads
    that fill the returned dict (keys iperf, ping)."""
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda: results.update(ping=_ping_log(
            lab, client.name, client.tunnel_peer or "", int(WINDOW))), daemon=True),
        threading.Thread(target=lambda: results.update(iperf=_stream(
            lab, server.name, server.tunnel_address or "", client.name, int(WINDOW))),
            daemon=True)]
    for thread in threads:
        thread.start()
    return results, threads


def _kill_leader(lab: Lab, number: int, progress: Progress
                 ) -> tuple[dict[str, Any], Host | None]:
    """SIGKILL the primary and wait for a new one; returns the event and the node
    killed (None if it could not be)."""
    event: dict[str, Any] = {"number": number}
    leader = None
    try:
        leader = lab.cluster().leader()
        event["killed"] = leader.name
        progress(f"kill {number}: SIGKILL {leader.name} (the primary)")
        event["killed_at"] = time.time()
        lab.backend.kill(leader)
        event["promoted"] = _wait_new_leader(lab, leader.name)
        event["promoted_s"] = round(time.time() - event["killed_at"], 2)
        progress(f"kill {number}: {event['promoted']} promoted after "
                 f"{event['promoted_s']:.1f}s")
    except LabError as exc:
        event["error"] = str(exc)
        progress(f"kill {number}: {exc}")
    event.setdefault("killed_at", time.time())
    return event, leader


def _rejoin(lab: Lab, node: Host, event: dict[str, Any], progress: Progress) -> None:
    """Start the old primary again and wait until it follows as a synchronous standby
    (Patroni rewinds it); how long that took, from its kill."""
    try:
        progress(f"kill {event['number']}: starting {node.name} again")
        lab.backend.start(node, progress)
        lab.cluster().wait_healthy(progress)
        event["rejoined_s"] = round(time.time() - event["killed_at"], 2)
    except LabError as exc:
        event.setdefault("error", str(exc))
        progress(f"kill {event['number']}: {exc}")


def _wait_new_leader(lab: Lab, old: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            leader = lab.cluster().leader()
            if leader.name != old:
                return leader.name
        except LabError:
            pass
        time.sleep(0.2)
    raise LabError(f"no node took over from {old} within {timeout:g}s")


def _stream(lab: Lab, server: str, address: str, client: str, duration: int
            ) -> IperfResult | LabError:
    try:
        return iperf(lab.backend, server=server, address=address, client=client,
                     duration=duration)
    except LabError as exc:
        return exc


def _ping_log(lab: Lab, host: str, address: str, seconds: int) -> list[float]:
    """The times (epoch) of every echo reply during `seconds`, one probe per 0.1 s."""
    done = lab.backend.exec(host, ["ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1",
                                   "-w", str(seconds), address], timeout=seconds + 30)
    return [float(m["at"]) for m in _REPLY.finditer(done.stdout)]


def _marks(lab: Lab) -> dict[str, int]:
    with lab.admin() as conn:
        return {name: int(seq or 0) for name, seq in conn.execute(MARKS).fetchall()}


def _integrity(lab: Lab, marks: dict[str, int]) -> dict[str, Any]:
    """Per sender since the marks, on the primary now: duplicates (a seq twice) and
    gaps (a seq missing); each uplink resends a batch whose commit it did not see
    with the same numbers, so a lost committed row would show as a gap."""
    senders: dict[str, Any] = {}
    with lab.admin() as conn:
        for sender, mark in marks.items():
            row = conn.execute(STREAM, (sender, mark)).fetchone()
            assert row is not None
            rows, distinct, last = map(int, row)
            senders[sender] = {"rows": rows, "duplicates": rows - distinct,
                               "gaps": (last - mark - distinct) if rows else 0}
    return {"senders": senders,
            "duplicates": sum(s["duplicates"] for s in senders.values()),
            "gaps": sum(s["gaps"] for s in senders.values()),
            "rows_lost": sum(s["gaps"] for s in senders.values())}


def render_failover_markdown(report: dict[str, Any], *, chart: str | None = None) -> str:
    """report.md: one line per kill, then the log's integrity."""
    lines = [f"# pgvpn failover bench ({report['backend']}, {report['topology']})", "",
             f"The primary killed (SIGKILL) {len(report['kills'])} time(s), each during "
             f"{report['seconds']:g} s of iperf3 {report['client']} -> {report['server']} "
             "(the old primary rejoins between them).", "",
             "| kill | primary killed | promoted | promoted after s | tunnel resumed after s "
             "| no echo for s | old primary back as sync standby after s (started after "
             "the stream) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for e in report["kills"]:
        lines.append(f"| {e['number']} | {e.get('killed', '?')} | {e.get('promoted', '-')} | "
                     f"{e.get('promoted_s', '-')} | {e.get('resumed_s') or 'never'} | "
                     f"{e.get('silent_s') or '-'} | {e.get('rejoined_s', '-')} |")
    summary = report["summary"]
    lines += ["", f"- tunnel resumed after every kill: {summary['resumed']}/{summary['kills']}"
              + (f", at most {summary['resumed_max_s']} s, median "
                 f"{summary['resumed_median_s']} s" if summary["resumed"] else ""),
              f"- rows lost: {summary['rows_lost']}, duplicates: {summary['duplicates']} "
              "(per sender, since the start of the run, on the primary afterwards)"]
    if "receiver_mbps" in report:
        lines.append(f"- iperf3: {report['receiver_mbps']} Mbit/s on average over the streams, "
                     f"{report['zero_throughput_s']} one-second interval(s) with nothing "
                     "received")
    if report["failed"]:
        lines += ["", "**Failed:** " + "; ".join(report["failed"])]
    if chart:
        lines += ["", f"![throughput]({chart})"]
    return "\n".join(lines) + "\n"


def write_failover_report(report: dict[str, Any], out_dir: Any) -> None:
    write_report_files(report, out_dir, lambda _report, _path: False,
                       render_failover_markdown)
