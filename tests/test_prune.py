"""Integration: partitions and pruning (the log product's only way to drop rows).

Only the owner drops an expired partition (agents cannot); finer partitions fill gaps;
a prune while iperf3 runs drops only old partitions and loses no row. Then `pgvpn
prune` at its edges: a dry run drops nothing; without --older-than the stored policy
is the age; a second prune while one is at work is refused; a peer or reader is
refused; and a partition left "detach pending" by an interrupted prune (DETACH ...
CONCURRENTLY cancelled between its two transactions) is finished with FINALIZE and
dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from lab.measure import iperf
from pgvpn.logs.retention import PRUNE_LOCK
from tests.conftest import CliBackend, LabHandle
from tests.peerside import connect_as, peer_conninfo, wait_for
from tests.test_log_tools import PEER_B, db_now


def test_only_the_owner_drops_an_expired_partition(netns_lab: LabHandle) -> None:
    """Dropping a partition locks the whole log: a peer that could, could hold that lock
    and stop the tunnel (sql/008). Agents keep partitions ahead and drop nothing; the
    owner's `pgvpn prune` applies the stored policy."""
    old = (db_now(netns_lab) - timedelta(days=60)).date()
    name = f"packets_{old:%Y%m%d}"
    with psycopg.connect(netns_lab.conninfo(), autocommit=True) as owner, \
            connect_as(netns_lab, "peer-a") as peer:
        make_old_partition(owner, name, old, rows=10)
        owner.execute("UPDATE pgvpn.log_settings SET retention = '30 days'")
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                peer.execute(f"DROP TABLE pgvpn.{name}")
            with pytest.raises(psycopg.errors.UndefinedFunction):
                peer.execute("SELECT pgvpn.apply_retention()")  # gone since sql/008
            peer.execute("SELECT pgvpn.ensure_partitions()")  # an agent's maintenance
            assert f"pgvpn.{name}" in partitions(netns_lab)
            pruned = netns_lab.pgvpn("prune").stdout.decode()
        finally:
            owner.execute("UPDATE pgvpn.log_settings SET retention = NULL")
    assert f"dropped pgvpn.{name}" in pruned
    assert f"pgvpn.{name}" not in partitions(netns_lab)


def test_finer_partitions_fill_gaps_without_overlaps(netns_lab: LabHandle) -> None:
    with psycopg.connect(netns_lab.conninfo()) as conn, conn.transaction(force_rollback=True):
        conn.execute("UPDATE pgvpn.log_settings SET partition_step = '1 hour', "
                     "partitions_ahead = '4 days'")
        assert conn.execute("SELECT pgvpn.ensure_partitions()").fetchone()[0] > 0  # type: ignore[index]
        ranges = conn.execute("SELECT range_from, range_to FROM pgvpn.log_partitions "
                              "WHERE range_to > now()").fetchall()
        horizon = conn.execute("SELECT now() + interval '4 days'").fetchone()[0]  # type: ignore[index]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous
    assert ranges[-1][1] >= horizon
    hourly = [r for r in ranges if r[1] - r[0] == timedelta(hours=1)]
    assert hourly and all(r[0] >= ranges[0][0] + timedelta(days=3) for r in hourly)


