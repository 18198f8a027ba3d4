"""The log commands' arguments: their options, help, and the checks made while parsing.

Shared by `pgvpn` (log, stats, export, replay, prune, retention) and `lab` (packets,
stats, export, replay), so that an option means, and refuses, the same everywhere.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable
from datetime import timedelta

from pgvpn.cliargs import OneLineParser, checked, conninfo, input_file, number, output_file, whole
from pgvpn.config import interface_name
from pgvpn.errors import PgvpnError
from pgvpn.logs import stats as logstats
from pgvpn.logs.filter import add_filter_arguments, filter_from_args
from pgvpn.logs.replay import DEFAULT_TUN
from pgvpn.logs.replica import REPLICA_URL, refusal
from pgvpn.timespec import TimeSpecError, format_duration, parse_duration, parse_positive_duration

RAW = argparse.RawDescriptionHelpFormatter
MAX_LINES = 1_000_000_000  # -n: a LIMIT, not a buffer (0 streams every row instead)
MAX_SELECTION = 1_000_000  # --top, --max: rows held in memory
MAX_SPEED = 1_000_000.0
FOREVER = {"forever", "off", "none"}
# pgvpn.log_settings' CHECK constraints (sql/003), so that a typo is refused before
# connecting; and an upper bound on --ahead, since every step of it is a partition.
MIN_RETENTION, MIN_AHEAD, MAX_AHEAD = timedelta(minutes=1), timedelta(hours=2), timedelta(days=31)
MIN_STEP, MAX_STEP, DAY = timedelta(minutes=1), timedelta(days=31), timedelta(days=1)

LOG_EPILOG = """\
examples:
  pgvpn log                                 # the newest 20 packets
  pgvpn log -f --proto tcp --port 5201      # follow iperf3 traffic as it is logged
  pgvpn log --peer peer-a --since 10m -n 0  # everything peer-a sent or got in 10 min
  pgvpn log --host 10.230.0.2 --proto icmp --json | jq .icmp_type
  pgvpn log --since 2025-11-25T14:00 --until 2025-11-25T14:05 --json --data > slice.jsonl
  pgvpn log --replica --since 1h -n 0       # the last hour, read from a hot standby
"""
STATS_EPILOG = """\
examples:
  pgvpn stats                       # the 10 biggest flows of the last hour
  pgvpn stats --by host --top 5     # top talkers: bytes sent and received per address
  pgvpn stats --by peer --since 1d  # per peer pair, over a day
  pgvpn stats --proto udp --json    # JSON lines, one flow each
  pgvpn stats --replica --since 1d  # read a hot standby: the primary is not loaded
"""
EXPORT_EPILOG = """\
examples:
  pgvpn export --pcap last-hour.pcap --since 1h
  pgvpn export --pcap - --proto tcp --port 5201 | tshark -r - -q -z conv,tcp
  wireshark <(pgvpn export --pcap - --peer peer-b --since 5m)
  pgvpn export --replica --pcap day.pcap --since 1d   # from a hot standby
"""
REPLAY_EPILOG = """\
examples:
  # the echo requests peer-b received in the last 5 minutes, into a scratch TUN
  # whose address makes this host's stack answer them, at 10x the logged pace
  pgvpn replay --receiver peer-b --proto icmp --since 5m --address 10.230.0.2/24 --speed 10

  # a slice saved earlier (pgvpn export --pcap, or pgvpn log --json --data)
  pgvpn replay --input slice.pcap --speed 0 --dry-run

Replay creates its own TUN device (--tun, default pgvpn-replay) and needs
CAP_NET_ADMIN. It never writes into an agent's device. Give --address only where
no other interface has that address (a scratch host or namespace): a second copy
of a tunnel address would take the tunnel's route.
"""
PRUNE_EPILOG = """\
examples:
  pgvpn prune --older-than 7d --dry-run   # what would go
  pgvpn prune --older-than 12h            # drop partitions wholly older than 12 hours
  pgvpn prune                             # apply the retention policy (pgvpn retention)

Whole partitions are detached (CONCURRENTLY: agents keep writing) and dropped;
no row is deleted. The partition of the present and those ahead always stay, and
so does a partition holding a peer's newest packet (its numbering resumes there).
Runs as the database owner, the only role that drops partitions: to apply the
retention policy, run 'pgvpn prune' on a schedule (cron, a systemd timer), e.g.
  0 * * * *  DATABASE_URL=postgresql://pgvpn_owner@db/pgvpn pgvpn prune
"""
RETENTION_EPILOG = """\
examples:
  pgvpn retention                          # show the policy
  pgvpn retention --keep 7d                # keep a week; 'pgvpn prune' drops the rest
  pgvpn retention --keep forever
  pgvpn retention --partition-step 1h --ahead 1d   # hourly partitions, one day ahead

