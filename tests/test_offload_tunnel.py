"""TUN offload end to end (issue 10): TCP super-packets cross as single rows and arrive
byte-exact, a receiver without offload gets them segmented, a lying header is skipped,
and every log tool says how many packets crossed the wire."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgvpn.offload import NO_OFFLOAD, VirtioNetHdr, wire_packets
from tests.conftest import LabHandle
from tests.peerside import agent_log, counted_warnings, lab_cli, owner_execute, wait_for
from tests.test_tunnel import stream_transfer

BAD_ROWS_LOG = "skipped logged rows from peer-a that are not packets for this TUN"
GSO_TCPV4 = 1
BAD_CHECKSUM = "0"  # tshark's checksum status: 0 bad, 1 good, 2 unverified
STREAM_PORT = 40002  # tests.test_tunnel's byte-exact stream

# The stream's rows from peer-a, newest `since` id on: length, header, packets on the wire.
STREAM_ROWS = """
SELECT h.length, h.offload, h.wire_packets FROM pgvpn.packet_headers h
WHERE h.sender = 'peer-a' AND h.id > %s AND h.dst_port = %s ORDER BY h.seq
"""


def newest_id(lab: LabHandle) -> int:
    return int(lab.sql("SELECT coalesce(max(id), 0) FROM pgvpn.packets")[0][0])


def test_a_tcp_stream_crosses_as_super_packets_and_arrives_byte_exact(any_lab: LabHandle
                                                                      ) -> None:
    """The sender's kernel hands its agent up to 64 KB of the stream per read; each is one
    row with its virtio_net_hdr, and the receiver's kernel takes it back whole."""
    mark = newest_id(any_lab)
    rx0 = any_lab.tun_counters("peer-b")["rx"]
    assert stream_transfer(any_lab, 8_000_000)
    any_lab.wait_settled()
    rows = any_lab.sql(STREAM_ROWS, [mark, STREAM_PORT])
    supers = [(length, bytes(header), wire) for length, header, wire in rows
              if length > 1500]
    assert supers, "no row larger than the MTU: the sender's TUN did not offload"
    for length, header, wire in supers:
        parsed = VirtioNetHdr.from_bytes(header)
        assert parsed.gso_type & 0x7F == GSO_TCPV4 and parsed.needs_csum, parsed
        assert wire > 1, (length, parsed)
    largest = max(length for length, _, _ in supers)
    assert largest >= 16_000, f"the largest super-packet had only {largest} bytes"
    carried = sum(wire for _, _, wire in rows)
    assert carried > len(rows), (carried, len(rows))
    # each row is one write to the receiver's TUN, whole (its kernel segments nothing)
    assert any_lab.tun_counters("peer-b")["rx"] - rx0 >= len(rows)


def tcp_checksum_errors(lab: LabHandle, host: str) -> int:
    """TCP segments the host's stack dropped for a bad checksum (/proc/net/snmp)."""
    lines = [line.split() for line in lab.exec(host, "cat", "/proc/net/snmp").stdout
             .splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["InCsumErrors"])


def log_by_hand(lab: LabHandle, rows: list[tuple[bytes, bytes | None]]) -> int:
    """Append rows to peer-a's stream (peer-a stopped) as the owner; its last seq."""
    last = int(lab.sql("SELECT max(seq) FROM pgvpn.packets WHERE sender = 'peer-a'")[0][0])
    for offset, (data, header) in enumerate(rows, 1):
        owner_execute(lab, "INSERT INTO pgvpn.packets (sender, seq, receiver, length, data, "
                      "offload) VALUES ('peer-a', %s, 'peer-b', %s, %s, %s)",
                      [last + offset, len(data), data, header])
    seq = last + len(rows)
    wait_for(lambda: lab.sql("SELECT last_seq FROM pgvpn.cursors WHERE receiver = 'peer-b' "
                             "AND sender = 'peer-a'")[0][0] == seq, "peer-b to read the rows")
    return seq


def test_a_receiver_without_offload_writes_the_segments(any_lab: LabHandle) -> None:
    """A super-packet logged by an offloading sender reaches a receiver that runs with
    offload off as the wire's packets: one TUN write each, none over the MTU, every
    checksum complete (its stack drops none for a bad one)."""
    mark = newest_id(any_lab)
    assert stream_transfer(any_lab, 2_000_000)
    any_lab.wait_settled()
    length, header, wire = next(row for row in any_lab.sql(STREAM_ROWS, [mark, STREAM_PORT])
                                if row[0] > 1500)
    data = bytes(any_lab.sql("SELECT data FROM pgvpn.packets WHERE sender = 'peer-a' AND "
                             "id > %s AND length = %s LIMIT 1", [mark, length])[0][0])
    segments = wire_packets(bytes(header), data)
    assert len(segments) == wire > 1 and all(len(s) <= 1500 for s in segments)
    lab_cli(any_lab, "up", "--offload", "off")
    lab_cli(any_lab, "stop", "peer-a")
    try:
        assert "offload off: PGVPN_OFFLOAD=false" in agent_log(any_lab, "peer-b", 50)
        rx0, errors0 = any_lab.tun_counters("peer-b")["rx"], tcp_checksum_errors(any_lab,
                                                                                   "peer-b")
        log_by_hand(any_lab, [(data, bytes(header))])
        assert any_lab.tun_counters("peer-b")["rx"] - rx0 == len(segments)
        assert tcp_checksum_errors(any_lab, "peer-b") == errors0
    finally:
        lab_cli(any_lab, "start", "peer-a")
        lab_cli(any_lab, "up", "--offload", "on")
    assert stream_transfer(any_lab, 1_000_000)


