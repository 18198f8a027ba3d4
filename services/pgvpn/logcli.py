"""The log commands of `pgvpn`: log, stats, export, replay, prune, retention.

Each handler takes an open connection, so the lab runs the very same code with
the operator's connection (`lab packets`, `lab export`, `lab replay`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import psycopg

from pgvpn import db, logquery, logrender, logstats, retention
from pgvpn.errors import PgvpnError
from pgvpn.logfilter import LogFilter, add_filter_arguments, filter_from_args
from pgvpn.replay import DEFAULT_TUN, Timed, read_input, replay
from pgvpn.timespec import format_duration, parse_duration, parse_positive_duration

Handler = Callable[[psycopg.Connection, argparse.Namespace], int]
RAW = argparse.RawDescriptionHelpFormatter

LOG_EPILOG = """\
examples:
  pgvpn log                                 # the newest 20 packets
  pgvpn log -f --proto tcp --port 5201      # follow iperf3 traffic as it is logged
  pgvpn log --peer peer-a --since 10m -n 0  # everything peer-a sent or got in 10 min
  pgvpn log --host 10.230.0.2 --proto icmp --json | jq .icmp_type
  pgvpn log --since 2025-11-25T14:00 --until 2025-11-25T14:05 --json --data > slice.jsonl
"""
STATS_EPILOG = """\
examples:
  pgvpn stats                       # the 10 biggest flows of the last hour
  pgvpn stats --by host --top 5     # top talkers: bytes sent and received per address
  pgvpn stats --by peer --since 1d  # per peer pair, over a day
  pgvpn stats --proto udp --json    # JSON lines, one flow each
"""
EXPORT_EPILOG = """\
examples:
  pgvpn export --pcap last-hour.pcap --since 1h
  pgvpn export --pcap - --proto tcp --port 5201 | tshark -r - -q -z conv,tcp
  wireshark <(pgvpn export --pcap - --peer peer-b --since 5m)
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
  pgvpn prune                             # apply the retention policy now

Whole partitions are detached (CONCURRENTLY: agents keep writing) and dropped;
no row is deleted. The partition of the present and those ahead always stay, and
so does a partition holding a peer's newest packet (its numbering resumes there).
Runs as the database owner.
"""
RETENTION_EPILOG = """\
examples:
  pgvpn retention                          # show the policy
  pgvpn retention --keep 7d                # keep a week; agents drop older partitions hourly
  pgvpn retention --keep forever
  pgvpn retention --partition-step 1h --ahead 1d   # hourly partitions, one day ahead

