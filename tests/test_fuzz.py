"""Fuzzing the real agents: whatever a peer logs in its own stream and whatever frames
reach a TUN device, the agents keep running, stay within bounded memory, print no
traceback, read past everything, and carry valid traffic afterwards.

Hypothesis draws rows (any seq in the allowed range, with gaps, duplicates and
steps back; any receiver; any bytes up to the largest row) that peer-a logs with its
own role, and frames that a packet socket writes into peer-a's TUN device. Whatever
would be a whole IP packet is rewritten to go from peer-a to peer-b, so that nothing
the fuzz provokes leaves the lab's tunnel.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lab.measure import ping
from pgvpn.transports.batched import MAX_SEQ
from tests.agentside import (
    MEMORY_PROBE,
    AgentMemory,
    agent_memory,
    connect_as,
    cursor,
    last_seq,
    stream_restored,
    tracebacks,
    wait_read_past,
)
from tests.conftest import CliBackend, LabHandle
from tests.peerside import lab_cli

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
ADDRESSES = {4: (bytes([10, 230, 0, 1]), bytes([10, 230, 0, 2])),
             6: (bytes.fromhex("fd000230" + "00" * 11 + "01"),
                 bytes.fromhex("fd000230" + "00" * 11 + "02"))}
ROW_MAX = 65535
TUN_MTU = 1500  # the lab's; a frame larger than it is refused by the kernel anyway
# Far below MAX_SEQ, so that peer-a can number its packets afterwards; the bound
# itself is tested in tests/test_bounds.py.
SEQ_CEILING = MAX_SEQ - 2**48
MEMORY_SLACK_MB = 32  # what the whole fuzz may add to an agent's peak memory
# No shrinking: the agents carry state from one example to the next, so the first
# failing example is the one to read, and shrinking after a dead agent only waits.
FUZZ = settings(max_examples=20, deadline=None, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def confined(frame: bytes) -> bytes:
    """`frame` with peer-a's and peer-b's tunnel addresses where an IP header has them."""
    version = frame[0] >> 4 if frame else 0
    data = bytearray(frame)
    if version == 4 and len(data) >= 20:
        data[12:16], data[16:20] = ADDRESSES[4]
    elif version == 6 and len(data) >= 40:
        data[8:24], data[24:40] = ADDRESSES[6]
    return bytes(data)


@st.composite
def ip_packets(draw: st.DrawFn) -> bytes:
    """Whole IPv4/IPv6 packets (the lengths right, the rest arbitrary), which pass the
    agents' checks and reach the other peer's kernel."""
    payload = draw(st.binary(max_size=256))
    if draw(st.booleans()):
        words = draw(st.integers(5, 15))
        packet = bytearray(draw(st.binary(min_size=4 * words, max_size=4 * words)) + payload)
        packet[0] = 0x40 | words
        struct.pack_into("!H", packet, 2, len(packet))
    else:
        packet = bytearray(draw(st.binary(min_size=40, max_size=40)) + payload)
        packet[0] = 0x60 | packet[0] & 0x0F
        struct.pack_into("!H", packet, 4, len(payload))
    return bytes(packet)


def large(head: bytes, size: int) -> bytes:
    return (head * (size // len(head) + 1))[:size]


ROW_DATA = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(large, st.binary(min_size=1, max_size=64), st.integers(1, ROW_MAX)),
    ip_packets(),
).map(confined)
RECEIVERS = st.one_of(st.sampled_from(["peer-b", "peer-b", "peer-b", "peer-a", "nobody"]),
                      # any text a peer can send: UTF-8 (no lone surrogates), no NUL
                      st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                              max_size=30))
# Each row's seq is the previous one's plus a step: repeats, small gaps, steps back
# below what peer-b already read, and jumps far ahead.
SEQ_STEPS = st.one_of(st.integers(-3, 3), st.integers(-(2**40), 2**40))
ROWS = st.lists(st.tuples(SEQ_STEPS, RECEIVERS, ROW_DATA), min_size=1, max_size=12)
FRAMES = st.lists(st.one_of(st.binary(min_size=1, max_size=TUN_MTU), ip_packets()).map(confined),
                  min_size=1, max_size=20)

# Writes the frames, then reports on the agent as MEMORY_PROBE does: one exec an example.
INJECT = """\
import base64, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("pgvpn0", 0))
for frame in sys.argv.pop(1).split(","):
    try:
        s.send(base64.b64decode(frame))
    except OSError:
        pass  # e.g. a frame the device does not take: the kernel's business, not the agent's