def lying_headers(good: bytes) -> dict[str, bytes]:
    """virtio_net_hdr values a hostile peer could log beside a plain ICMP packet."""
    def header(**fields: int) -> bytes:
        values = {"flags": 1, "gso_type": GSO_TCPV4, "hdr_len": 40, "gso_size": 1448,
                  "csum_start": 20, "csum_offset": 16, **fields}
        return VirtioNetHdr(**values).to_bytes()

    return {
        "TSO on an ICMP packet": header(),
        "checksum offset outside the packet": header(gso_type=0, csum_start=len(good)),
        "segment size zero": header(gso_size=0),
        "unknown GSO type": header(gso_type=3),
        "unknown flags": header(flags=0x40, gso_type=0),
    }


def test_rows_with_lying_offload_headers_are_skipped_and_reported(any_lab: LabHandle) -> None:
    """The receiver checks each header against its packet before its kernel sees it."""
    from tests.test_bad_input import icmp_echo

    reported0 = counted_warnings(agent_log(any_lab, "peer-b", 5000), BAD_ROWS_LOG)
    index = any_lab.tun_link("peer-b")["ifindex"]
    lab_cli(any_lab, "stop", "peer-a")  # nothing else writes peer-a's stream meanwhile
    try:
        rx0 = any_lab.tun_counters("peer-b")["rx"]
        good = icmp_echo(b"x" * 56)
        rows: list[tuple[bytes, bytes | None]] = [
            (good, header) for header in lying_headers(good).values()]
        rows.append((icmp_echo(b"the one good packet"), NO_OFFLOAD))
        log_by_hand(any_lab, rows)
        assert any_lab.tun_counters("peer-b")["rx"] - rx0 == 1  # the good one only
        wait_for(lambda: counted_warnings(agent_log(any_lab, "peer-b", 5000), BAD_ROWS_LOG)
                 - reported0 == len(rows) - 1, "the agent to report the skipped rows")
        assert any_lab.tun_link("peer-b")["ifindex"] == index  # still the same agent
    finally:
        lab_cli(any_lab, "start", "peer-a")


def test_the_log_tools_count_packets_on_the_wire(any_lab: LabHandle, tmp_path: Path) -> None:
    """export writes the wire's packets by default (tshark: nothing malformed, every
    checksum right), or the rows whole with --super-packets; stats counts both."""
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing: scripts/setup.sh installs it")
    since = any_lab.sql("SELECT now()")[0][0]
    assert stream_transfer(any_lab, 2_000_000)
    any_lab.wait_settled()
    until = any_lab.sql("SELECT now()")[0][0]
    rows = any_lab.sql("SELECT count(*), sum(wire_packets) FROM pgvpn.packet_headers "
                       "WHERE logged_at >= %s AND logged_at < %s AND protocol = 'tcp' "
                       "AND %s IN (src_port, dst_port)", [since, until, STREAM_PORT])[0]
    row_count, wire_count = int(rows[0]), int(rows[1])
    assert wire_count > row_count > 0
    window = ["--proto", "tcp", "--port", str(STREAM_PORT), "--since", since.isoformat(),
              "--until", until.isoformat()]

    wire_file, super_file = tmp_path / "wire.pcap", tmp_path / "super.pcap"
    any_lab.pgvpn("export", "--pcap", str(wire_file), *window)
    any_lab.pgvpn("export", "--pcap", str(super_file), "--super-packets", *window)
    wire = tshark(wire_file)
    assert (wire.packets, wire.problems) == (wire_count, []), wire.problems[:5]
    assert max(wire.lengths) <= 1500
    whole = tshark(super_file)
    assert whole.packets == row_count and max(whole.lengths) > 1500
    # as captured on an offloading NIC: the super-packets' checksums are partial
    assert whole.bad_checksums > 0

    stats = [json.loads(line) for line in any_lab.pgvpn(
        "stats", "--by", "peer", "--json", *window).stdout.decode().splitlines()]
    assert sum(s["packets"] for s in stats) == wire_count
    assert sum(s["rows"] for s in stats) == row_count


@dataclass
class Capture:
    packets: int
    lengths: list[int]
    problems: list[str]  # malformed packets and bad checksums
    bad_checksums: int


def tshark(path: Path) -> Capture:
    """What tshark finds in a capture, with IP and TCP checksums verified."""
    listed = subprocess.run(
        ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE", "-T", "fields", "-E", "separator=;",
         "-e", "frame.len", "-e", "_ws.malformed", "-e", "ip.checksum.status",
         "-e", "tcp.checksum.status"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    lengths, problems, bad = [], [], 0
    for number, line in enumerate(listed.splitlines(), 1):
        length, malformed, ip_status, tcp_status = line.split(";")
        lengths.append(int(length))
        if malformed:
            problems.append(f"frame {number}: malformed")
        if BAD_CHECKSUM in (ip_status, tcp_status):
            bad += 1
            problems.append(f"frame {number}: bad checksum (ip {ip_status}, tcp {tcp_status})")
    return Capture(len(lengths), lengths, problems, bad)