The policy lives in the database (pgvpn.log_settings), so it is set once, as the
owner, and every agent applies it in its hourly maintenance, as it already keeps
partitions ahead: no cron job to remember. 'pgvpn prune' applies it on demand.
Partition size bounds retention's precision: with daily partitions, --keep 12h
drops a day only once all of it is 12h old.
"""


def add_database_argument(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                        help=f"{who} connection string (default $DATABASE_URL or PG* vars)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    parser.add_argument("-n", "--lines", type=_count, default=20, metavar="N",
                        help="show the newest N packets (default 20; 0 = every packet "
                        "selected, oldest first)")
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
    parser.add_argument("--top", type=_count, default=10, metavar="N",
                        help="the N biggest by bytes (default 10)")
    add_output_arguments(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pcap", required=True, metavar="FILE|-",
                        help="write a pcap file (raw IP, logged timestamps); '-' = stdout")
    add_filter_arguments(parser)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the log commands to the `pgvpn` command line."""
    log = commands.add_parser(
        "log", help="show or follow logged packets, headers decoded",
        description="Show the newest logged packets, or follow them as they are logged, "
        "with their IP headers decoded: a table, or JSON lines with --json.",
        epilog=LOG_EPILOG, formatter_class=RAW)
    add_log_arguments(log)
    add_database_argument(log, "a reader's")

    stats = commands.add_parser(
        "stats", help="bytes and packets per flow, top talkers, per peer",
        description="Totals over a window of the log (default: the last hour), biggest "
        "first.", epilog=STATS_EPILOG, formatter_class=RAW)
    add_stats_arguments(stats)
    add_database_argument(stats, "a reader's")

    export = commands.add_parser(
        "export", help="write selected packets as a pcap file for tshark/Wireshark",
        description="Write the selected packets, oldest first, with the times they were "
        "logged, as a pcap file (link type raw IP).", epilog=EXPORT_EPILOG,
        formatter_class=RAW)
    add_export_arguments(export)
    add_database_argument(export, "the operator's")

    rep = commands.add_parser(
        "replay", help="re-inject logged packets into a new TUN device",
        description="Write a slice of the log (or of a pcap / JSON-lines file) into a TUN "
        "device of its own, at the logged pace or faster; report what the stack answered.",
        epilog=REPLAY_EPILOG, formatter_class=RAW)
    add_filter_arguments(rep)
    add_replay_arguments(rep)
    add_database_argument(rep, "the operator's")

    prune = commands.add_parser(
        "prune", help="drop whole partitions older than a duration (as the owner)",
        description="Drop the packet log's partitions that lie wholly before now minus "
        "--older-than (default: the retention policy).", epilog=PRUNE_EPILOG,
        formatter_class=RAW)
    prune.add_argument("--older-than", metavar="DURATION",
                       help="e.g. 7d, 12h, 30m (default: the retention policy)")
    prune.add_argument("--dry-run", action="store_true", help="list, drop nothing")
    add_database_argument(prune, "the owner's")

    keep = commands.add_parser(
        "retention", help="show or set the retention policy and partition size",
        description="Show or set how long the log is kept and how it is partitioned.",
        epilog=RETENTION_EPILOG, formatter_class=RAW)
    keep.add_argument("--keep", metavar="DURATION|forever",
                      help="drop partitions older than this (agents apply it hourly)")
    keep.add_argument("--partition-step", metavar="DURATION",
                      help="time one new partition covers: 1d (default), 1h, 15m, ...")
    keep.add_argument("--ahead", metavar="DURATION",
                      help="how far ahead partitions exist (default 3d, at least 2h)")
    add_database_argument(keep, "the owner's (to change it)")


def add_replay_arguments(parser: argparse.ArgumentParser, *, in_lab: bool = False) -> None:
    group = parser.add_argument_group("replay")
    if not in_lab:
        group.add_argument("--input", metavar="FILE|-",
                           help="replay this pcap or JSON-lines file instead of the log")
        group.add_argument("--tun", default=DEFAULT_TUN, metavar="NAME",
                           help=f"the TUN device to create (default {DEFAULT_TUN})")
        group.add_argument("--address", action="append", default=[], type=_interface,
                           metavar="ADDR/N", help="give the TUN this address (repeatable)")
    group.add_argument("--speed", type=_speed, default=1.0, metavar="X",
                       help="X times the logged pace (default 1; 0 = as fast as possible)")
    group.add_argument("--max-gap", default=None, metavar="DURATION",
                       help="shorten logged pauses longer than this, e.g. 1s")
    group.add_argument("--max", type=_count, default=10_000, metavar="N",
                       help="refuse a selection of more than N packets (default 10000)")
    group.add_argument("--dry-run", action="store_true",
                       help="say what would be replayed, create nothing")