""" + MEMORY_PROBE


def log_rows(lab: LabHandle, rows: list[tuple[int, str, bytes]]) -> int:
    """peer-a logs `rows` (seq step, receiver, data); returns the seq peer-b must reach."""
    seq, target = last_seq(lab, "peer-a"), cursor(lab, "peer-b", "peer-a")
    logged = []
    for step, receiver, data in rows:
        seq = min(max(seq + step, 1), SEQ_CEILING)
        logged.append((seq, receiver, len(data), data))
        if receiver == "peer-b":
            target = max(target, seq)
    with connect_as(lab, "peer-a") as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany("INSERT INTO pgvpn.packets (seq, receiver, length, data) "
                        "VALUES (%s, %s, %s, %s)", logged)
    return target


def fuzz_agent(lab: LabHandle, host: str, run: Callable[[], None]) -> None:
    """Run the fuzz; the agent on `host` must come through it whole."""
    tracebacks0 = tracebacks(lab, host)
    before = agent_memory(lab, host, reset=True)
    run()
    after = agent_memory(lab, host)
    print(f"{host} agent memory: {before.rss_mb:.1f} MB before, peak {after.peak_mb:.1f} MB "
          f"during the fuzz, {after.rss_mb:.1f} MB after")
    assert after.pid == before.pid  # the same agent, still running
    assert after.peak_mb - before.rss_mb < MEMORY_SLACK_MB, (before, after)
    assert tracebacks(lab, host) == tracebacks0


@pytest.mark.slow
def test_fuzz_rows_a_peer_logs(any_lab: LabHandle) -> None:
    """peer-b's downlink reads whatever peer-a logs; peer-a's agent is stopped meanwhile
    (only the fuzz writes its stream) and resumes numbering after it; then the owner
    removes the fuzz's rows, some of which peer-a addressed to itself."""

    @settings(FUZZ, max_examples=40)  # cheap examples: no exec into a host
    @given(rows=ROWS)
    def rows_are_read_past(rows: list[tuple[int, str, bytes]]) -> None:
        wait_read_past(any_lab, "peer-b", "peer-a", log_rows(any_lab, rows), timeout=15)

    with stream_restored(any_lab):  # no other test meets what the fuzz logged
        lab_cli(any_lab, "stop", "peer-a")
        try:
            fuzz_agent(any_lab, "peer-b", rows_are_read_past)
        finally:
            lab_cli(any_lab, "start", "peer-a")
        assert ping(CliBackend(any_lab), "peer-a", PEER_B, count=3).received == 3


@pytest.mark.slow
def test_fuzz_frames_in_the_tun_device(any_lab: LabHandle) -> None:
    """peer-a's uplink reads whatever a packet socket writes into its TUN device."""

    @FUZZ
    @given(frames=FRAMES)
    def frames_are_taken(frames: list[bytes]) -> None:
        encoded = ",".join(base64.b64encode(frame).decode() for frame in frames)
        probed = any_lab.exec("peer-a", "python3", "-c", INJECT, encoded).stdout.split()
        assert AgentMemory.parse(probed).pid == pid  # the same agent, still running

    pid = agent_memory(any_lab, "peer-a").pid
    fuzz_agent(any_lab, "peer-a", frames_are_taken)
    assert ping(CliBackend(any_lab), "peer-a", PEER_B, count=3).received == 3
    assert ping(CliBackend(any_lab), "peer-b", PEER_A, count=3).received == 3
