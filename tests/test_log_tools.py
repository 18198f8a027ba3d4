"""The packet log as a product: filters, the decoding view, export, replay (partitions,
retention and prune: tests/test_prune.py).

Unit tests first (no lab needed), then integration tests on the namespace lab.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dpkt
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvpn.cli import build_parser
from pgvpn.errors import PgvpnError
from pgvpn.logs.filter import LogFilter, filter_from_args, parse_network, parse_protocol
from pgvpn.logs.pcap import LINKTYPE_RAW, write_pcap
from pgvpn.logs.replay import read_input, schedule
from pgvpn.timespec import format_duration, parse_duration, parse_time
from tests.conftest import ROOT, LabHandle
from tests.peerside import docker_container

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
NOW = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------- durations
@pytest.mark.parametrize(("text", "seconds"), [
    ("7d", 7 * 86400), ("12h", 12 * 3600), ("30m", 1800), ("90s", 90), ("2w", 14 * 86400),
    ("1h30m", 5400), ("1.5h", 5400), (" 10M ", 600), ("0s", 0)])
def test_durations_people_type(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7x", "d7", "-3h", "1h 30", "7 days", "1e3s"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(PgvpnError, match=r"bad duration .*e\.g\. 7d, 12h, 30m"):
        parse_duration(text)


@given(st.integers(min_value=60, max_value=400 * 86400))
def test_short_form_reads_back_to_within_its_precision(seconds: int) -> None:
    text = format_duration(timedelta(seconds=seconds))
    back = parse_duration(text).total_seconds()
    # two units are shown (1d2h, 5m32s): the dropped rest is under the smaller unit
    assert 0 <= seconds - back < 86400 if "d" in text else 0 <= seconds - back < 3600


def test_times_are_durations_ago_or_iso() -> None:
    assert parse_time("10m", NOW) == NOW - timedelta(minutes=10)
    assert parse_time("now", NOW) == NOW
    assert parse_time("2025-11-25T11:00:00+00:00", NOW) == NOW - timedelta(hours=1)
    naive = parse_time("2025-11-25 11:00", NOW)
    assert naive.tzinfo is not None  # local time, made explicit
    with pytest.raises(PgvpnError, match="bad time 'yesterday'"):
        parse_time("yesterday", NOW)


# ------------------------------------------------------------------ filters
def parse_filter(*argv: str) -> LogFilter:
    return filter_from_args(build_parser().parse_args(["log", *argv]), now=NOW)


def test_filter_options_become_one_where_clause() -> None:
    flt = parse_filter("--peer", "peer-a", "--proto", "tcp", "--port", "80,443",
                       "--host", "10.230.0.0/24", "--since", "1h")
    where, params = flt.where()
    assert where.as_string(None) == (
        '("h"."sender" = ANY(%s) OR "h"."receiver" = ANY(%s)) AND "h"."logged_at" >= %s AND '
        '("h"."src" <<= ANY(%s::inet[]) OR "h"."dst" <<= ANY(%s::inet[])) AND '
        '"h"."protocol_number" = ANY(%s::smallint[]) AND '
        '("h"."src_port" = ANY(%s::integer[]) OR "h"."dst_port" = ANY(%s::integer[]))')
    assert params == [["peer-a"], ["peer-a"], NOW - timedelta(hours=1), ["10.230.0.0/24"],
                      ["10.230.0.0/24"], [6], [80, 443], [80, 443]]
    assert flt.needs_decoding
    assert flt.describe() == ("peer peer-a, host 10.230.0.0/24, tcp, port 80, port 443, since "
                              f"{(NOW - timedelta(hours=1)).astimezone():%Y-%m-%d %H:%M:%S}")


def test_no_filter_selects_everything_and_raw_columns_need_no_decoding() -> None:
    where, params = LogFilter().where()
    assert (where.as_string(None), params) == ("TRUE", [])
    flt = parse_filter("--sender", "peer-a", "--sender", "peer-b", "--until", "5m")
    assert flt.senders == ("peer-a", "peer-b") and not flt.needs_decoding
    assert flt.where()[0].as_string(None) == '"h"."sender" = ANY(%s) AND "h"."logged_at" < %s'


@pytest.mark.parametrize(("argv", "message"), [
    (["--proto", "tcpp"], "unknown protocol 'tcpp'"),
    (["--proto", "300"], "unknown protocol '300'"),
    (["--host", "10.0.0.300"], "bad address '10.0.0.300'"),
    (["--port", "65536"], "bad port '65536'"),
    (["--peer", "Peer A"], "bad peer name"),
    (["--since", "1h", "--until", "2h"], "the window is empty"),
])
def test_bad_filters_are_one_clear_error(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is refused while parsing (exit 2), a bad combination by the filter."""
    with pytest.raises((PgvpnError, SystemExit)) as caught:
        parse_filter(*argv)
    if isinstance(caught.value, SystemExit):
        assert caught.value.code == 2
        assert message in capsys.readouterr().err
    else:
        assert message in str(caught.value)