# ------------------------------------------------------------------ handlers
def cmd_log(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    flt = filter_from_args(args)
    if args.follow and args.until:
        raise PgvpnError("--follow shows packets as they come: it cannot have --until")
    if args.data and not args.json:
        raise PgvpnError("--data needs --json (a table has no room for packet bytes)")
    after = logquery.heads(conn) if args.follow else {}
    if args.lines == 0 and not args.follow:
        packets: Iterator[logquery.LoggedPacket] | list[logquery.LoggedPacket] = (
            logquery.select(conn, flt, with_data=args.data))
    elif args.lines == 0:
        packets = []
    else:
        packets = logquery.latest(conn, flt, args.lines, with_data=args.data)
        # rows logged between the two queries are the follower's to print
        packets = [p for p in packets if not after or p.seq <= after.get(p.sender, 0)]
    if args.json:
        logrender.print_json_lines(p.as_json() for p in packets)
    elif args.follow:
        for p in packets:
            print(logrender.packet_line(p), flush=True)
    else:
        rows = list(packets)
        logrender.packet_table(rows, f"pgvpn log: {flt.describe()}").print()
    if args.follow:
        for p in logquery.follow(conn, flt, after, with_data=args.data):
            if args.json:
                logrender.print_json_lines([p.as_json()])
            else:
                print(logrender.packet_line(p), flush=True)
    return 0


def stats_window(args: argparse.Namespace) -> LogFilter:
    """The filter, with the last hour as the window when none was given."""
    flt = filter_from_args(args)
    if flt.since is None and flt.until is None:
        flt = dataclasses.replace(flt, since=datetime.now(UTC) - timedelta(hours=1))
    return flt


def cmd_stats(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    flt = stats_window(args)
    rows = logstats.aggregate(conn, flt, args.by, args.top)
    if args.json:
        logrender.print_json_lines(row.as_json() for row in rows)
        return 0
    names = {"flow": "top flows", "host": "top talkers", "peer": "per peer"}
    total = logstats.totals(conn, flt)
    logrender.stats_table(rows, args.by, f"pgvpn stats, {names[args.by]}: {flt.describe()}",
                          total).print()
    return 0


@contextlib.contextmanager
def open_output(target: str) -> Iterator[BinaryIO]:
    if target == "-":
        if sys.stdout.isatty():
            raise PgvpnError("refusing to write a pcap to a terminal: redirect it "
                             "(> file.pcap) or pipe it (| tshark -r -)")
        yield sys.stdout.buffer
        return
    try:  # opened apart from the `with`, so that only opening errors are reported so
        handle = Path(target).open("wb")  # noqa: SIM115
    except OSError as exc:
        raise PgvpnError(f"cannot write {target}: {exc.strerror}") from None
    with handle:
        yield handle


@contextlib.contextmanager
def open_input(source: str) -> Iterator[BinaryIO]:
    if source == "-":
        yield sys.stdin.buffer
        return
    try:
        handle = Path(source).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise PgvpnError(f"cannot read {source}: {exc.strerror}") from None
    with handle:
        yield handle


def cmd_export(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    from pgvpn.pcap import write_pcap

    flt = filter_from_args(args)
    with open_output(args.pcap) as out:
        packets = logquery.select(conn, flt, with_data=True)
        count, size = write_pcap(((p.logged_at, p.data or b"") for p in packets), out)
    where = "stdout" if args.pcap == "-" else args.pcap
    print(f"exported {count} packets ({logrender.human_bytes(size)}) to {where}: "
          f"{flt.describe()}", file=sys.stderr)
    return 0


def selection_for_replay(conn: psycopg.Connection | None, args: argparse.Namespace
                         ) -> list[Timed]:
    """The packets to replay: from --input, else from the log with the filters."""
    flt = filter_from_args(args)
    if getattr(args, "input", None):
        if flt != LogFilter():
            raise PgvpnError("selection options choose rows of the log; with --input the "
                             "file is the selection")
        with open_input(args.input) as stream:
            packets = []
            for item in read_input(stream):
                packets.append(item)
                if len(packets) > args.max:
                    break
    else:
        if flt == LogFilter():
            raise PgvpnError("choose a slice to replay (e.g. --since 5m --proto icmp): "
                             "replaying the whole log is never what you want")
        assert conn is not None
        selected = logquery.count(conn, flt)
        if selected > args.max:
            raise PgvpnError(f"the selection has {selected} packets, more than --max "
                             f"{args.max}: narrow it or raise --max")
        packets = [(p.logged_at, p.data or b"")
                   for p in logquery.select(conn, flt, with_data=True)]
    if len(packets) > args.max:
        raise PgvpnError(f"the input has more than --max {args.max} packets: "
                         "raise --max to replay it")
    if not packets:
        raise PgvpnError("nothing to replay: no packet matches")
    return packets


def cmd_replay(conn: psycopg.Connection | None, args: argparse.Namespace) -> int:
    packets = selection_for_replay(conn, args)
    span = max(t for t, _ in packets) - min(t for t, _ in packets)
    if args.dry_run:
        pace = "as fast as possible" if args.speed <= 0 else f"at {args.speed:g}x"
        print(f"would replay {len(packets)} packets logged over {format_duration(span)} "
              f"into a new TUN {args.tun} {pace}", file=sys.stderr)
        return 0
    max_gap = parse_duration(args.max_gap).total_seconds() if args.max_gap else None
    result = replay(packets, tun_name=args.tun, addresses=args.address, speed=args.speed,
                    max_gap=max_gap,
                    progress=lambda text: print(text, file=sys.stderr))
    skipped = f", skipped {result.skipped} that were not IP packets" if result.skipped else ""
    answers = (f"the stack answered with {result.answered} packet(s) through {args.tun}"
               if args.address else f"{args.tun} has no address: answers, if any, left by "
               "this host's own routes")
    print(f"replayed {result.sent} packets into {args.tun} in {result.seconds:.2f}s "
          f"(logged over {result.logged_span:.2f}s){skipped}; {answers}", file=sys.stderr)
    return 0


def cmd_prune(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    older_than = parse_positive_duration(args.older_than) if args.older_than else None
    report = retention.prune(conn, older_than, dry_run=args.dry_run,
                             progress=lambda text: print(text, file=sys.stderr))
    for line in logrender.prune_lines(report):
        print(line)
    return 0


def cmd_retention(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    keep: timedelta | None = None
    forever = False
    if args.keep is not None:
        if args.keep.strip().lower() in {"forever", "off", "none"}:
            forever = True
        else:
            keep = parse_positive_duration(args.keep)
    step = parse_positive_duration(args.partition_step) if args.partition_step else None
    ahead = parse_positive_duration(args.ahead) if args.ahead else None
    settings = retention.update_settings(conn, partition_step=step, partitions_ahead=ahead,
                                         retention=keep, keep_forever=forever)
    for line in logrender.settings_lines(settings):
        print(line)
    return 0


HANDLERS: dict[str, Handler] = {"log": cmd_log, "stats": cmd_stats, "export": cmd_export,
                                "replay": cmd_replay, "prune": cmd_prune,
                                "retention": cmd_retention}


def validate(args: argparse.Namespace) -> None:
    """Check every option that can be wrong before connecting: bad input, not the
    database, should be what a typo reports."""
    if hasattr(args, "since"):
        filter_from_args(args)
    for name in ("older_than", "partition_step", "ahead", "max_gap"):
        if getattr(args, name, None):
            parse_duration(getattr(args, name))
    keep = getattr(args, "keep", None)
    if keep and keep.strip().lower() not in {"forever", "off", "none"}:
        parse_positive_duration(keep)


def run(args: argparse.Namespace) -> int:
    """Run one log command with its own connection; errors become one line."""
    validate(args)
    if args.command == "replay" and args.input:  # a file needs no database
        return guarded(lambda: cmd_replay(None, args))
    name = f"pgvpn {args.command}"

    def go() -> int:
        with db.connect(args.database_url, attempts=3, application_name=name) as conn:
            return HANDLERS[args.command](conn, args)

    return guarded(go)


def guarded(action: Callable[[], int]) -> int:
    """Database errors as one line; a closed pipe (| head) is a normal end."""
    try:
        with database_errors():
            return action()
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turn what the server says into one PgvpnError line with what to do about it."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        raise PgvpnError(f"{exc.diag.message_primary}: the schema predates the log tools; "
                         "run 'pgvpn db migrate' as the owner") from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PgvpnError(f"{exc.diag.message_primary}: use the owner, or a role that is a "
                         "member of pgvpn_reader") from None
    except psycopg.Error as exc:
        raise PgvpnError(db.explain(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _speed(text: str) -> float:
    try:
        speed = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if speed < 0:
        raise argparse.ArgumentTypeError("must be 0 (no waiting) or more")
    return speed


def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give a prefix length, e.g. 10.230.0.2/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address with a prefix") from None
