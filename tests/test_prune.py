"""Integration: `pgvpn prune` at its edges (the log product's only way to drop rows).

A dry run drops nothing; without --older-than the stored policy is the age; a second
prune while one is at work is refused; a peer or reader is refused; and a partition
left "detach pending" by an interrupted prune (DETACH ... CONCURRENTLY cancelled
between its two transactions) is finished with FINALIZE and dropped. The prune while
iperf3 runs is in tests/test_log_tools.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date, timedelta

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import LabHandle
from tests.peerside import peer_conninfo, wait_for
from tests.test_log_tools import db_now, make_old_partition

PRUNE_LOCK = "pgvpn.prune"


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
        "pgvpn: error: another 'pgvpn prune', or an agent applying the retention policy, "
        "is at work on this database: try again in a moment"]
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
        "pgvpn: error: pgvpn prune must run as the owner of the pgvpn schema (agents apply "
        "the retention policy themselves)"]
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
