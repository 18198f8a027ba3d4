"""How the log commands print: tables for people (rich when installed), JSON lines for tools.

Tables go to stdout like the data they show; the JSON forms carry the same
fields, one object per line, so `jq` and pandas can read them as a stream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

from pgvpn.logs.query import LoggedPacket
from pgvpn.logs.retention import LogSettings, PruneReport
from pgvpn.logs.stats import Aggregate
from pgvpn.timespec import format_duration

ICMP_TYPES = {(4, 0): "echo reply", (4, 3): "unreachable", (4, 8): "echo request",
              (4, 11): "time exceeded", (6, 1): "unreachable", (6, 3): "time exceeded",
              (6, 128): "echo request", (6, 129): "echo reply", (6, 133): "router solicit",
              (6, 134): "router advert", (6, 135): "neighbor solicit",
              (6, 136): "neighbor advert", (6, 143): "mld report"}


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_rate(bits_per_second: float | None) -> str:
    if bits_per_second is None:
        return "-"
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits_per_second < 1000 or unit == "Gbit/s":
            return f"{bits_per_second:.1f} {unit}"
        bits_per_second /= 1000
    raise AssertionError("unreachable")


def endpoint(address: str | None, port: int | None) -> str:
    if address is None:
        return "-"
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


UNREACHABLE = {(4, 0): "net", (4, 1): "host", (4, 3): "port", (4, 4): "frag needed",
               (4, 13): "prohibited", (6, 0): "no route", (6, 1): "prohibited",
               (6, 3): "address", (6, 4): "port"}


def info(packet: LoggedPacket) -> str:
    """What a person wants to know at a glance: TCP flags, the ICMP message."""
    if packet.tcp_flags:
        flags = ",".join(packet.tcp_flags)
        if packet.wire_packets > 1:  # a super-packet from an offloading TUN
            return f"{flags} ({packet.wire_packets} on the wire)"
        return flags
    if packet.icmp_type is not None:
        version = packet.ip_version or 4
        name = ICMP_TYPES.get((version, packet.icmp_type))
        if name == "unreachable":
            reason = UNREACHABLE.get((version, packet.icmp_code or 0))
            return f"{reason} unreachable" if reason else f"unreachable code {packet.icmp_code}"
        return name or f"type {packet.icmp_type} code {packet.icmp_code}"
    return ""


def local_time(moment: datetime, with_date: bool = True) -> str:
    text = moment.astimezone().isoformat(sep=" ", timespec="milliseconds")
    text = text[:23]  # drop the offset: the table's caption names the zone
    return text if with_date else text[11:]


class Table:
    """A rich table when rich is installed, else aligned plain text."""

    def __init__(self, title: str, columns: Sequence[str], right: Sequence[str] = ()) -> None:
        self.title, self.columns, self.right = title, list(columns), set(right)
        self.rows: list[list[str]] = []
        self.caption = ""

    def add(self, *cells: object) -> None:
        self.rows.append(["" if c is None else str(c) for c in cells])

    def print(self, out: TextIO | None = None) -> None:
        out = out or sys.stdout
        try:
            from rich import box
            from rich.console import Console
            from rich.table import Table as RichTable
        except ImportError:
            self._print_plain(out)
            return
        table = RichTable(title=self.title, caption=self.caption or None, box=box.SIMPLE_HEAD,
                          caption_justify="left", title_justify="left")
        for column in self.columns:
            table.add_column(column, justify="right" if column in self.right else "left",
                             no_wrap=True)
        for row in self.rows:
            table.add_row(*row)
        # A terminal gets its own width; a pipe or file gets whole lines, never wrapped.
        width = None if out.isatty() else 240
        Console(file=out, highlight=False, width=width).print(table)

    def _print_plain(self, out: TextIO) -> None:
        widths = [max([len(c)] + [len(r[i]) for r in self.rows])
                  for i, c in enumerate(self.columns)]
        print(self.title, file=out)
        for row in [self.columns, *self.rows]:
            cells = [cell.rjust(w) if col in self.right else cell.ljust(w)
                     for cell, w, col in zip(row, widths, self.columns, strict=True)]
            print("  ".join(cells).rstrip(), file=out)
        if self.caption:
            print(self.caption, file=out)


def print_json_lines(documents: Iterable[dict[str, Any]], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    count = 0
    for document in documents:
        out.write(json.dumps(document, default=str) + "\n")
        out.flush()
        count += 1
    return count


def packet_table(packets: Sequence[LoggedPacket], title: str) -> Table:
    days = {p.logged_at.astimezone().date() for p in packets}
    table = Table(title, ["time", "id", "peers", "proto", "source", "destination", "info",
                          "bytes"], right=["id", "bytes"])
    for p in packets:
        table.add(local_time(p.logged_at, with_date=len(days) > 1), p.id,
                  f"{p.sender}>{p.receiver}", p.protocol or "?",
                  endpoint(p.src, p.src_port), endpoint(p.dst, p.dst_port), info(p), p.length)
    zone = datetime.now().astimezone().strftime("%Z")
    table.caption = f"{rows_and_packets(len(packets), sum(p.wire_packets for p in packets))}; " \
        f"times in {zone}"
    return table


def rows_and_packets(rows: int, packets: int) -> str:
    """'N packet(s)', or 'N rows (M packets on the wire)' where rows hold super-packets."""
    if rows == packets:
        return f"{rows} packet(s)"
    return f"{rows} rows ({packets} packets on the wire)"


def packet_line(p: LoggedPacket) -> str:
    """One packet per line, for --follow (a table cannot grow)."""
    return (f"{local_time(p.logged_at)}  {p.id:>8}  {p.sender} > {p.receiver}  "
            f"{p.protocol or '?':7} {endpoint(p.src, p.src_port)} > "
            f"{endpoint(p.dst, p.dst_port)}  {info(p)}  {p.length} B").replace("   ", "  ")


def stats_table(rows: Sequence[Aggregate], by: str, title: str,
                total: tuple[int, int, int]) -> Table:
    if by == "flow":
        table = Table(title, ["source", "destination", "proto", "packets", "bytes", "share",
                              "avg rate", "first", "span"],
                      right=["packets", "bytes", "share", "avg rate", "span"])
    elif by == "host":
        table = Table(title, ["address", "packets", "bytes", "sent", "received", "share",
                              "first", "span"],
                      right=["packets", "bytes", "sent", "received", "share", "span"])
    else:
        table = Table(title, ["sender", "receiver", "packets", "bytes", "share", "avg rate",
                              "first", "span"],
                      right=["packets", "bytes", "share", "avg rate", "span"])
    for row in rows:
        # talkers count each packet twice (source and destination): share of all bytes moved
        share = f"{row.bytes / total[1] / (2 if by == 'host' else 1):.1%}" if total[1] else "-"
        span = format_duration(row.last - row.first)
        first = local_time(row.first)[:19]
        key = row.key
        if by == "flow":
            table.add(endpoint(key["src"], key["src_port"]), endpoint(key["dst"],
                      key["dst_port"]), key["protocol"], row.packets, human_bytes(row.bytes),
                      share, human_rate(row.bits_per_second), first, span)
        elif by == "host":
            table.add(key["address"], row.packets, human_bytes(row.bytes),
                      human_bytes(row.sent_bytes or 0), human_bytes(row.received_bytes or 0),
                      share, first, span)
        else:
            table.add(key["sender"], key["receiver"], row.packets, human_bytes(row.bytes),
                      share, human_rate(row.bits_per_second), first, span)
    table.caption = (f"selection: {rows_and_packets(total[2], total[0])}, "
                     f"{human_bytes(total[1])}; packets: on the wire")
    return table


def prune_lines(report: PruneReport) -> list[str]:
    verb = "would drop" if report.dry_run else "dropped"
    lines = [f"{verb} {p.name} ({local_time(p.range_from)[:16]} .. "
             f"{local_time(p.range_to)[:16]}, {human_bytes(p.bytes)}"
             + (f", ~{p.estimated_rows} rows)" if p.estimated_rows is not None else ")")
             for p in report.dropped]
    lines += [f"kept {p.name}: {p.keep_reason}" for p in report.kept]
    size = human_bytes(sum(p.bytes for p in report.dropped))
    lines.append(f"{verb} {len(report.dropped)} partition(s), {size}, older than "
                 f"{local_time(report.cutoff)[:19]}"
                 + (f"; created {report.created_ahead} ahead" if report.created_ahead else ""))
    return lines


def settings_lines(settings: LogSettings) -> list[str]:
    keep = format_duration(settings.retention) if settings.retention else "forever"
    lines = [f"retention:        {keep}",
             f"partition step:   {format_duration(settings.partition_step)}",
             f"partitions ahead: {format_duration(settings.partitions_ahead)}"]
    if settings.retention and settings.retention < settings.partition_step:
        lines.append(f"note: whole partitions are dropped, so up to "
                     f"{format_duration(settings.retention + settings.partition_step)} is kept; "
                     "a finer --partition-step keeps closer to the policy")
    return lines
