"""Bounds: no row a peer can log may crash an agent or exhaust its memory.

- The database refuses a `seq` outside 1..MAX_SEQ and a row that no TUN device could
  carry (sql/006_bounds.sql), from peers and the owner alike.
- An agent whose own stream is already past its numbering (a row from before 006,
  or one the owner wrote) stops with one line that says what to do, not a traceback.
- Rows larger than the receiving TUN's MTU are skipped without their data being
  fetched, and a batch holds a bounded number of bytes: the receiver's memory stays
  flat whatever the log holds, and its cursor moves past every such row.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg import errors

from pgvpn.transports.batched import MAX_SEQ
from tests.agentside import (
    agent_memory,
    connect_as,
    cursor,
    last_seq,
    log_as,
    stream_restored,
    tracebacks,
    wait_read_past,
)
from tests.conftest import LabHandle
from tests.peerside import (
    agent_log,
    agent_running,
    counted_warnings,
    lab_cli,
    owner_execute,
    wait_for,
)

PEER_B = "10.230.0.2"
ROW_MAX = 65535  # the largest IP packet, so the largest row the database accepts
INSERT = "INSERT INTO pgvpn.packets (seq, receiver, length, data) VALUES (%s, 'nobody', %s, %s)"
OUT_OF_NUMBERS = "pgvpn: error: peer peer-a cannot number its next packets"
BAD_ROWS_LOG = "skipped logged rows from peer-a that are not packets for this TUN"
ROWS = 1100  # 64 KiB rows: more than a batch of rows (batch_packets, 1024), 72 MB logged
MEMORY_SLACK_MB = 32  # what reading all of them may add to the receiver's peak memory


def test_the_database_refuses_rows_out_of_bounds(any_lab: LabHandle) -> None:
    with connect_as(any_lab, "peer-a") as conn:
        for seq, length in [(0, 1), (-1, 1), (MAX_SEQ + 1, 1), (2**63 - 1, 1),
                            (1, 0), (1, ROW_MAX + 1)]:
            with pytest.raises(errors.CheckViolation):
                conn.execute(INSERT, [seq, length, b"\x45" * length])
        for table in ("blog_v1_packets", "blog_v2_packets"):
            for size in (0, ROW_MAX + 1):
                with pytest.raises(errors.CheckViolation):
                    conn.execute(f"INSERT INTO pgvpn.{table} (sender, receiver, payload) "
                                 "VALUES ('peer-a', 'nobody', %s)", [bytes(size)])
        # the bounds themselves are accepted, and pgvpn.last_sent_seq() reads them;
        # rolled back, so that no agent ever sees them
        before = conn.execute("SELECT pgvpn.last_sent_seq()").fetchone()
        with conn.transaction(force_rollback=True):
            conn.execute(INSERT, [MAX_SEQ, ROW_MAX, bytes(ROW_MAX)])
            assert conn.execute("SELECT pgvpn.last_sent_seq()").fetchone() == (MAX_SEQ,)
        assert conn.execute("SELECT pgvpn.last_sent_seq()").fetchone() == before
    # nor may the owner log what no TUN device carries (the 40 MB rows)
    with pytest.raises(errors.CheckViolation):
        owner_execute(any_lab, "INSERT INTO pgvpn.packets (sender, seq, receiver, length, "
                      "data) VALUES ('peer-a', 1, 'nobody', %s, %s)",
                      [40 * 2**20, bytes(40 * 2**20)])


@pytest.fixture
def peer_a_restored(any_lab: LabHandle) -> Iterator[None]:
    with stream_restored(any_lab):
        yield


@pytest.mark.usefixtures("peer_a_restored")
def test_an_agent_past_its_numbering_stops_with_one_line(any_lab: LabHandle) -> None:
    """A row at the bound, as the owner may still write or a log from before 006 holds."""
    lines0 = agent_log(any_lab, "peer-a", 100_000).count(OUT_OF_NUMBERS)
    tracebacks0 = tracebacks(any_lab, "peer-a")
    lab_cli(any_lab, "stop", "peer-a")
    # no room for one more packet: the agent refuses to start
    owner_execute(any_lab, "INSERT INTO pgvpn.packets (sender, seq, receiver, length, data) "
                  "VALUES ('peer-a', %s, 'nobody', 1, '\\x45')", [MAX_SEQ])
    lab_cli(any_lab, "start", "peer-a", check=False)  # its TUN may come up before it stops
    wait_for(lambda: not agent_running(any_lab, "peer-a"), "peer-a's agent to stop")
    log = agent_log(any_lab, "peer-a", 100_000)
    assert log.count(OUT_OF_NUMBERS) == lines0 + 1
    assert f"highest logged seq is {MAX_SEQ}" in log and "DELETE FROM pgvpn.packets" in log
    # room for one: it starts, and stops at the first batch that does not fit
    owner_execute(any_lab, "UPDATE pgvpn.packets SET seq = %s WHERE sender = 'peer-a' "
                  "AND seq = %s", [MAX_SEQ - 1, MAX_SEQ])
    lab_cli(any_lab, "start", "peer-a", check=False)  # may already stop in its start-up
    any_lab.exec("peer-a", "ping", "-c3", "-i0.3", "-W1", PEER_B, check=False)
    wait_for(lambda: not agent_running(any_lab, "peer-a"), "peer-a's agent to stop")
    log = agent_log(any_lab, "peer-a", 100_000)
    assert log.count(OUT_OF_NUMBERS) == lines0 + 2
    assert tracebacks(any_lab, "peer-a") == tracebacks0


@pytest.mark.usefixtures("peer_a_restored")
def test_rows_larger_than_the_mtu_are_skipped_unread(any_lab: LabHandle) -> None:
    """Many maximum-size rows, a 1500-byte MTU: none of their data reaches the agent."""
    assert any_lab.status()["mtu"] == 1500
    assert_rows_cost_no_memory(any_lab)
    # the downlink, not the TUN check, skipped them: their data never left the database
    last_report = agent_log(any_lab, "peer-b", 5).rsplit(BAD_ROWS_LOG, 1)[1]
    assert f"{ROW_MAX}-byte row exceeds the MTU of 1500 (not fetched)" in last_report


@pytest.mark.slow
@pytest.mark.usefixtures("peer_a_restored")
def test_a_batch_is_bounded_in_bytes_at_the_largest_mtu(any_lab: LabHandle) -> None:
    """The same rows where each fits the MTU: fetched, but never a batch's worth at once."""
    any_lab.cli("up", "--mtu", str(ROW_MAX))
    try:
        assert_rows_cost_no_memory(any_lab)
    finally:
        any_lab.cli("up", "--mtu", "1500")