def test_protocols_and_networks() -> None:
    assert [parse_protocol(p) for p in ("TCP", "udp", "icmpv6", "47")] == [6, 17, 58, 47]
    assert parse_network("10.230.0.7/24") == ipaddress.ip_network("10.230.0.0/24")
    assert parse_network("fd00:230::2") == ipaddress.ip_network("fd00:230::2/128")


@pytest.mark.parametrize("argv", [
    ["prune", "--older-than", "7x"], ["log", "--proto", "foo"], ["stats", "--since", "later"],
    ["export", "--pcap", "-", "--host", "nowhere"], ["retention", "--keep", "3"]])
def test_cli_reports_bad_input_in_one_line_before_connecting(argv: list[str]) -> None:
    # no database is reachable here: the typo must be what is reported
    env = {"DATABASE_URL": "host=/nonexistent", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*PGVPN, *argv], capture_output=True, text=True, env=env,
                          check=False, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("pgvpn: error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and "connect" not in done.stderr


PGVPN = [sys.executable, "-m", "pgvpn.cli"]


# ------------------------------------------------------- pcap and replay input
def test_pcap_keeps_every_byte_and_the_exact_microsecond() -> None:
    packets = [(datetime(2025, 11, 25, 12, 0, 0, 999_999, tzinfo=UTC), b"\x45" + b"a" * 19),
               (datetime(2025, 11, 25, 12, 0, 1, 1, tzinfo=UTC), b"\x60" + b"b" * 39)]
    out = io.BytesIO()
    assert write_pcap(packets, out) == (2, 60)
    raw = out.getvalue()
    magic, _, _, _, _, snaplen, linktype = struct.unpack("<IHHiIII", raw[:24])
    assert (magic, snaplen, linktype) == (0xA1B2C3D4, 65535, LINKTYPE_RAW)
    sec, usec, caplen, length = struct.unpack("<IIII", raw[24:40])
    assert (sec, usec, caplen, length) == (int(packets[0][0].timestamp()), 999_999, 20, 20)
    back = list(read_input(io.BufferedReader(io.BytesIO(raw))))
    assert back == packets


def test_replay_reads_json_lines_and_paces_them() -> None:
    lines = "".join(json.dumps({"logged_at": (NOW + timedelta(seconds=s)).isoformat(),
                                "data": f"45{s:02x}"}) + "\n" for s in (0, 1, 11))
    packets = list(read_input(io.BytesIO(lines.encode())))
    assert [d for _, d in packets] == [b"\x45\x00", b"\x45\x01", b"\x45\x0b"]
    assert [o for o, _ in schedule(packets, 1.0, None)] == [0.0, 1.0, 11.0]
    assert [o for o, _ in schedule(packets, 2.0, None)] == [0.0, 0.5, 5.5]
    assert [o for o, _ in schedule(packets, 2.0, 2.0)] == [0.0, 0.5, 1.5]
    assert [o for o, _ in schedule(packets, 0.0, None)] == [0.0, 0.0, 0.0]
    with pytest.raises(PgvpnError, match="input line 1"):
        list(read_input(io.BytesIO(b'{"data": "45"}\n')))


# ---------------------------------------------- integration: the lab's log
def checked(done: subprocess.CompletedProcess[Any]) -> str:
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def db_now(lab: LabHandle) -> datetime:
    return lab.sql("SELECT now()")[0][0]  # type: ignore[no-any-return]


def test_lab_status_shows_the_log_on_disk_and_its_span(any_lab: LabHandle) -> None:
    checked(any_lab.exec("peer-a", "ping", "-c2", "-i0.2", PEER_B))
    log = any_lab.status()["log"]
    assert log["disk_bytes"] > 0 and log["partitions"] >= 4
    assert datetime.fromisoformat(log["first"]) <= datetime.fromisoformat(log["last"])
    assert log["retention"] == "forever"
    assert "on disk in" in any_lab.cli("status").stdout


# (ip_version, src, dst, protocol, src_port, dst_port, tcp_flags, icmp_type)
def ipv4(proto: int, payload: bytes, *, options: bytes = b"", fragment: int = 0,
         src: str = "10.1.2.3", dst: str = "10.4.5.6") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 7, fragment,
                       64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)
                       ) + options + payload


