"""`lab bench`: its options, and the run that writes the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.backends.base import LabError
from lab.bench import bench_profile, bench_profiles, bench_runs
from lab.controller import BACKENDS, Lab, make_backend
from lab.failover import (
    MAX_KILLS,
    WINDOW,
    bench_failover,
    render_failover_markdown,
    write_failover_report,
)
from lab.live import BenchDisplay
from lab.output import err, progress
from lab.pairs import EXAMPLE, bench_pairs, chosen_pairs, pairs_argument
from lab.pairsreport import render_pairs_markdown, write_pairs_report
from lab.report import build_report, render_markdown, run_label, write_report
from lab.settingsargs import (
    QUEUE_TARGET_MS,
    add_lab_settings,
    requested_settings,
    requested_topology,
    routes_by_table,
)
from lab.standbycost import bench_primary_alone, standby_cost
from pgvpn.cliargs import output_dir, output_file, whole
from pgvpn.transports import PROFILES

MAX_BENCH_SECONDS = 3600
EPILOG = f"""\
examples:
  lab bench --duration 10                    # peer-a -> peer-b: tunnel, underlay, ceiling, RTT
  lab bench --profile all --duration 5       # every transport profile in turn
  lab bench --pairs peer-a:peer-b --duration 5
  lab bench --pairs {EXAMPLE}    # two pairs at once (a fleet of four)
  lab bench --all-pairs --out reports/fleet  # every agent, paired in topology order
  lab bench --failover --kills 10            # a replicated database (topology ha)
