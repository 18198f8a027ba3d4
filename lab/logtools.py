"""The packet log from the lab: `lab packets`, `lab stats`, `lab export`, `lab replay`.

The same code as `pgvpn log/stats/export/replay`, run with the operator's
connection (Lab.admin), so no peer's credentials are used or needed.

`lab replay` selects the slice here, copies it into the target host as JSON lines
and runs `pgvpn replay` there, in a TUN device of its own:
- into the scratch host `replay` (default; a host with no links at all): its TUN
  gets the tunnel addresses of the peer the packets were sent to, so its stack
  answers them as that peer would, and nothing it answers can leave the host;
- into a live peer (`--into peer-b`): no address is added (the peer has them on
  its agent's device already; a second copy would steal the tunnel's route), so
  the peer's own stack answers through the real tunnel, and the answers are
  logged like any traffic. Fine in a lab; think twice elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import ipaddress
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator

import psycopg

from lab.backends.base import SCRATCH_HOST, Backend
from lab.controller import Lab, static_topology
from lab.topology import TopologyError
from pgvpn.cliargs import OneLineParser
from pgvpn.logs import args as logargs
from pgvpn.logs import cli as logcli
from pgvpn.logs import replica
from pgvpn.logs.filter import add_filter_arguments
from pgvpn.logs.replay import DEFAULT_TUN, Timed, destination

RAW = argparse.RawDescriptionHelpFormatter
PACKETS_EPILOG = """\
examples:
  lab packets                               # the newest 20 packets of the lab's log
  lab packets -f --proto icmp               # follow pings as they cross
  lab packets --peer peer-a --since 1m --json
  lab packets --replica --since 5m -n 0     # read the lab's standby (lab up --topology ha)
"""
EXPORT_EPILOG = """\
examples:
  lab export --pcap lab.pcap --since 5m
  lab export --pcap - --proto tcp | tshark -r - -q -z conv,tcp
"""
REPLAY_EPILOG = """\
examples:
  lab exec peer-a -- ping -c3 10.230.0.2
  lab replay --sender peer-a --proto icmp --since 1m            # into the scratch host
  lab replay --sender peer-a --proto icmp --since 1m --into peer-b --speed 0

The scratch host 'replay' is a namespace with no links, made on first use and
removed by 'lab down'; watch it with: lab exec replay -- tshark -i any
"""


def add_parsers(commands: argparse._SubParsersAction[OneLineParser]) -> None:
    packets = commands.add_parser(
        "packets", help="the lab's logged packets, headers decoded (pgvpn log)",
        description="Show or follow the lab's packet log with the operator's rights; the "
        "options are those of 'pgvpn log'.", epilog=PACKETS_EPILOG, formatter_class=RAW)
    logargs.add_log_arguments(packets)
    logargs.add_replica_argument(packets, logargs.LAB_REPLICA_HELP)

    stats = commands.add_parser(
        "stats", help="per-flow totals and top talkers of the lab's log (pgvpn stats)",
        description="Totals over a window of the lab's log (default: the last hour).",
        epilog=logargs.STATS_EPILOG.replace("pgvpn stats", "lab stats"), formatter_class=RAW)
    logargs.add_stats_arguments(stats)
    logargs.add_replica_argument(stats, logargs.LAB_REPLICA_HELP)

    export = commands.add_parser(
        "export", help="the lab's log as a pcap file (pgvpn export)",
        description="Write the selected packets of the lab's log, with the times they were "
        "logged, as a pcap file, with the operator's rights.", epilog=EXPORT_EPILOG,
        formatter_class=RAW)
    logargs.add_export_arguments(export)
    logargs.add_replica_argument(export, logargs.LAB_REPLICA_HELP)

    replay = commands.add_parser(
        "replay", help="re-inject logged packets into the scratch host or a peer",
        description="Replay a slice of the lab's log into a TUN device of its own inside "
        "a lab host, at the logged pace or faster (pgvpn replay runs there).",
        epilog=REPLAY_EPILOG, formatter_class=RAW)
    add_filter_arguments(replay)
    replay.add_argument("--into", default=SCRATCH_HOST, metavar="HOST", type=replay_target,
                        help="replay (default): the scratch host, answering as the peer the "
                        "packets went to; or peer-a / peer-b: a live peer's own stack")
    logargs.add_replay_arguments(replay, in_lab=True)
    logargs.add_replica_argument(replay, logargs.LAB_REPLICA_HELP)


def replay_target(text: str) -> str:
    """An argparse type for --into: the scratch host or one of the topology's agents."""
    try:
        agents = [a.name for a in static_topology().agents]
    except TopologyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if text != SCRATCH_HOST and text not in agents:
        raise argparse.ArgumentTypeError(f"{text!r}: use {SCRATCH_HOST} (the scratch host) "
                                          f"or a peer ({', '.join(agents)})")
    return text