def ipv6(next_header: int, payload: bytes, src: str = "fd00::1", dst: str = "fd00::2") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 1024, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 12, 0) + b"ping"


def icmp(kind: int) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, 1, 1) + b"abcdefgh"


CRAFTED = [
    (ipv4(6, tcp(40000, 80, 0x02)), (4, "10.1.2.3", "10.4.5.6", "tcp", 40000, 80, ["SYN"], None)),
    (ipv4(6, tcp(443, 40001, 0x18), options=b"\x01\x01\x01\x00"),
     (4, "10.1.2.3", "10.4.5.6", "tcp", 443, 40001, ["ACK", "PSH"], None)),
    (ipv4(17, udp(5353, 53)), (4, "10.1.2.3", "10.4.5.6", "udp", 5353, 53, None, None)),
    (ipv4(1, icmp(8)), (4, "10.1.2.3", "10.4.5.6", "icmp", None, None, None, 8)),
    (ipv4(17, udp(1, 2), fragment=185), (4, "10.1.2.3", "10.4.5.6", "udp", None, None, None,
                                          None)),
    (ipv4(47, b"\x00" * 8), (4, "10.1.2.3", "10.4.5.6", "gre", None, None, None, None)),
    (ipv6(6, tcp(5201, 50000, 0x12)), (6, "fd00::1", "fd00::2", "tcp", 5201, 50000,
                                       ["SYN", "ACK"], None)),
    (ipv6(58, icmp(128)), (6, "fd00::1", "fd00::2", "icmpv6", None, None, None, 128)),
    (ipv6(0, struct.pack("!BB6s", 17, 0, b"\x01\x04" + bytes(4)) + udp(546, 547)),
     (6, "fd00::1", "fd00::2", "udp", 546, 547, None, None)),
    (ipv6(44, struct.pack("!BBHI", 17, 0, 1, 9) + udp(7, 9)),  # first fragment: ports
     (6, "fd00::1", "fd00::2", "udp", 7, 9, None, None)),
    (ipv6(44, struct.pack("!BBHI", 17, 0, 100 << 3, 9) + b"\x00" * 8),  # a later one: none
     (6, "fd00::1", "fd00::2", "udp", None, None, None, None)),
]


def test_the_view_decodes_headers_at_query_time(netns_lab: LabHandle) -> None:
    with psycopg.connect(netns_lab.conninfo()) as conn, conn.transaction(force_rollback=True):
        for seq, (packet, _) in enumerate(CRAFTED, 1):
            conn.execute("INSERT INTO pgvpn.packets (sender, seq, receiver, length, data) "
                         "VALUES ('crafted', %s, 'nobody', %s, %s)", [seq, len(packet), packet])
        rows = conn.execute(
            "SELECT ip_version, host(src), host(dst), protocol, src_port, dst_port, tcp_flags,"
            " icmp_type FROM pgvpn.packet_headers WHERE sender = 'crafted' ORDER BY seq"
        ).fetchall()
    assert [tuple(r) for r in rows] == [expected for _, expected in CRAFTED]


def test_log_filters_table_and_json(any_lab: LabHandle) -> None:
    since = db_now(any_lab).isoformat()
    checked(any_lab.exec("peer-a", "ping", "-c3", "-i0.2", PEER_B))
    checked(any_lab.exec("peer-b", "ping", "-6", "-c2", "-i0.2", "fd00:230::1"))
    any_lab.wait_settled()

    table = checked(any_lab.cli("packets", "--since", since, "--proto", "icmp"))
    assert table.count("echo request") == 3 and table.count("echo reply") == 3
    assert "icmpv6" not in table

    lines = checked(any_lab.cli("packets", "--since", since, "-n", "0", "--json",
                                  "--host", "fd00:230::/64", "--data")).splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["icmp_type"] for d in docs if d["protocol"] == "icmpv6"] == [128, 129] * 2
    assert all(bytes.fromhex(d["data"])[0] >> 4 == 6 for d in docs)
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)

    mine = any_lab.pgvpn("log", "--since", since, "--sender", "peer-a", "--proto", "icmp",
                           "-n", "2", "--json").stdout.decode().splitlines()
    assert [json.loads(line)["icmp_type"] for line in mine] == [8, 8]  # the newest two

    flows = [json.loads(line) for line in any_lab.pgvpn(
        "stats", "--since", since, "--json", "--proto", "icmp").stdout.decode().splitlines()]
    assert {(f["src"], f["dst"], f["packets"], f["bytes"]) for f in flows} == {
        (PEER_A, PEER_B, 3, 252), (PEER_B, PEER_A, 3, 252)}


