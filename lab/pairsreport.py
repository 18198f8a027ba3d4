"""The pairs bench's report: report.md and throughput.png beside report.json.

Pure functions of what `lab.pairs.bench_pairs` returns (no lab needed), as
lab.report is for the single bench, whose report this leaves alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lab.report import write_report_files


def _cell(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)


def fairness_sentence(report: dict[str, Any]) -> str:
    """Jain's index with what it means for this many pairs, or why there is none."""
    pairs = report["pairs"]
    if report["failed"]:
        return (f"Jain's fairness index and the aggregate: not computed, since "
                f"{', '.join(report['failed'])} failed (a failed pair has no rate).")
    if report["fairness"] is None:
        return "Jain's fairness index: not defined, no pair carried anything."
    n = len(pairs)
    meaning = ("one pair: 1 by definition" if n == 1 else
               f"1 = every pair got the same rate, {1 / n:.3f} = one pair got everything")
    return (f"Jain's fairness index over the {n} pair(s), (sum x)^2 / (n * sum x^2): "
            f"**{report['fairness']:.3f}** ({meaning}).")


def render_pairs_markdown(report: dict[str, Any], *, chart: str | None = None) -> str:
    """report.md: one row per pair, the aggregate, Jain's index and what was not measured."""
    aggregate = report["aggregate_mbps"]
    lines = [
        "# pgvpn lab bench: pairs at once",
        "",
        f"Generated {report['generated_at']} on the **{report['backend']}** backend; iperf3 "
        f"TCP through the tunnel on {len(report['pairs'])} disjoint pair(s) of agents at the "
        f"same time (every server up, then every client started together), "
        f"{report['duration_s']:g} s, profile {report['run']}, MTU {report['mtu']}, routing "
        f"{report['routing']}; receiver-side rates.",
        "",
        "| pair (client -> server) | address:port | Mbit/s | share of aggregate "
        "| retransmits |",
        "|---|---|---:|---:|---:|",
    ]
    for pair in report["pairs"]:
        where = f"{pair['address']}:{pair['port']}"
        if "error" in pair:
            reason = " ".join(str(pair["error"]).split())[:160].replace("|", "/")
            lines.append(f"| {pair['client']} -> {pair['server']} | {where} "
                         f"| **failed**: {reason} | | |")
            continue
        share = pair["receiver_mbps"] / aggregate if aggregate else None
        lines.append(f"| {pair['client']} -> {pair['server']} | {where} "
                     f"| {pair['receiver_mbps']:.1f} | {_cell(share, '{:.1%}')} "
                     f"| {_cell(pair['retransmits'], '{}')} |")
    lines += [f"| **aggregate** | | **{_cell(aggregate, '{:.1f}')}** | "
              f"| {_cell(report['retransmits'], '{}')} |", "", fairness_sentence(report), ""]
    if report["logged"]:
        rows, wire = report["packets_logged"], report["wire_packets_logged"]
        lines += [f"Logged during the run (every pair, both ways, a before/after difference "
                  f"of the log): {rows} rows" + (f" ({wire} packets on the wire)"
                                                 if wire != rows else "")
                  + f", {report['bytes_logged'] / 1e6:.1f} MB.", ""]
    else:
        lines += [f"Profile {report['profile']} logs no packets.", ""]
    if report["left_out"]:
        lines += [f"Left out: {', '.join(report['left_out'])} (an odd number of agents: "
                  "--all-pairs pairs them in topology order).", ""]
    lines += [f"Not measured in pairs mode: {report['not_measured']}.", ""]
    if chart:
        lines += [f"![per-second throughput of each pair]({chart})", ""]
    lines += ["Raw iperf3 JSON of each pair is kept beside this file.", ""]
    return "\n".join(lines)


def write_pairs_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, throughput.png (one line per pair) and report.md in `out_dir`."""
    from lab.plot import plot_pairs  # late: matplotlib is slow to import

    write_report_files(report, out_dir, plot_pairs, render_pairs_markdown)