def standby_conninfo(backend: Backend) -> str:
    """The operator's connection to the lab's standby: admin_conninfo(replica=True) where
    the backend knows about standbys (the HA lab), else its one database asked for a
    standby, which then fails with the hosts tried (a lab without one has none)."""
    if "replica" in inspect.signature(backend.admin_conninfo).parameters:
        conninfo = backend.admin_conninfo(replica=True)
    else:
        conninfo = backend.admin_conninfo() + " target_session_attrs=standby"
    return replica.standby_conninfo(conninfo)  # standby whatever the backend chose


@contextlib.contextmanager
def reader(lab: Lab, args: argparse.Namespace, command: str) -> Iterator[psycopg.Connection]:
    """The operator's connection to the lab's primary, or with --replica its standby."""
    if not getattr(args, "replica", False):
        with lab.admin() as conn:
            yield conn
        return
    conn = replica.connect_standby(standby_conninfo(lab.backend), command)
    with conn:
        with logcli.database_errors():
            replica.report(conn, command)
        yield conn


def cmd_packets(args: argparse.Namespace) -> int:
    logargs.validate(args)
    with reader(Lab.current(), args, "lab packets") as conn:
        return logcli.guarded(lambda: logcli.cmd_log(conn, args))


def cmd_stats(args: argparse.Namespace) -> int:
    logargs.validate(args)
    with reader(Lab.current(), args, "lab stats") as conn:
        return logcli.guarded(lambda: logcli.cmd_stats(conn, args))


def cmd_export(args: argparse.Namespace) -> int:
    logargs.validate(args)
    with reader(Lab.current(), args, "lab export") as conn:
        return logcli.guarded(lambda: logcli.cmd_export(conn, args))


def scratch_addresses(lab: Lab, packets: list[Timed]) -> tuple[str | None, list[str]]:
    """The peer most of the packets were sent to, and its tunnel addresses with prefixes."""
    owners: dict[str, str] = {}
    for agent in lab.topology.agents:
        for key in ("TUN_IP", "TUN_IP6"):
            if agent.environment.get(key):
                owners[str(ipaddress.ip_interface(agent.environment[key]).ip)] = agent.name
    counts = Counter(owners.get(destination(data) or "") for _, data in packets)
    counts.pop(None, None)
    if not counts:
        return None, []
    peer = counts.most_common(1)[0][0]
    assert peer is not None
    host = lab.topology.hosts[peer]
    return peer, [host.environment[k] for k in ("TUN_IP", "TUN_IP6") if host.environment.get(k)]


def progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr)


def cmd_replay(args: argparse.Namespace) -> int:
    args.input = None
    logargs.validate(args)  # typos are reported before anything is selected or made
    lab = Lab.current()
    with reader(lab, args, "lab replay") as conn, logcli.database_errors():
        packets = logcli.selection_for_replay(conn, args)
    if args.into == SCRATCH_HOST:
        plays, addresses = scratch_addresses(lab, packets)
        where = (f"the scratch host, as {plays} ({', '.join(addresses)})" if plays
                 else "the scratch host (no lab peer's address among the destinations: "
                 "nothing will answer)")
    else:  # an agent: replay_target let nothing else through
        addresses, where = [], f"{args.into}, whose own stack answers through the tunnel"
    span = (max(t for t, _ in packets) - min(t for t, _ in packets)).total_seconds()
    if args.dry_run:
        progress(f"would replay {len(packets)} packets logged over {span:.2f}s into {where}")
        return 0
    host = lab.backend.ensure_scratch_host(progress) if args.into == SCRATCH_HOST else args.into
    progress(f"replaying {len(packets)} packets into {where}")
    lines = "".join(json.dumps({"logged_at": t.isoformat(), "data": d.hex()}) + "\n"
                    for t, d in packets)
    path = lab.backend.copy_in(host, f"replay-{os.getpid()}.jsonl", lines.encode())
    argv = [*lab.backend.pgvpn_command(), "replay", "--input", path, "--tun", DEFAULT_TUN,
            "--speed", str(args.speed), "--max", str(len(packets))]
    if args.max_gap:
        argv += ["--max-gap", args.max_gap]
    for address in addresses:
        argv += ["--address", address]
    pace = span / args.speed if args.speed > 0 else 0.0
    try:
        result = lab.backend.exec(host, argv, timeout=math.ceil(pace) + 60)
    finally:
        lab.backend.exec(host, ["rm", "-f", path], timeout=10)
    for line in (result.stdout + result.stderr).splitlines():
        progress(line.removeprefix("pgvpn: "))
    return result.returncode
