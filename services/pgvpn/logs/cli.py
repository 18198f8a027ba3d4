"""The log commands of `pgvpn`: log, stats, export, replay, prune, retention.

Each handler takes an open connection, so the lab runs the very same code with
the operator's connection (`lab packets`, `lab export`, `lab replay`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import psycopg

from pgvpn import db
from pgvpn.errors import PgvpnError
from pgvpn.logs import query as logquery
from pgvpn.logs import render as logrender
from pgvpn.logs import replica, retention
from pgvpn.logs import stats as logstats
from pgvpn.logs.args import FOREVER, validate
from pgvpn.logs.filter import LogFilter, filter_from_args
from pgvpn.logs.replay import Timed, read_input, replay
from pgvpn.timespec import (
    format_duration,
    parse_duration,
    parse_positive_duration,
)

Handler = Callable[[psycopg.Connection, argparse.Namespace], int]


# ------------------------------------------------------------------ handlers
def cmd_log(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    flt = filter_from_args(args)
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
    from pgvpn.logs.pcap import write_pcap

    flt = filter_from_args(args)
    rows = 0

    def packets() -> Iterator[tuple[datetime, bytes]]:
        nonlocal rows
        for row in logquery.select(conn, flt, with_data=True):
            rows += 1
            if args.super_packets:
                yield row.logged_at, row.data or b""
            else:
                for packet in row.on_the_wire():
                    yield row.logged_at, packet

    with open_output(args.pcap) as out:
        count, size = write_pcap(packets(), out)
    where = "stdout" if args.pcap == "-" else args.pcap
    shape = ("as logged, super-packets whole" if args.super_packets
             else "as they crossed the wire")
    print(f"exported {count} packets from {rows} rows ({logrender.human_bytes(size)}, {shape}) "
          f"to {where}: {flt.describe()}", file=sys.stderr)
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
        packets = [(p.logged_at, packet)
                   for p in logquery.select(conn, flt, with_data=True)
                   for packet in p.on_the_wire()]
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
        if args.keep.strip().lower() in FOREVER:
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


def run(args: argparse.Namespace) -> int:
    """Run one log command with its own connection; errors become one line."""
    validate(args)
    if args.command == "replay" and args.input:  # a file needs no database
        return guarded(lambda: cmd_replay(None, args))
    name = f"pgvpn {args.command}"

    def go() -> int:
        if args.replica:
            conn = replica.connect_standby(replica.replica_url(args), name)
        else:
            conn = db.connect(args.database_url, attempts=3, application_name=name)
        with conn:
            if args.replica:
                replica.report(conn, name)
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
        if replica.is_recovery_conflict(exc):
            raise PgvpnError(replica.CANCELLED) from None
        raise PgvpnError(db.explain(exc)) from None
