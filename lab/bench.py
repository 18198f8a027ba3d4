"""`lab bench`: iperf3 through the tunnel and over the underlay, for one or more profiles.

The headline is the receiver-side rate; the underlay (peer to postgres host, no
tunnel) is measured with the same settings so the tunnel's cost is a ratio.
Every wait is bounded (iperf3 runs with a fixed -t and a timeout), so a profile
that stalls fails with a message instead of hanging the run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lab.backends.base import LabError, Progress
from lab.ceiling import measure_ceiling, sent_row_size
from lab.controller import Lab
from lab.measure import IperfResult, PingResult, iperf, ping
from lab.report import BLOG_V1_MBPS, run_label
from pgvpn.transports import PROFILES

LOG_SETTLE_TIMEOUT = 15.0  # seconds a slow profile gets to commit what it still holds
# RTT samples: idle, 100 echoes 20 ms apart (2 s); under load, one every 100 ms while
# iperf3 runs, from its second second to shortly before its end (the queue is full).
IDLE_PINGS, IDLE_INTERVAL = 100, 0.02
LOADED_INTERVAL, LOADED_START = 0.1, 1.0

def loaded_ping_count(duration: float) -> int:
    """Echoes that fit between LOADED_START and half a second before iperf3 ends."""
    return max(3, int((duration - LOADED_START - 0.5) / LOADED_INTERVAL))


def measure_underlay(lab: Lab, duration: float, progress: Progress) -> IperfResult:
    """iperf3 from the first peer to the postgres host: the same path, without the tunnel."""
    topology = lab.topology
    client = topology.agents[0]
    progress(f"underlay: iperf3 {client.name} -> {topology.database.name} for {duration:g}s")
    return iperf(lab.backend, server=topology.database.name,
                 address=str(topology.database_address_for(client)), client=client.name,
                 duration=duration)


def bench_profile(lab: Lab, duration: float, progress: Progress,
                  raw_dir: Path | None = None, underlay: IperfResult | None = None,
                  ceiling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure the running lab once: underlay (unless given), tunnel, RTT, packets logged,
    and the database's ceiling (unless given), after the tunnel so that its writes
    cannot slow the tunnel's run (a checkpoint, say)."""
    topology = lab.topology
    if len(topology.agents) < 2:
        raise LabError(f"{topology.path.name} has one agent: the bench needs two (iperf3 "
                       "from the first agent to the second)")
    client, server = topology.agents[0], topology.agents[1]
    if server.tunnel_address is None:
        raise LabError(f"{server.name} has no TUN_IP in {topology.path.name}")
    own_underlay = underlay is None
    if underlay is None:
        underlay = measure_underlay(lab, duration, progress)
    before = lab.log_totals()
    with lab.admin() as conn:
        started = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    offload = lab.settings.offload and PROFILES[lab.settings.profile].carries_offload
    progress(f"tunnel: idle RTT, {IDLE_PINGS} pings {client.name} -> {server.name}")
    rtt = ping(lab.backend, client.name, server.tunnel_address, count=IDLE_PINGS,
               interval=IDLE_INTERVAL)
    progress(f"tunnel: iperf3 {client.name} -> {server.name} ({server.tunnel_address}) "
             f"for {duration:g}s, profile {lab.settings.profile}, pinging meanwhile")
    loaded: dict[str, PingResult | str] = {}
    target = server.tunnel_address

    def ping_under_load() -> None:
        time.sleep(LOADED_START)
        try:
            loaded["rtt"] = ping(lab.backend, client.name, target,
                                 count=loaded_ping_count(duration), interval=LOADED_INTERVAL)
        except LabError as exc:  # said in the result, never a traceback from a thread
            loaded["error"] = str(exc)

    pinger = threading.Thread(target=ping_under_load, name="bench-loaded-ping", daemon=True)
    pinger.start()
    try:
        tunnel = iperf(lab.backend, server=server.name, address=server.tunnel_address,
                       client=client.name, duration=duration)
    except LabError as exc:  # bounded by iperf's timeout: say which profile stalled
        raise LabError(f"the tunnel stalled or failed with profile {lab.settings.profile}: "
                       f"{exc}; see 'lab logs {client.name}' and 'lab logs {server.name}'"
                       ) from None
    finally:
        pinger.join(timeout=duration + 60)  # ping's own bound is shorter
    under_load = loaded.get("rtt")
    if not isinstance(under_load, PingResult):  # nothing measured: no loss to speak of
        progress(f"tunnel: no RTT under load: {loaded.get('error', 'ping did not finish')}")
        under_load = None
    after = settled_log_totals(lab)
    if offload:  # rows hold super-packets: the ceiling is measured with rows their size
        ceiling = measure_ceiling(lab, duration, progress, sent_row_size(lab, started))
    elif ceiling is None:
        ceiling = measure_ceiling(lab, duration, progress)
    run = run_label(lab.settings.profile, lab.settings.offload, lab.settings.queue_target_ms)
    if raw_dir is not None:
        raw_dir.mkdir(parents=True, exist_ok=True)
        # one file per run (`--offload both`, `--queue-control both`), named as its label
        name = run.replace(", ", "-").replace(" ", "-")
        if own_underlay:
            (raw_dir / f"iperf3-underlay-{name}.json").write_text(
                json.dumps(underlay.raw, indent=1))
        (raw_dir / f"iperf3-tunnel-{name}.json").write_text(json.dumps(tunnel.raw, indent=1))
    return {
        "profile": lab.settings.profile,
        "run": run,
        "backend": lab.backend.name,
        "mtu": lab.effective_mtu,
        "duration_s": duration,
        "receiver_mbps": round(tunnel.receiver_mbps, 2),
        "sender_mbps": round(tunnel.sender_mbps, 2),
        "retransmits": tunnel.retransmits,
        "bytes_sent": tunnel.bytes_sent,
        "bytes_received": tunnel.bytes_received,
        "underlay_mbps": round(underlay.receiver_mbps, 2),
        "tunnel_to_underlay": round(tunnel.receiver_mbps / underlay.receiver_mbps, 4)
        if underlay.receiver_mbps else None,
        "ceiling_mbps": ceiling.get("mbps"),
        "tunnel_to_ceiling": round(tunnel.receiver_mbps / ceiling["mbps"], 4)
        if ceiling.get("mbps") else None,
        "ceiling": ceiling,
        "times_blog_v1_published": round(tunnel.receiver_mbps / BLOG_V1_MBPS, 1),
        "rtt_ms": rtt.rtt_ms,
        "ping_loss": rtt.lost,
        # percentiles of single echoes: idle, and behind one iperf3 stream
        "rtt_idle_ms": rtt.percentiles(),
        "rtt_loaded_ms": (under_load or PingResult(0, 0, {})).percentiles(),
        "ping_loss_loaded": under_load.lost if under_load else None,
        "offload": offload,
        # CoDel's target at the uplinks (ms), and the packets it dropped; 0: off
        "queue_target_ms": lab.settings.queue_target_ms,
        # rows, and the packets on the wire they stand for (a super-packet is several)
        "packets_logged": after["packets"] - before["packets"],
        "wire_packets_logged": after["wire_packets"] - before["wire_packets"],
        "bytes_logged": after["bytes"] - before["bytes"],
        "logged": PROFILES[lab.settings.profile].logged,
        "intervals": [{"t": i["t"], "mbps": round(i["mbps"], 2)} for i in tunnel.intervals],
    }