"""


class ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description as usual and keeps the examples' lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="iperf3 through the tunnel and over the underlay; writes a report",
        description="Measure the running lab (starting it first if needed): iperf3 "
        "from its first agent to its second (peer-a -> peer-b) over the tunnel, the same "
        "over the underlay (peer-a -> postgres host) for the tunnel's cost as a ratio, the "
        "database's ceiling (what it ingests "
        "with no tunnel: `pgvpn ceiling` from peer-a into a scratch table of the log's "
        "shape, made and dropped for the run), and ping RTT percentiles idle and under "
        "load. Writes report.json, "
        "report.md and throughput.png to --out and prints a summary. With several profiles "
        "(--profile all, or a comma-separated list) each runs in turn with the same iperf3 "
        "settings, the agents restarted with it. The packet log (pgvpn.packets) is never "
        "emptied: rows are counted as a before/after difference; only the blog profiles' "
        "own tables (pgvpn.blog_v1_packets, pgvpn.blog_v2_packets) are emptied before "
        "their run. With --pairs or --all-pairs, iperf3 runs on several disjoint pairs of "
        "agents at the same time instead, and the report gives each pair's rate, their sum "
        "and Jain's fairness index (underlay, ceiling and RTT are not measured then). On a "
        "replicated database (topology ha) one profile runs twice, with its synchronous "
        "standby and with the standby stopped, and the report gives the ratio; "
        "--failover measures failovers instead.",
        epilog=EPILOG, formatter_class=ExamplesFormatter)
    bench.add_argument("--duration", type=whole(1, MAX_BENCH_SECONDS), default=10,
                       metavar="SECONDS", help="whole seconds per iperf3 run, "
                       f"1-{MAX_BENCH_SECONDS} (default 10)")
    bench.add_argument("--out", type=output_dir, default=None, metavar="DIR",
                       help="report folder, made if missing (default reports/<timestamp>/)")
    bench.add_argument("--json", dest="json_path", type=output_file, default=None,
                       metavar="PATH|-",
                       help="also write the JSON report to PATH, or to stdout with '-'")
    bench.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                       help="backend to use if no lab is up yet")
    add_lab_settings(bench, several=True)
    pairs = bench.add_mutually_exclusive_group()
    pairs.add_argument("--pairs", type=pairs_argument, default=None,
                       metavar="CLIENT:SERVER[,CLIENT:SERVER...]",
                       help="iperf3 on these disjoint pairs of agents at the same time, from "
                       "each CLIENT to its SERVER's tunnel address, e.g. --pairs "
                       f"{EXAMPLE}; one profile only")
    pairs.add_argument("--failover", action="store_true",
                       help="a replicated database (lab up --topology ha): the primary killed "
                       f"(SIGKILL) during {WINDOW:g} s of iperf3 from the first agent to its "
                       "peer, and the old primary brought back before the next kill; reports "
                       "how long the tunnel carried nothing after each kill, and any row lost "
                       "or logged twice")
    pairs.add_argument("--all-pairs", action="store_true",
                       help="the same with every agent of the topology, paired in its order "
                       "(a:b, c:d, ...); with an odd number the last is left out, and the "
                       "report says so")


    bench.add_argument("--kills", type=whole(1, MAX_KILLS), default=1, metavar="N",
                       help=f"with --failover: how many times, 1-{MAX_KILLS} (default 1)")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.kills != 1 and not args.failover:
        raise LabError("--kills counts the primary's kills of --failover: give --failover")
    if args.failover:
        return failover_bench(args)
    in_pairs = args.pairs is not None or args.all_pairs
    profiles: list[str] = args.profile or []
    if in_pairs and (len(profiles) > 1 or "both" in (args.offload, args.queue_control)):
        raise LabError("--pairs and --all-pairs run one profile with one offload and queue "
                       "control setting: give at most one --profile, and --offload and "
                       "--queue-control on or off")
    if profiles and routes_by_table(requested_topology(args)):
        skipped = [p for p in profiles if not PROFILES[p].routes_by_table]
        profiles = [p for p in profiles if PROFILES[p].routes_by_table]
        if not profiles:
            raise LabError(f"profile {', '.join(skipped)} carries one fixed pair of peers, and "
                           "this topology routes by the owner's table: choose batched or "
                           "batched-jumbo")
        if skipped:
            progress(f"skipping {', '.join(skipped)}: one fixed pair of peers each, and this "
                     "topology routes by the owner's table")
    args.profile = profiles[0] if profiles else None  # the lab comes up with the first
    out = args.out or default_report_dir()
    settings = requested_settings(args)
    runs = bench_runs(profiles or [settings.profile],
                      args.offload or ("on" if settings.offload else "off"),
                      args.queue_control or ("on" if settings.queue_target_ms else "off"),
                      settings.queue_target_ms or QUEUE_TARGET_MS)
    settings = dataclasses.replace(settings, offload=runs[0].offload,
                                   queue_target_ms=runs[0].queue_target_ms)
    lab = Lab(make_backend(settings.backend, settings), settings)
    if in_pairs:  # checked against the topology this lab runs, before it starts
        pairs, left_out = chosen_pairs(args.pairs, lab.topology)
    lab.up(progress)  # a no-op on a healthy lab with these settings
    if in_pairs:
        pairs_report = bench_pairs(lab, pairs, args.duration, progress, left_out=left_out,
                                   raw_dir=out)
        write_pairs_report(pairs_report, out)
        emit(pairs_report, render_pairs_markdown(pairs_report), args.json_path, out)
        return failed(pairs_report["failed"], "pair")
    if len(runs) > 1:
        with BenchDisplay(err, [run_label(*run) for run in runs]) as display:
            results = bench_profiles(lab, runs, args.duration, display.progress,
                                     raw_dir=out, on_result=display.finished)
        progress(f"the lab stays up with profile {run_label(*runs[-1])}")
    else:
        results = [bench_profile(lab, args.duration, progress, raw_dir=out)]
        if lab.topology.replicated:  # what the synchronous standby costs, same run
            results[0]["standby"] = "sync"
            results.append(bench_primary_alone(lab, args.duration, progress,
                                               out / "standby-stopped", underlay=None))
    report = build_report(results)
    if lab.topology.replicated:
        report["standby_cost"] = standby_cost(results)
    write_report(report, out)
    emit(report, render_markdown(report), args.json_path, out)
    return failed(report["failed"], "profile")


def failover_bench(args: argparse.Namespace) -> int:
    """--failover: one profile, the replicated topology the lab runs (or is given)."""
    profiles: list[str] = args.profile or []
    if len(profiles) > 1 or "both" in (args.offload, args.queue_control):
        raise LabError("--failover runs one profile with one offload and queue control "
                       "setting: give --offload and --queue-control on or off")
    args.profile = profiles[0] if profiles else None
    out = args.out or default_report_dir()
    settings = requested_settings(args)
    lab = Lab(make_backend(settings.backend, settings), settings)
    if not lab.topology.replicated:
        raise LabError(f"--failover needs a replicated database; {lab.topology.path.name} has "
                       "one: lab up --topology ha (or give --topology ha here)")
    lab.up(progress)
    report = bench_failover(lab, args.kills, progress)
    write_failover_report(report, out)
    emit(report, render_failover_markdown(report), args.json_path, out)
    return failed(report["failed"], "check")


def emit(report: dict[str, Any], markdown: str, json_path: str | None, out: Path) -> None:
    """The JSON on stdout with --json - (the table then on stderr), else the table."""
    text = json.dumps(report, indent=2)
    if json_path == "-":
        print(text)
        sys.stderr.write(markdown)  # plain: no wrapping, no rich markup
    else:
        if json_path:
            Path(json_path).write_text(text + "\n")
        print(markdown)
    progress(f"report written to {out}/")


def failed(names: list[str], what: str) -> int:
    """Exit 1 naming the failed profiles or pairs (the report is written all the same)."""
    if names:
        err.print(f"[red]lab: failed {what}(s):[/] {', '.join(names)}")
        return 1
    return 0


def default_report_dir() -> Path:
    """reports/<timestamp>/ here, checked like a given --out before anything starts."""
    text = str(Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        return output_dir(text)
    except argparse.ArgumentTypeError as exc:
        raise LabError(f"the default report folder {exc}; give --out DIR") from None
