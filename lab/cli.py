"""The `lab` command: a thin layer over lab.controller; progress on stderr, data on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lab import benchcli, logtools, state
from lab.backends.base import SCRATCH_HOST, LabError
from lab.controller import BACKENDS, Lab, make_backend, running_topology, static_topology
from lab.matrix import ping_matrix, render
from lab.output import err, progress
from lab.settingsargs import add_lab_settings, requested_settings
from lab.topology import COMPOSE_FILE, Host, TopologyError
from pgvpn.cliargs import OneLineParser, one_line, whole
from pgvpn.errors import PgvpnError

MAX_LOG_LINES = 100_000
MAX_MATRIX_COUNT = 100

EPILOG = """\
typical session:
  lab check                      # what this host has and lacks
  lab up                         # Docker if an engine answers, else namespaces
  lab bench --duration 10        # iperf3 through the tunnel; report in reports/<time>/
  lab bench --profile all        # every transport profile in turn, side by side
  lab status                     # hosts, addresses, agent health, packets logged
  lab exec peer-a -- ping -c3 10.230.0.2
  lab down                       # removes everything the lab made, even after a crash
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lab", description="The pgvpn lab: a postgres host and peers that reach each "
        "other only through the database, as Docker containers or network namespaces. "
        "compose.yaml has two peers (peer-a, peer-b); topologies/fleet.yaml four, and a "
        "plain host behind one of them.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("check", help="diagnose this host: privileges, tools, engines")

    up = commands.add_parser("up", help="build and start the lab (idempotent)",
                             description="Build a topology (compose.yaml, or --topology "
                             "FILE) and start it. "
                             "A failed first 'up' is rolled back; 'up' on a healthy lab with "
                             "the same settings changes nothing. Each host must come up within "
                             "90 s (Docker) or 30 s (netns); PGVPN_START_TIMEOUT=SECONDS sets "
                             "another limit.")
    up.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                    help="auto (default): docker when an engine answers, else netns")
    add_lab_settings(up)

    down = commands.add_parser("down", help="remove everything the lab made")
    down.add_argument("--images", action="store_true",
                      help="also remove every image pgvpn built (agent, postgres, the local "
                      "base), except one another lab's container uses")

    status = commands.add_parser("status", help="hosts, addresses, agent health, log size")
    status.add_argument("--json", action="store_true", help="machine-readable, on stdout")

    exec_ = commands.add_parser("exec", help="run a command inside a lab host",
                                description="Run CMD inside HOST; its exit code is passed "
                                "through. Example: lab exec peer-a -- ip addr")
    exec_.add_argument("host", type=host_name(SCRATCH_HOST),
                       help=f"a host of the lab's topology (postgres, peer-a, ...), or "
                       f"{SCRATCH_HOST} (lab replay's scratch host)")
    exec_.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    logs = commands.add_parser("logs", help="a host's service log")
    logs.add_argument("host", nargs="?", type=host_name(), help="one host (default: all)")
    logs.add_argument("--tail", type=whole(1, MAX_LOG_LINES), default=50,
                      help=f"lines per host, 1-{MAX_LOG_LINES} (default 50)")

    restart = commands.add_parser("restart", help="restart a host's service")
    restart.add_argument("host", type=host_name())
    restart.add_argument("--kill", action="store_true",
                         help="SIGKILL it first (a crash, no clean shutdown)")
    stop = commands.add_parser("stop", help="stop a host's service (e.g. to inject a fault)")
    stop.add_argument("host", type=host_name())
    stop.add_argument("--kill", action="store_true",
                      help="SIGKILL (a crash, no clean shutdown) instead of a clean stop")
    start = commands.add_parser("start", help="start a host's service stopped by 'lab stop'")
    start.add_argument("host", type=host_name())

    failover = commands.add_parser(
        "failover", help="a planned switchover of a replicated database (Patroni)",
        description="Ask Patroni to hand the primary's role to a synchronous standby "
        "(lab up --topology ha), and wait until the new primary runs and the old one "
        "follows it as a synchronous standby again. The agents reconnect by themselves "
        "(their PGHOST lists every node). For an unplanned failover, crash the primary "
        "instead: lab stop --kill postgres-1.")
    failover.add_argument("--to", metavar="NODE", type=host_name(),
                          help="the node to promote (default: the synchronous standby)")
    matrix = commands.add_parser(
        "ping-matrix", help="every host pings every other one over the tunnel",
        description="Ping every agent's tunnel addresses (IPv4 and IPv6, from the topology "
        "file), and every plain host on a subnet an agent routes (e.g. site-host), from "
        "every other agent and plain host, through the tunnel (hosts that share a link are "
        "not paired), and print one matrix per family: received/sent and the average RTT. "
        "Exit 1 if any ping was lost.")
    matrix.add_argument("--count", type=whole(1, MAX_MATRIX_COUNT), default=3,
                        help=f"echoes per pair, 1-{MAX_MATRIX_COUNT} (default 3)")
    matrix.add_argument("--json", action="store_true", help="machine-readable, on stdout")
    benchcli.add_parser(commands)
    logtools.add_parsers(commands)  # packets, stats, export, replay
    return parser