def settled_log_totals(lab: Lab, timeout: float = LOG_SETTLE_TIMEOUT) -> dict[str, Any]:
    """The log's totals once they stop growing: a slow profile may still be writing."""
    deadline = time.monotonic() + timeout
    totals = lab.log_totals()
    while time.monotonic() < deadline:
        time.sleep(0.5)  # let the last packets commit before counting rows
        again = lab.log_totals()
        if again == totals:
            break
        totals = again
    return totals


class Run(NamedTuple):
    """One run of a bench: a profile, with offload on or off, and queue control's target
    in ms (0: off)."""

    profile: str
    offload: bool
    queue_target_ms: int


def bench_runs(profiles: list[str], offload: str, queue: str,
               queue_target_ms: int) -> list[Run]:
    """The runs in order: with offload 'both', each profile that carries offload runs
    off, then on; with queue 'both', each profile runs without queue control, then
    with it (at `queue_target_ms`, offload on), so that one report compares them."""
    runs = []
    for name in profiles:
        carries = PROFILES[name].carries_offload
        offloads = [False, True] if offload == "both" and carries else [offload != "off"]
        queued = queue_target_ms if queue == "on" else 0
        runs += [Run(name, each, queued) for each in offloads]
        if queue == "both":
            runs.append(Run(name, offloads[-1], queue_target_ms))
    return runs


def bench_profiles(lab: Lab, runs: list[Run], duration: float, progress: Progress,
                   raw_dir: Path | None = None,
                   on_result: Callable[[dict[str, Any]], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Bench each profile in turn on the same lab, with the same settings.

    Before each profile the agents restart with it (if it differs) and only that
    profile's scratch tables are emptied (Lab.start_for_bench); the packet log is
    kept. The underlay is measured once, since no profile touches it, and the database's
    ceiling once per MTU (its rows are the size of the packets), or, with offload, after
    each run with rows the size of its super-packets. A profile whose
    run fails is reported as `{"profile", "logged", "error"}` and the run goes on.
    """
    underlay = measure_underlay(lab, duration, progress)
    if raw_dir is not None:
        raw_dir.mkdir(parents=True, exist_ok=True)
        (raw_dir / "iperf3-underlay.json").write_text(json.dumps(underlay.raw, indent=1))
    ceilings: dict[int, dict[str, Any]] = {}  # by MTU: the rows' size is the packets'
    results = []
    for name, offload, queue_target_ms in runs:
        run = lab.with_profile(name, offload, queue_target_ms)
        try:
            run.start_for_bench(progress)
            result = bench_profile(run, duration, progress, raw_dir, underlay=underlay,
                                   ceiling=ceilings.get(run.effective_mtu))
            if "mbps" in result["ceiling"] and not result["offload"]:
                ceilings[run.effective_mtu] = result["ceiling"]
        except LabError as exc:
            progress(f"{name} failed: {exc}")
            result = {"profile": name, "run": run_label(name, offload, queue_target_ms),
                      "logged": PROFILES[name].logged, "error": str(exc)}
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