def test_export_reads_back_as_the_logged_rows(any_lab: LabHandle, tmp_path: Path) -> None:
    since = db_now(any_lab)
    checked(any_lab.exec("peer-a", "ping", "-c3", "-i0.2", "-s", "1200", PEER_B))
    checked(any_lab.exec("peer-b", "ping", "-6", "-c2", "-i0.2", "fd00:230::1"))
    any_lab.wait_settled()
    until = db_now(any_lab)
    rows = any_lab.sql("SELECT logged_at, data, offload FROM pgvpn.packets "
                       "WHERE logged_at >= %s AND logged_at < %s ORDER BY logged_at, id",
                       [since, until])
    assert len(rows) >= 10
    # Background traffic in the window (a TCP SYN, say) may come from an offloading TUN
    # with a partial checksum; none of it is a super-packet, so each row is one packet.
    assert not any(row[2] and row[2][1] for row in rows), "a super-packet in the window"

    window = ["--since", since.isoformat(), "--until", until.isoformat()]
    lab_file = tmp_path / "lab.pcap"
    checked(any_lab.cli("export", "--pcap", str(lab_file), *window))
    piped = any_lab.pgvpn("export", "--pcap", "-", *window).stdout
    assert piped == lab_file.read_bytes()  # lab export and pgvpn export: the same bytes
    as_logged = any_lab.pgvpn("export", "--pcap", "-", "--super-packets", *window).stdout

    micros = [round(Decimal(row[0].timestamp()) * 1_000_000) for row in rows]
    logged = list(zip(micros, [bytes(row[1]) for row in rows], strict=True))
    assert pcap_packets(io.BytesIO(as_logged)) == logged  # --super-packets: rows verbatim
    with lab_file.open("rb") as handle:
        read = pcap_packets(handle)
    # the default (the wire's packets): every row once, at its time, its checksum complete
    assert [micro for micro, _ in read] == micros
    for (_, wire), row in zip(read, rows, strict=True):
        assert len(wire) == len(row[1])
        if row[2] and row[2][0] & NEEDS_CSUM:
            start, offset = struct.unpack_from("<HH", row[2], 6)
            assert wire[:start + offset] == row[1][:start + offset]
            assert wire[start + offset + 2:] == row[1][start + offset + 2:]
            assert l4_checksum_ok(wire, start)
        else:
            assert wire == bytes(row[1])

    if shutil.which("tshark") is None:
        return
    fields = subprocess.run(
        ["tshark", "-r", str(lab_file), "-T", "fields", "-E", "separator=,",
         "-e", "frame.time_epoch", "-e", "ip.src", "-e", "ipv6.src", "-e", "frame.len"],
        capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(fields) == len(rows)
    for line, row, micro in zip(fields, rows, micros, strict=True):
        epoch, src4, src6, length = line.split(",")
        assert round(Decimal(epoch) * 1_000_000) == micro
        assert int(length) == len(row[1])
        assert (src4 or src6) in (PEER_A, PEER_B, "fd00:230::1", "fd00:230::2")


NEEDS_CSUM = 1  # virtio_net_hdr flags: the L4 checksum is only the pseudo-header's sum


def pcap_packets(handle: Any) -> list[tuple[int, bytes]]:
    """(microseconds, bytes) of every packet in a raw-IP pcap."""
    reader = dpkt.pcap.Reader(handle)
    assert reader.datalink() == LINKTYPE_RAW
    return [(round(Decimal(repr(ts)) * 1_000_000), bytes(buf)) for ts, buf in reader]


def l4_checksum_ok(packet: bytes, l4_start: int) -> bool:
    """RFC 1071 over the pseudo-header and the TCP/UDP segment sums to 0xffff: written
    here from the RFCs, not with pgvpn.offload, so that the test checks that module."""
    if packet[0] >> 4 == 4:
        pseudo = packet[12:20] + struct.pack("!BBH", 0, packet[9], len(packet) - l4_start)
    else:
        pseudo = packet[8:40] + struct.pack("!I3xB", len(packet) - l4_start, packet[6])
    data = pseudo + packet[l4_start:]
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def in_scratch_host(lab: LabHandle) -> list[str]:
    """A command prefix that runs a host program inside the replay scratch host's network
    namespace (made now if missing): `ip netns exec`, or nsenter into the container's."""
    code = ("from lab.controller import Lab; "
            "print(Lab.current().backend.ensure_scratch_host(lambda _: None))")
    host = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=lab.env, cwd=ROOT, check=True).stdout.strip()
    if lab.backend == "netns":
        return ["ip", "netns", "exec", lab.namespace(host)]
    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}",
                          docker_container(lab, host)], capture_output=True, text=True,
                         check=True).stdout.strip()
    return ["nsenter", "-t", pid, "-n"]