def host_name(*extra: str) -> Callable[[str], str]:
    """An argparse type: a host of the lab's topology (or one of `extra`)."""
    def parse(text: str) -> str:
        try:
            hosts = [*static_topology().hosts, *extra]
        except TopologyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if text not in hosts:
            raise argparse.ArgumentTypeError(f"no host {text!r}; hosts: {', '.join(hosts)}")
        return text

    return parse


def cmd_up(args: argparse.Namespace) -> int:
    settings = requested_settings(args)
    lab = Lab(make_backend(settings.backend, settings), settings)
    lab.up(progress)
    progress(f"lab is up on the {settings.backend} backend ({lab.topology.path.name}, "
             f"mtu {lab.effective_mtu}, "
             f"profile {settings.profile}, offload {'on' if settings.offload else 'off'}, "
             + ("" if settings.routing == "peer" else "routing by table, ")
             + ("TLS verify-full)" if settings.tls else "agents WITHOUT TLS)"))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    settings = state.load_settings() or state.LabSettings("netns", 1500, "batched")
    removed_any = False
    for name in BACKENDS:  # after a crash the state file may be gone: try every backend
        try:
            try:
                backend = make_backend(name, settings, running_topology(settings))
            except TopologyError as exc:  # what is left is found by label or tag anyway
                progress(f"the lab's topology cannot be read ({exc}); removing what carries "
                         "the lab's name")
                backend = make_backend(name, dataclasses.replace(
                    settings, topology=str(COMPOSE_FILE)))
        except LabError as exc:
            progress(f"skipping the {name} backend: {exc}")
            continue
        if backend.available() is None and backend.exists():
            Lab(backend, settings).down(progress)
            removed_any = True
        if args.images and backend.available() is None:
            backend.remove_images(progress)
    state.remove_state()
    progress("lab is down" if removed_any else "nothing to remove: no lab was up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    report = Lab.current().status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    topology_name = Path(report.get("topology", "compose.yaml")).name
    table = Table(title=f"pgvpn lab ({report['backend']}, {topology_name}, "
                  f"mtu {report['mtu']}, profile {report['profile']}, "
                  + ("routing by table, " if report.get("routing") == "table" else "")
                  +
                  f"offload {'on' if report.get('offload', True) else 'off'}, "
                  f"{'TLS' if report.get('tls', True) else 'NO TLS'})")
    for column in ("host", "role", "running", "underlay", "tunnel", "detail"):
        table.add_column(column)
    for host in report["hosts"]:
        table.add_row(host["name"], host["role"], "yes" if host["running"] else "NO",
                      ", ".join(f"{k} {v}" for k, v in host["underlay"].items()),
                      ", ".join(host["tunnel"]),
                      ", ".join(filter(None, [host["detail"], metrics_summary(host)])))
    Console().print(table)
    log = report["log"]
    if "error" in log:
        print(f"packet log: unavailable ({log['error']})")
    else:
        print(f"packet log: {log['packets']} packets, {log['bytes'] / 1e6:.1f} MB"
              + (f" ({log['disk_bytes'] / 1e6:.1f} MB on disk in {log['partitions']} "
                 "partitions)" if "disk_bytes" in log else ""))
        if "span" in log:
            print(f"log span:   {log['span']}; retention {log['retention']}")
    return 0


def metrics_summary(host: dict[str, Any]) -> str:
    """An agent's packets each way and reconnects, from its metrics (lab status)."""
    metrics = host.get("metrics")
    if not metrics:
        return ""
    if "error" in metrics:
        return f"metrics: {metrics['error']}"
    count = {d: int(metrics.get(f'pgvpn_packets_total{{direction="{d}"}}', 0))
             for d in ("up", "down")}
    reconnects = sum(int(metrics.get(f'pgvpn_reconnects_total{{direction="{d}"}}', 0))
                     for d in ("up", "down"))
    return (f"sent {count['up']} / received {count['down']} packets, "
            f"{reconnects} reconnects")


def cmd_ping_matrix(args: argparse.Namespace) -> int:
    lab = Lab.current()
    cells = ping_matrix(lab, count=args.count, interval=0.2)
    lost = sum(cell.result.lost for cell in cells)
    if args.json:
        print(json.dumps({"matrix": [c.as_json() for c in cells], "lost": lost}, indent=2))
        return 1 if lost else 0
    for table in render(cells, args.count, list(lab.topology.hosts)):
        Console().print(table)
    if lost:
        err.print(f"[red]lab: {lost} of {sum(c.result.transmitted for c in cells)} echoes "
                  "lost[/]")
    return 1 if lost else 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("give a command after --, e.g. lab exec peer-a -- ip addr")
    result = Lab.current().backend.exec(args.host, argv, timeout=3600)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def cmd_logs(args: argparse.Namespace) -> int:
    lab = Lab.current()
    for host in [args.host] if args.host else list(lab.topology.hosts):
        print(f"==> {host} <==")
        print(lab.backend.logs(host, args.tail))
    return 0


def stop_host(lab: Lab, host: Host, kill: bool) -> None:
    """A clean stop, or with --kill a crash (SIGKILL, no clean shutdown)."""
    if kill:
        progress(f"killing {host.name} (SIGKILL)")
        lab.backend.kill(host)
    else:
        progress(f"stopping {host.name}")
        lab.backend.stop(host)


def cmd_restart(args: argparse.Namespace) -> int:
    lab = Lab.current()
    lab.backend.check_start_timeout()  # before the stop
    host = lab.topology.hosts[args.host]  # host_name checked it while parsing
    stop_host(lab, host, args.kill)
    lab.backend.start(host, progress)
    lab.wait_for_tunnel(progress)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    lab = Lab.current()
    stop_host(lab, lab.topology.hosts[args.host], args.kill)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """Start one host and wait for it alone: its peer may be stopped on purpose."""
    lab = Lab.current()
    lab.backend.check_start_timeout()
    lab.backend.start(lab.topology.hosts[args.host], progress)
    return 0


def cmd_failover(args: argparse.Namespace) -> int:
    lab = Lab.current()
    started = time.monotonic()
    old, new = lab.cluster().switchover(progress, args.to)
    print(f"{new} is the primary now, {old} its synchronous standby "
          f"({time.monotonic() - started:.1f} s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = state.LabSettings("auto", 1500, "batched")
    usable = 0
    for name in BACKENDS:
        problem = make_backend(name, settings).available()
        usable += problem is None
        err.print(f"{name:7s} backend: " + ("[green]ready[/]" if problem is None
                                            else f"[red]not available[/]: {problem}"))
    packages = {"iperf3": "iperf3", "ping": "iputils-ping", "ip": "iproute2",
                "openssl": "openssl"}
    for tool, package in packages.items():
        found = shutil.which(tool)
        err.print(f"{tool:7s}: " + (f"[green]{found}[/]" if found
                                    else f"[red]missing[/]: apt-get install {package}"))
    return 0 if usable else 1


COMMANDS = {"check": cmd_check, "up": cmd_up, "down": cmd_down, "status": cmd_status,
            "exec": cmd_exec, "logs": cmd_logs, "restart": cmd_restart, "bench": benchcli.cmd_bench,
            "stop": cmd_stop, "start": cmd_start, "ping-matrix": cmd_ping_matrix,
            "failover": cmd_failover,
            "packets": logtools.cmd_packets, "stats": logtools.cmd_stats,
            "export": logtools.cmd_export,
            "replay": logtools.cmd_replay}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    # OSError: the host refused something (a full disk, a file): a line, not a traceback
    except (LabError, TopologyError, PgvpnError, OSError) as exc:
        print(f"lab: error: {one_line(exc)}", file=sys.stderr)  # plain: rich would wrap it
        return 2
    except KeyboardInterrupt:
        err.print("lab: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
