"""`lab bench`: iperf3 through the tunnel and over the underlay, as one report.

The headline is the receiver-side rate; the underlay (peer to postgres host, no
tunnel) is measured with the same settings so the tunnel's cost is a ratio.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.backend import LabError, Progress
from lab.controller import Lab
from lab.measure import iperf, ping

BLOG_V1_MBPS = 3.93


def bench_profile(lab: Lab, duration: float, progress: Progress,
                  raw_dir: Path | None = None) -> dict[str, Any]:
    """Measure the running lab once: underlay, tunnel, RTT, packets logged."""
    topology = lab.topology
    client, server = topology.agents[0], topology.agents[1]
    if server.tunnel_address is None:
        raise LabError(f"{server.name} has no TUN_IP in compose.yaml")
    database_address = str(topology.database_address_for(client))

    progress(f"underlay: iperf3 {client.name} -> {topology.database.name} for {duration:g}s")
    underlay = iperf(lab.backend, server=topology.database.name, address=database_address,
                     client=client.name, duration=duration)
    before = lab.log_totals()
    progress(f"tunnel: iperf3 {client.name} -> {server.name} ({server.tunnel_address}) "
             f"for {duration:g}s, profile {lab.settings.profile}")
    tunnel = iperf(lab.backend, server=server.name, address=server.tunnel_address,
                   client=client.name, duration=duration)
    progress("tunnel: ping RTT sample")
    rtt = ping(lab.backend, client.name, server.tunnel_address, count=20, interval=0.1)
    time.sleep(0.5)  # let the last batches commit before counting rows
    after = lab.log_totals()
    if raw_dir is not None:
        raw_dir.mkdir(parents=True, exist_ok=True)
        name = lab.settings.profile
        (raw_dir / f"iperf3-underlay-{name}.json").write_text(json.dumps(underlay.raw, indent=1))
        (raw_dir / f"iperf3-tunnel-{name}.json").write_text(json.dumps(tunnel.raw, indent=1))
    return {
        "profile": lab.settings.profile,
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
        "times_blog_v1_published": round(tunnel.receiver_mbps / BLOG_V1_MBPS, 1),
        "rtt_ms": rtt.rtt_ms,
        "ping_loss": rtt.transmitted - rtt.received,
        "packets_logged": after["packets"] - before["packets"],
        "bytes_logged": after["bytes"] - before["bytes"],
        "logged": True,
        "intervals": [{"t": i["t"], "mbps": round(i["mbps"], 2)} for i in tunnel.intervals],
    }


def build_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json: the first result's fields at the top, every result under `results`."""
    report = dict(results[0])
    report["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["results"] = results
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# pgvpn lab bench",
        "",
        f"Generated {report['generated_at']} on the **{report['backend']}** backend; "
        f"iperf3 TCP, {report['duration_s']:g} s, receiver-side rate.",
        "",
        "| profile | logged | MTU | tunnel Mbit/s | underlay Mbit/s | tunnel/underlay "
        "| x blog-v1 (3.93) | RTT avg ms | retransmits | packets logged | MB logged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratio = r["tunnel_to_underlay"]
        lines.append(
            f"| {r['profile']} | {'yes' if r['logged'] else 'no'} | {r['mtu']} "
            f"| {r['receiver_mbps']:.1f} | {r['underlay_mbps']:.0f} "
            f"| {f'{ratio:.1%}' if ratio is not None else 'n/a'} "
            f"| {r['times_blog_v1_published']:.1f}x | {r['rtt_ms'].get('avg', float('nan')):.2f} "
            f"| {r['retransmits']} | {r['packets_logged']} | {r['bytes_logged'] / 1e6:.1f} |")
    lines += ["", "Raw iperf3 JSON is kept beside this file.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