def test_replayed_ping_reproduces_its_echo_requests(any_lab: LabHandle,
                                                    tmp_path: Path) -> None:
    """Byte for byte, on both backends: tshark on this host, in the scratch host's
    network namespace (the agent image has no capture tool, and needs none)."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is needed to watch the target interface")
    lab = any_lab
    since = db_now(lab).isoformat()
    checked(lab.exec("peer-a", "ping", "-c3", "-i0.3", "-p", "c0ffee", PEER_B))
    lab.wait_settled()
    requests = [bytes(r[0]) for r in lab.sql(
        "SELECT data FROM pgvpn.packet_headers WHERE logged_at >= %s AND sender = 'peer-a' "
        "AND icmp_type = 8 ORDER BY seq", [since])]
    assert len(requests) == 3

    # Watch the scratch host before the replay makes its TUN device there: "any"
    # sees interfaces that appear later. It has no other interface than lo.
    capture = tmp_path / "replay.pcap"
    watcher = subprocess.Popen(
        [*in_scratch_host(lab), "tshark", "-i", "any", "-f", "icmp", "-c", "6",
         "-a", "duration:30", "-F", "pcap", "-w", str(capture)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stderr is not None
        deadline = time.monotonic() + 20
        while "Capturing on" not in watcher.stderr.readline():
            assert time.monotonic() < deadline and watcher.poll() is None, "tshark did not start"
        replayed = lab.cli("replay", "--sender", "peer-a", "--proto", "icmp",
                           "--since", since, "--speed", "2")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 3 packets" in replayed.stderr
        assert "answered with 3 packet(s)" in replayed.stderr  # the echo replies
        watcher.wait(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.terminate()
            watcher.wait(timeout=10)

    with capture.open("rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        header = {113: 16, 276: 20}[reader.datalink()]  # Linux "cooked" capture, v1 or v2
        frames = [bytes(buf)[header:] for _, buf in reader]
    seen = [f for f in frames if f[20] == 8]  # ICMP type 8 after a 20-byte IPv4 header
    assert seen == requests  # byte for byte, in order, on the replay's interface
    replies = [f for f in frames if f[20] == 0]
    assert [r[24:28] for r in replies] == [q[24:28] for q in requests]  # same id and seq


def test_replay_into_the_scratch_host_is_answered_there(any_lab: LabHandle) -> None:
    """On both backends: the scratch host (a namespace, or a container with no network)
    takes the receiver's addresses and its own stack answers the replayed requests."""
    since = db_now(any_lab).isoformat()
    checked(any_lab.exec("peer-a", "ping", "-c2", "-i0.3", PEER_B))
    any_lab.wait_settled()
    replayed = any_lab.cli("replay", "--sender", "peer-a", "--proto", "icmp", "--since", since,
                           "--speed", "4")
    assert "replayed 2 packets" in replayed.stderr
    assert "answered with 2 packet(s)" in replayed.stderr


def test_files_reach_a_host_through_exec_alone(netns_lab: LabHandle) -> None:
    """Backend.copy_in's default (what `lab replay` uses on Docker), on the namespace lab."""
    data = os.urandom(300_000)  # several argument-sized pieces
    code = ("import sys; from lab.backends.base import Backend; from lab.controller import Lab; "
            "print(Backend.copy_in(Lab.current().backend, 'peer-a', 'copy-test.bin', "
            "sys.stdin.buffer.read()))")
    path = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                          env=netns_lab.env, cwd=ROOT, check=True, timeout=60
                          ).stdout.decode().strip()
    try:
        digest = checked(netns_lab.exec("peer-a", "sha256sum", path)).split()[0]
        assert digest == hashlib.sha256(data).hexdigest()
    finally:
        netns_lab.exec("peer-a", "rm", "-f", path)