The policy lives in the database (pgvpn.log_settings), set once, as the owner.
'pgvpn prune' (the owner, on a schedule: see 'pgvpn prune --help') applies it;
agents only keep partitions ahead. No peer may drop a partition: dropping one
locks the whole log, and a peer could hold that lock and stop the tunnel.
Partition size bounds retention's precision: with daily partitions, --keep 12h
drops a day only once all of it is 12h old.
"""


class _Typed(argparse.Action):
    """Stores the value and notes that it was typed: a --database-url on the command
    line outranks $PGVPN_REPLICA_URL for --replica (replica.replica_url)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.database_url_given = True


def add_database_argument(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                        type=conninfo, action=_Typed,
                        help=f"{who} connection string (default $DATABASE_URL or PG* vars)")


REPLICA_HELP = (
    "read from a hot standby, not the primary: connect with target_session_attrs=standby "
    f"to ${REPLICA_URL} if set, else to the database URL (one that lists every node finds "
    "the standby among them); fail if no standby answers. One line on stderr names the "
    "standby read and how far behind it is. A long read there can be cancelled when the "
    "primary's 'pgvpn prune' drops a partition it reads (after the standby's "
    "max_standby_streaming_delay)")
LAB_REPLICA_HELP = (
    "read from the lab's hot standby, not its primary (the operator's connection with "
    "target_session_attrs=standby); fail if no standby answers. One line on stderr names "
    "the standby read and how far behind it is")


def add_replica_argument(parser: argparse.ArgumentParser, text: str = REPLICA_HELP) -> None:
    parser.add_argument("--replica", action="store_true", help=text)


def add_refused_replica(parser: argparse.ArgumentParser) -> None:
    """--replica on a command that writes: accepted by the parser so that validate()
    can say why it is refused, rather than 'unrecognized arguments'."""
    parser.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    parser.add_argument("-n", "--lines", type=whole(0, MAX_LINES), default=20, metavar="N",
                        help="show the newest N packets (default 20; 0 = every packet "
                        f"selected, oldest first; at most {MAX_LINES})")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing packets as they are logged (Ctrl-C stops)")
    add_output_arguments(parser)
    parser.add_argument("--data", action="store_true",
                        help="with --json: include each packet's bytes as hex (replayable)")


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    parser.add_argument("--by", choices=logstats.GROUPINGS, default="flow",
                        help="flow (default): src, dst, protocol, ports; host: top talkers "
                        "by address; peer: sender and receiver")
    parser.add_argument("--top", type=whole(1, MAX_SELECTION), default=10, metavar="N",
                        help=f"the N biggest by bytes, 1-{MAX_SELECTION} (default 10)")
    add_output_arguments(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pcap", required=True, metavar="FILE|-", type=output_file,
                        help="write a pcap file (raw IP, logged timestamps); '-' = stdout")
    parser.add_argument("--super-packets", action="store_true",
                        help="write each row as logged: a TCP super-packet from an "
                        "offloading TUN stays one frame larger than the MTU, with a partial "
                        "checksum, as tcpdump shows it on an offloading NIC (default: the "
                        "packets as they crossed the wire, segmented at the MSS with their "
                        "lengths, IPv4 ids and checksums)")
    add_filter_arguments(parser)


def add_parsers(commands: argparse._SubParsersAction[OneLineParser]) -> None:
    """Add the log commands to the `pgvpn` command line."""
    log = commands.add_parser(
        "log", help="show or follow logged packets, headers decoded",
        description="Show the newest logged packets, or follow them as they are logged, "
        "with their IP headers decoded: a table, or JSON lines with --json.",
        epilog=LOG_EPILOG, formatter_class=RAW)
    add_log_arguments(log)
    add_database_argument(log, "a reader's")
    add_replica_argument(log)

    stats = commands.add_parser(
        "stats", help="bytes and packets per flow, top talkers, per peer",
        description="Totals over a window of the log (default: the last hour), biggest "
        "first.", epilog=STATS_EPILOG, formatter_class=RAW)
    add_stats_arguments(stats)
    add_database_argument(stats, "a reader's")
    add_replica_argument(stats)

    export = commands.add_parser(
        "export", help="write selected packets as a pcap file for tshark/Wireshark",
        description="Write the selected packets, oldest first, with the times they were "
        "logged, as a pcap file (link type raw IP).", epilog=EXPORT_EPILOG,
        formatter_class=RAW)
    add_export_arguments(export)
    add_database_argument(export, "the operator's")
    add_replica_argument(export)

    rep = commands.add_parser(
        "replay", help="re-inject logged packets into a new TUN device",
        description="Write a slice of the log (or of a pcap / JSON-lines file) into a TUN "
        "device of its own, at the logged pace or faster; report what the stack answered.",
        epilog=REPLAY_EPILOG, formatter_class=RAW)
    add_filter_arguments(rep)
    add_replay_arguments(rep)
    add_database_argument(rep, "the operator's")
    add_replica_argument(rep)

    prune = commands.add_parser(
        "prune", help="drop whole partitions older than a duration (as the owner)",
        description="Drop the packet log's partitions that lie wholly before now minus "
        "--older-than (default: the retention policy).", epilog=PRUNE_EPILOG,
        formatter_class=RAW)
    prune.add_argument("--older-than", metavar="DURATION", type=duration_check(),
                       help="e.g. 7d, 12h, 30m (default: the retention policy)")
    prune.add_argument("--dry-run", action="store_true", help="list, drop nothing")
    add_database_argument(prune, "the owner's")
    add_refused_replica(prune)

    keep = commands.add_parser(
        "retention", help="show or set the retention policy and partition size",
        description="Show or set how long the log is kept and how it is partitioned.",
        epilog=RETENTION_EPILOG, formatter_class=RAW)
    keep.add_argument("--keep", metavar="DURATION|forever", type=keep_check,
                      help="drop partitions older than this, at least 1m (applied by "
                      "'pgvpn prune')")
    keep.add_argument("--partition-step", metavar="DURATION", type=step_check,
                      help="time one new partition covers: 1d (default), 1h, 15m, ...: a "
                      "divisor of a day, or whole days up to 31d")
    keep.add_argument("--ahead", metavar="DURATION", type=duration_check(MIN_AHEAD, MAX_AHEAD),
                      help="how far ahead partitions exist (default 3d; 2h-31d)")
    add_database_argument(keep, "the owner's (to change it)")
    add_replica_argument(keep, "show the policy as a hot standby has it (refused with the "
                         "options that change it: they write)")


