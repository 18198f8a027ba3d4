"""throughput.png: every profile's per-second throughput on one log-scale chart (or,
for `lab bench --pairs`, every pair's on a linear one: plot_pairs).

The chart is meant to be read without the table: each line's label carries the
profile, its average rate and whether it logs; the blog's published 3.93 Mbit/s
is drawn as a reference line. Rendered with the Agg canvas directly (no pyplot,
no display, no global state), so it works headless and inside tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lab.report import BLOG_V1_MBPS, label, rtt_pair, succeeded

FLOOR_MBPS = 0.01  # a second with nothing received is drawn here: log(0) has no place
MIN_INTERVAL_S = 0.5  # iperf3's last interval is often a few ms long: noise, not a rate


def steps(intervals: list[dict[str, float]]) -> tuple[list[float], list[float]]:
    """Interval edges and rates for a step plot, without the short trailing fragment."""
    edges: list[float] = [0.0]
    rates: list[float] = []
    for interval in intervals:
        end = float(interval["t"])
        if end - edges[-1] < MIN_INTERVAL_S and rates:
            continue
        edges.append(end)
        rates.append(max(float(interval["mbps"]), FLOOR_MBPS))
    return edges, rates


def plot_throughput(report: dict[str, Any], path: Path) -> bool:
    """Write the chart to `path`; False (and no file) when no result has intervals."""
    runs = [r for r in succeeded(report["results"]) if r.get("intervals")]
    if not runs:
        return False
    figure = Figure(figsize=(9, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in runs:
        edges, rates = steps(run["intervals"])
        logged = "logged" if run["logged"] else "NOT logged"
        axes.stairs(rates, edges, linewidth=2, baseline=None,
                    label=f"{label(run)}: {run['receiver_mbps']:.1f} Mbit/s avg, "
                          f"MTU {run['mtu']}, {logged}; RTT p50/p99 ms idle "
                          f"{rtt_pair(run, 'rtt_idle_ms')}, loaded "
                          f"{rtt_pair(run, 'rtt_loaded_ms')}")
    axes.axhline(BLOG_V1_MBPS, color="grey", linestyle="--", linewidth=1,
                 label=f"blog-v1 as published: {BLOG_V1_MBPS} Mbit/s")
    axes.set_yscale("log")
    # plain numbers (20, not 2x10^1), and between decades only 2 and 5, to stay legible
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else ""))
    axes.set_xlim(left=0)
    axes.set_xlabel("seconds into the iperf3 run")
    axes.set_ylabel("received, Mbit/s in each second (log scale)")
    axes.set_title(f"pgvpn: iperf3 TCP through PostgreSQL, per transport profile "
                   f"({report.get('backend', '?')} lab, receiver side)")
    axes.grid(True, which="both", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    figure.savefig(path)
    return True


def plot_pairs(report: dict[str, Any], path: Path) -> bool:
    """The pairs bench's chart: one line per pair and their per-second sum, on a linear
    scale (a log scale would flatten the differences that fairness is about); False (and
    no file) when no pair has intervals."""
    runs = [p for p in report["pairs"] if p.get("intervals")]
    if not runs:
        return False
    figure = Figure(figsize=(9, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    drawn = [steps(run["intervals"]) for run in runs]
    for run, (edges, rates) in zip(runs, drawn, strict=True):
        axes.stairs(rates, edges, linewidth=2, baseline=None,
                    label=f"{run['client']} -> {run['server']}: "
                          f"{run['receiver_mbps']:.1f} Mbit/s avg")
    if len(runs) > 1:  # seconds that every pair measured, summed
        seconds = min(len(rates) for _, rates in drawn)
        edges = min((e for e, _ in drawn), key=len)[:seconds + 1]
        total = [sum(rates[i] for _, rates in drawn) for i in range(seconds)]
        aggregate = report.get("aggregate_mbps")
        axes.stairs(total, edges, linewidth=1.5, linestyle="--", color="black", baseline=None,
                    label="sum of the pairs" + (f": {aggregate:.1f} Mbit/s avg"
                                                if aggregate is not None else ""))
    fairness = report.get("fairness")
    axes.set_ylim(bottom=0)
    axes.set_xlim(left=0)
    axes.set_xlabel("seconds into the iperf3 runs (all pairs started together)")
    axes.set_ylabel("received, Mbit/s in each second")
    axes.set_title(f"pgvpn: {len(report['pairs'])} iperf3 pair(s) at once through PostgreSQL "
                   f"({report.get('backend', '?')} lab, {report.get('run', '?')}); Jain's index "
                   + ("n/a" if fairness is None else f"{fairness:.3f}"), fontsize="medium")
    axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    figure.savefig(path)
    return True