def assert_rows_cost_no_memory(lab: LabHandle) -> None:
    """peer-a logs ROWS maximum-size rows that are not packets; peer-b skips them all."""
    lab_cli(lab, "stop", "peer-a")  # nothing else writes peer-a's stream meanwhile
    first = last_seq(lab, "peer-a") + 1
    reported0 = counted_warnings(agent_log(lab, "peer-b", 100_000), BAD_ROWS_LOG)
    tracebacks0 = tracebacks(lab, "peer-b")
    before = agent_memory(lab, "peer-b", reset=True)
    log_as(lab, "peer-a", "peer-b", first,
           [b"\x45" + bytes([i % 251]) * (ROW_MAX - 1) for i in range(ROWS)])
    wait_read_past(lab, "peer-b", "peer-a", first + ROWS - 1)
    after = agent_memory(lab, "peer-b")
    wait_for(lambda: counted_warnings(agent_log(lab, "peer-b", 100_000), BAD_ROWS_LOG)
             - reported0 == ROWS, "peer-b to report every row it skipped")
    print(f"peer-b agent memory: {before.rss_mb:.1f} MB before, peak {after.peak_mb:.1f} MB "
          f"while skipping {ROWS} rows of {ROW_MAX} bytes, {after.rss_mb:.1f} MB after")
    assert after.pid == before.pid  # the same agent, still running
    assert after.peak_mb - before.rss_mb < MEMORY_SLACK_MB, (before, after)
    assert cursor(lab, "peer-b", "peer-a") == first + ROWS - 1  # past them, once
    assert tracebacks(lab, "peer-b") == tracebacks0