def add_replay_arguments(parser: argparse.ArgumentParser, *, in_lab: bool = False) -> None:
    group = parser.add_argument_group("replay")
    if not in_lab:
        group.add_argument("--input", metavar="FILE|-", type=input_file,
                           help="replay this pcap or JSON-lines file instead of the log")
        group.add_argument("--tun", default=DEFAULT_TUN, metavar="NAME",
                           type=checked(interface_name),
                           help=f"the TUN device to create (default {DEFAULT_TUN})")
        group.add_argument("--address", action="append", default=[], type=_interface,
                           metavar="ADDR/N", help="give the TUN this address (repeatable)")
    group.add_argument("--speed", type=number(0, MAX_SPEED), default=1.0, metavar="X",
                       help="X times the logged pace (default 1; 0 = as fast as possible; "
                       f"at most {MAX_SPEED:g})")
    group.add_argument("--max-gap", default=None, metavar="DURATION", type=duration_check(),
                       help="shorten logged pauses longer than this, e.g. 1s")
    group.add_argument("--max", type=whole(1, MAX_SELECTION), default=10_000, metavar="N",
                       help="refuse a selection of more than N packets (default 10000, "
                       f"at most {MAX_SELECTION})")
    group.add_argument("--dry-run", action="store_true",
                       help="say what would be replayed, create nothing")


def validate(args: argparse.Namespace) -> None:
    """Check what no single option can before connecting: bad input, not the database,
    should be what a typo reports (each option's own value is checked while parsing)."""
    if hasattr(args, "since"):
        filter_from_args(args)  # e.g. --since after --until
    if getattr(args, "follow", False) and args.until:
        raise PgvpnError("--follow shows packets as they come: it cannot have --until")
    if getattr(args, "data", False) and not args.json:
        raise PgvpnError("--data needs --json (a table has no room for packet bytes)")
    refused = refusal(args)
    if refused:
        raise PgvpnError(refused)
    step, ahead = getattr(args, "partition_step", None), getattr(args, "ahead", None)
    if step and ahead and parse_duration(ahead) < parse_duration(step):
        raise PgvpnError(f"--ahead {ahead} is shorter than --partition-step {step}")


def duration_check(low: timedelta = timedelta(0), high: timedelta | None = None
                   ) -> Callable[[str], str]:
    """An argparse type: a duration longer than zero, within bounds; kept as typed."""
    def check(text: str) -> str:
        try:
            duration = parse_positive_duration(text)
        except TimeSpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if duration < low or (high is not None and duration > high):
            bounds = format_duration(low) + (f"-{format_duration(high)}" if high else " or more")
            raise argparse.ArgumentTypeError(f"{text!r}: must be {bounds}")
        return text

    return check


def keep_check(text: str) -> str:
    """--keep: forever (off, none) or at least a minute."""
    return text if text.strip().lower() in FOREVER else duration_check(MIN_RETENTION)(text)


def step_check(text: str) -> str:
    """--partition-step: partitions must line up with days (sql/003's CHECK)."""
    duration_check(MIN_STEP, MAX_STEP)(text)
    seconds = parse_duration(text).total_seconds()
    if seconds != int(seconds) or (DAY.total_seconds() % seconds and seconds % DAY.total_seconds()):
        raise argparse.ArgumentTypeError(f"{text!r}: use a divisor of a day (1h, 15m, 5m "
                                          "...) or whole days")
    return text


def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give a prefix length, e.g. 10.230.0.2/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address with a prefix") from None