def make_old_partition(conn: psycopg.Connection, name: str, day: Any, rows: int,
                       sender: str = "old-peer") -> None:
    """As the owner: a partition for a past day, holding `rows` copies of a logged packet."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS pgvpn.{name} PARTITION OF pgvpn.packets "
                 f"FOR VALUES FROM ('{day}') TO ('{day + timedelta(days=1)}')")
    conn.execute(
        "INSERT INTO pgvpn.packets (logged_at, sender, seq, receiver, length, data) "
        "SELECT %s::date + make_interval(secs => g), %s, g, 'peer-b', 84, "
        "decode(repeat('45', 84), 'hex') FROM generate_series(1, %s) g", [day, sender, rows])


def clock(lab: LabHandle) -> Any:
    """The database's wall clock now (now() would be the transaction's start)."""
    return lab.sql("SELECT clock_timestamp()")[0][0]


def test_prune_drops_only_old_partitions_while_iperf3_runs(netns_lab: LabHandle) -> None:
    today = db_now(netns_lab).date()
    old, older = today - timedelta(days=20), today - timedelta(days=30)
    with psycopg.connect(netns_lab.conninfo(), autocommit=True) as conn:
        make_old_partition(conn, f"packets_{older:%Y%m%d}", older, rows=500)
        # a peer whose newest packet is old: its partition must stay (seq resumes there)
        conn.execute("INSERT INTO pgvpn.peers (name) VALUES ('idle-peer') ON CONFLICT DO NOTHING")
        make_old_partition(conn, f"packets_{old:%Y%m%d}", old, rows=50, sender="idle-peer")
    before = dict(netns_lab.sql("SELECT sender, max(seq) FROM pgvpn.packets "
                                "WHERE sender IN ('peer-a', 'peer-b') GROUP BY sender"))

    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.update(iperf=iperf(
        CliBackend(netns_lab), server="peer-b", address=PEER_B, client="peer-a", duration=4)))
    load.start()
    time.sleep(1.0)  # prune in the middle of the transfer
    started = clock(netns_lab)
    pruned = netns_lab.pgvpn("prune", "--older-than", "7d")
    ended = clock(netns_lab)
    assert load.is_alive(), "the prune did not finish while iperf3 was still sending"
    load.join(timeout=60)

    report = pruned.stdout.decode()
    assert f"dropped pgvpn.packets_{older:%Y%m%d}" in report
    assert f"kept pgvpn.packets_{old:%Y%m%d}: holds the newest packet of idle-peer" in report
    assert "dropped 1 partition(s)" in report
    # The tunnel kept carrying the stream while the prune ran: iperf3 finished without an
    # error (it raises otherwise), its receiver saw bytes in every second, and peer-a's
    # uplink committed batches inside the prune's window (a batch's logged_at is when
    # its transaction began, so one batch blocked for the whole prune would show as one
    # value, not several).  How fast is the bench's business, not a test's.
    assert all(second["mbps"] > 0 for second in result["iperf"].intervals), result["iperf"]
    (commits,), = netns_lab.sql(
        "SELECT count(DISTINCT logged_at) FROM pgvpn.packets "
        "WHERE sender = 'peer-a' AND logged_at BETWEEN %s AND %s", [started, ended])
    assert commits >= 2, f"peer-a committed {commits} batch(es) while the prune ran"

    netns_lab.wait_settled()
    names = {r[0] for r in netns_lab.sql("SELECT partition::text FROM pgvpn.log_partitions")}
    assert f"pgvpn.packets_{older:%Y%m%d}" not in names
    assert netns_lab.sql("SELECT count(*) FROM pgvpn.packets WHERE sender = 'old-peer'") == [
        (0,)]
    # nothing newer is lost: every sender's numbering is still gap-free, and every row
    # that existed before the prune is still there
    for sender, last_before in before.items():
        (low, high, count), = netns_lab.sql(
            "SELECT min(seq), max(seq), count(*) FROM pgvpn.packets WHERE sender = %s",
            [sender])
        assert count == high - low + 1 and high > last_before
    ahead = netns_lab.sql("SELECT max(range_to) - now() FROM pgvpn.log_partitions")[0][0]
    assert ahead >= timedelta(days=2)  # partitions ahead untouched (and topped up)

    with psycopg.connect(netns_lab.conninfo(), autocommit=True) as conn:  # tidy up
        conn.execute("DELETE FROM pgvpn.peers WHERE name = 'idle-peer'")
        conn.execute(f"DROP TABLE pgvpn.packets_{old:%Y%m%d}")





def partitions(lab: LabHandle) -> set[str]:
    return {str(name) for (name,) in lab.sql("SELECT partition::text FROM pgvpn.log_partitions")}


@pytest.fixture
def old_day(netns_lab: LabHandle) -> Iterator[tuple[LabHandle, date, str]]:
    """A partition 40 days old with 20 rows of a peer no agent runs; gone afterwards."""
    day = db_now(netns_lab).date() - timedelta(days=40)
    name = f"packets_{day:%Y%m%d}"
    with psycopg.connect(netns_lab.conninfo(), autocommit=True) as conn:
        make_old_partition(conn, name, day, rows=20)
    try:
        yield netns_lab, day, f"pgvpn.{name}"
    finally:
        with psycopg.connect(netns_lab.conninfo(), autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS pgvpn.{name}")
            conn.execute("UPDATE pgvpn.log_settings SET retention = NULL")


def test_a_dry_run_names_what_would_go_and_drops_nothing(
        old_day: tuple[LabHandle, date, str]) -> None:
    lab, _, name = old_day
    rows = lab.sql("SELECT count(*) FROM pgvpn.packets")[0][0]
    report = lab.pgvpn("prune", "--older-than", "30d", "--dry-run").stdout.decode()
    assert f"would drop {name} (" in report and "would drop 1 partition(s)" in report
    assert name in partitions(lab)
    assert lab.sql("SELECT count(*) FROM pgvpn.packets")[0][0] >= rows


def test_without_older_than_the_stored_policy_is_the_age(
        old_day: tuple[LabHandle, date, str]) -> None:
    lab, _, name = old_day
    lab.sql("UPDATE pgvpn.log_settings SET retention = NULL")
    refused = lab.pgvpn("prune", check=False)
    assert refused.returncode != 0
    assert b"give --older-than, or set a retention policy first" in refused.stderr
    lab.sql("UPDATE pgvpn.log_settings SET retention = '50 days'")
    kept = lab.pgvpn("prune").stdout.decode()
    assert "dropped 0 partition(s)" in kept and name in partitions(lab)  # 40 < 50 days
    lab.sql("UPDATE pgvpn.log_settings SET retention = '35 days'")
    dropped = lab.pgvpn("prune").stdout.decode()
    assert f"dropped {name} (" in dropped and name not in partitions(lab)


def test_a_second_prune_is_refused_while_one_is_at_work(
        old_day: tuple[LabHandle, date, str]) -> None:
    lab, _, name = old_day
    with psycopg.connect(lab.conninfo(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [PRUNE_LOCK])
        refused = lab.pgvpn("prune", "--older-than", "30d", check=False)
    assert refused.returncode == 2, refused
    assert refused.stderr.decode().strip().splitlines() == [
        "pgvpn: error: another 'pgvpn prune' is at work on this database: try again in a "
        "moment"]
    assert name in partitions(lab)


@pytest.mark.parametrize("who", ["peer", "reader"])
def test_only_the_owner_prunes(old_day: tuple[LabHandle, date, str], who: str) -> None:
    lab, _, name = old_day
    if who == "peer":
        url = peer_conninfo(lab, "peer-a")
    else:
        lab.sql("CREATE ROLE prune_reader LOGIN PASSWORD 'prune-reader' IN ROLE pgvpn_reader",
                superuser=True)
        params = conninfo_to_dict(lab.conninfo())
        params.update(user="prune_reader", password="prune-reader")
        url = make_conninfo(**params)
    try:
        done = lab.pgvpn("prune", "--older-than", "30d", "--database-url", url, check=False)
    finally:
        if who == "reader":
            lab.sql("DROP ROLE prune_reader", superuser=True)
    assert done.returncode == 2, done
    assert done.stderr.decode().strip().splitlines() == [
        "pgvpn: error: pgvpn prune must run as the owner of the pgvpn schema (the only role "
        "that drops partitions)"]
    assert name in partitions(lab)


def test_an_interrupted_detach_is_finished_and_dropped(
        old_day: tuple[LabHandle, date, str]) -> None:
    """DETACH ... CONCURRENTLY commits "detach pending", then waits for older snapshots;
    cancelled there (an operator's ^C, a lost connection), the partition stays half
    detached. The next prune must FINALIZE it, then drop it."""
    lab, _, name = old_day
    owner = lab.conninfo()
    with psycopg.connect(owner) as reader, psycopg.connect(owner, autocommit=True) as watch:
        # an open transaction that holds a lock on the log: the detach's second
        # transaction waits for every such locker to finish
        reader.execute("SELECT count(*) FROM pgvpn.packets WHERE false").fetchone()
        detacher = psycopg.connect(owner, autocommit=True)
        pid = detacher.info.backend_pid
        failed: list[BaseException] = []

        def detach() -> None:
            try:
                detacher.execute(f"ALTER TABLE pgvpn.packets DETACH PARTITION {name} "
                                 "CONCURRENTLY")
            except psycopg.errors.QueryCanceled as exc:
                failed.append(exc)

        worker = threading.Thread(target=detach)
        worker.start()
        wait_for(lambda: watch.execute(
            "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = %s::regclass",
            [name]).fetchone() == (True,), "the detach to be pending", timeout=30)
        watch.execute("SELECT pg_cancel_backend(%s)", [pid])
        worker.join(timeout=30)
        detacher.close()
        assert failed, "the detach was not cancelled"
    pending = lab.sql("SELECT detach_pending FROM pgvpn.log_partitions WHERE partition = "
                      "%s::regclass", [name])
    assert pending == [(True,)]
    done = lab.pgvpn("prune", "--older-than", "30d")
    assert f"finishing the interrupted detach of {name}" in done.stderr.decode()
    assert f"dropped {name} (" in done.stdout.decode()
    assert name not in partitions(lab)
    assert lab.sql("SELECT to_regclass(%s)", [name]) == [(None,)]
