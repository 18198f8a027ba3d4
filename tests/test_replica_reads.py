"""`--replica`: the log tools read a hot standby, so that analysing the log does not
load the primary (issue 12, docs/ha-plan.md §6 step 8).

Against a real primary and streaming standby made here (tests/pgpair.py, no Patroni):
the standby's answers equal the primary's for a closed window once it has replayed
everything, the reads really happen on the standby, a missing standby is one clear
error, and the commands that write refuse --replica.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from lab import logtools
from pgvpn import bootstrap
from pgvpn.logs.replica import CANCELLED, hosts_tried
from tests.conftest import ROOT, TEST_LAB, LabHandle
from tests.pgpair import Pair, make_pair, unavailable
from tests.test_log_tools import CRAFTED

ROUNDS = 15  # CRAFTED is 11 packets: 165 per sender
NO_STANDBY = "no standby answered: tried "


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no throwaway primary and standby here: {reason}")
    # a short delay, so that the conflict test needs no 30 s (the default)
    made = make_pair(TEST_LAB, ("max_standby_streaming_delay = 1s",))
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="module")
def window(pair: Pair) -> tuple[datetime, datetime]:
    """Packets of both peers logged in a window that is closed when this returns."""
    with psycopg.connect(pair.primary.conninfo(), autocommit=True) as conn:
        since = clock(conn)
        with conn.cursor() as cur, cur.copy(
                "COPY pgvpn.packets (sender, seq, receiver, length, data) FROM STDIN") as copy:
            for round_ in range(ROUNDS):
                for index, (packet, _) in enumerate(CRAFTED):
                    seq = round_ * len(CRAFTED) + index + 1
                    for sender, receiver in (("peer-a", "peer-b"), ("peer-b", "peer-a")):
                        copy.write_row([sender, seq, receiver, len(packet), packet])
        until = clock(conn)
    pair.wait_replayed()
    return since, until


def clock(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def pgvpn(*argv: str, url: str = "", replica_url: str = "", stdout: Any = subprocess.PIPE,
          ) -> subprocess.CompletedProcess[bytes]:
    """`pgvpn` with DATABASE_URL (and PGVPN_REPLICA_URL) as given, no other PG* variable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in ("DATABASE_URL",)}
    env |= {"DATABASE_URL": url, **({"PGVPN_REPLICA_URL": replica_url} if replica_url else {})}
    return subprocess.run([sys.executable, "-m", "pgvpn.cli", *argv], stdout=stdout,
                          stderr=subprocess.PIPE, env=env, cwd=ROOT, check=False, timeout=120)


def both_nodes(pair: Pair) -> str:
    """Every node, the primary first, as a cluster's DATABASE_URL would list them."""
    nodes = (pair.primary, pair.standby)
    return make_conninfo(host=",".join(str(n.sockets) for n in nodes),
                         port=",".join(str(n.port) for n in nodes),
                         user=bootstrap.OWNER, dbname="pgvpn")


def standby_said(pair: Pair, stderr: bytes, command: str) -> str:
    """The one line naming the standby that was read; the rest of stderr is returned."""
    first, _, rest = stderr.decode().partition("\n")
    assert first.startswith(f"pgvpn {command}: reading standby {pair.standby.sockets}:"
                            f"{pair.standby.port}: WAL replayed to "), stderr
    assert ("last replayed commit" in first or "no commit replayed" in first), first
    assert "PAUSED" not in first, first
    return rest


READS = [
    ["log", "-n", "0", "--json", "--data"],
    ["log", "-n", "7"],
    ["log", "--proto", "tcp", "--peer", "peer-a", "-n", "0"],
    ["stats", "--json", "--top", "50"],
    ["stats", "--by", "host"],
    ["stats", "--by", "peer", "--json"],
    ["export", "--pcap", "-"],
]


@pytest.mark.parametrize("argv", READS, ids=[" ".join(a[:3]) for a in READS])
def test_a_replayed_standby_answers_as_the_primary(pair: Pair, argv: list[str],
                                                  window: tuple[datetime, datetime]) -> None:
    closed = ["--since", window[0].isoformat(), "--until", window[1].isoformat()]
    primary = pgvpn(*argv, *closed, url=pair.primary.conninfo())
    assert primary.returncode == 0, primary.stderr
    read = pgvpn(*argv, *closed, "--replica", url=both_nodes(pair))
    assert read.returncode == 0, read.stderr
    assert read.stdout == primary.stdout
    rest = standby_said(pair, read.stderr, argv[0])
    assert rest == primary.stderr.decode()  # on the primary, no word about any standby
    if argv[0] != "export":
        assert primary.stderr == b""
    if argv[:2] == ["log", "-n"] and argv[2] == "0":  # every row, none missing on either
        assert len(primary.stdout.splitlines()) == 2 * ROUNDS * len(CRAFTED)
    assert len(primary.stdout) > 300  # something was read: not two empty answers


def test_the_standby_is_what_is_read(pair: Pair, window: tuple[datetime, datetime]) -> None:
    """With replay paused, rows the primary logs since are missing from --replica's
    answer, and its stderr line says that replay is paused."""
    superuser = pair.standby.conninfo("postgres", "postgres")
    with psycopg.connect(superuser, autocommit=True) as standby:
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            with psycopg.connect(pair.primary.conninfo(), autocommit=True) as conn:
                conn.execute("INSERT INTO pgvpn.packets (sender, seq, receiver, length, data) "
                             "VALUES ('peer-a', 100000, 'peer-b', 20, %s)",
                             [b"\x45" + bytes(19)])
            primary = pgvpn("log", "--sender", "peer-a", "-n", "1", "--json",
                            url=pair.primary.conninfo())
            read = pgvpn("log", "--sender", "peer-a", "-n", "1", "--json", "--replica",
                         url=both_nodes(pair))
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
    assert b'"seq": 100000' in primary.stdout
    assert read.returncode == 0, read.stderr
    assert b'"seq": 100000' not in read.stdout and b'"seq": ' in read.stdout
    line = read.stderr.decode()
    assert line.count("\n") == 1 and f"{pair.standby.sockets}:{pair.standby.port}" in line
    assert "replay PAUSED" in line
    pair.wait_replayed()
    again = pgvpn("log", "--sender", "peer-a", "-n", "1", "--json", "--replica",
                  url=both_nodes(pair))
    assert again.stdout == primary.stdout


def test_the_replica_url_variable_and_the_typed_url(pair: Pair, window: Any) -> None:
    """$PGVPN_REPLICA_URL is where --replica reads, unless --database-url is typed."""
    read = pgvpn("stats", "--replica", url=pair.primary.conninfo(),
                 replica_url=pair.standby.conninfo())
    assert read.returncode == 0, read.stderr
    standby_said(pair, read.stderr, "stats")
    typed = pgvpn("stats", "--replica", "--database-url", pair.primary.conninfo(),
                  replica_url=pair.standby.conninfo())
    assert typed.returncode == 2 and NO_STANDBY in typed.stderr.decode()
    plain = pgvpn("stats", url=pair.primary.conninfo(), replica_url=pair.standby.conninfo())
    assert plain.returncode == 0 and plain.stderr == b""  # without --replica: unused
    bad = pgvpn("stats", "--replica", url=pair.primary.conninfo(), replica_url="no such thing")
    assert bad.stderr.decode() == ("pgvpn: error: $PGVPN_REPLICA_URL is not a valid libpq "
                                   "connection string or URL (not shown, as it may hold a "
                                   "password)\n")


def test_no_standby_is_one_line_naming_the_hosts_tried(pair: Pair) -> None:
    only_primary = pgvpn("log", "--replica", url=pair.primary.conninfo())
    assert only_primary.returncode == 2 and only_primary.stdout == b""
    said = only_primary.stderr.decode()
    assert said.count("\n") == 1 and "Traceback" not in said, said
    assert said.startswith(f"pgvpn: error: {NO_STANDBY}{pair.primary.sockets}:"
                           f"{pair.primary.port} (server is not in hot standby mode): "
                           "a standby must answer for --replica"), said

    pair.standby.stop()  # both listed, the standby down: libpq must not fall back
    try:
        down = pgvpn("export", "--pcap", "-", "--replica", url=both_nodes(pair))
    finally:
        pair.standby.start()
    said = down.stderr.decode()
    assert down.returncode == 2 and said.count("\n") == 1, said
    assert (f"{NO_STANDBY}{pair.primary.sockets}:{pair.primary.port}, "
            f"{pair.standby.sockets}:{pair.standby.port} (") in said
    assert "server is not in hot standby mode" in said and "No such file" in said


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--replica"], "pgvpn prune drops partitions: it writes, so it runs on the "
                             "primary; drop --replica"),
    (["prune", "--replica", "--older-than", "7d", "--dry-run"], "pgvpn prune drops"),
    (["retention", "--replica", "--keep", "7d"], "changing the retention policy writes"),
    (["retention", "--replica", "--ahead", "4d"], "changing the retention policy writes"),
    (["replay", "--replica", "--input", "/dev/null"], "--replica chooses the database to read; "
                                                     "with --input the file is read instead"),
])
def test_commands_that_write_refuse_replica_before_connecting(argv: list[str],
                                                              message: str) -> None:
    done = pgvpn(*argv, url="host=/nonexistent")
    said = done.stderr.decode()
    assert done.returncode == 2 and said.count("\n") == 1, said
    assert said.startswith(f"pgvpn: error: {message}"), said
    assert "connect" not in said


def test_reading_tools_on_the_standby(pair: Pair, window: tuple[datetime, datetime]) -> None:
    """retention shows the standby's policy; replay selects its slice there."""
    shown = pgvpn("retention", "--replica", url=both_nodes(pair))
    assert shown.returncode == 0 and shown.stdout.startswith(b"retention:        forever\n")
    standby_said(pair, shown.stderr, "retention")
    replay = pgvpn("replay", "--replica", "--dry-run", "--since", window[0].isoformat(),
                   "--until", window[1].isoformat(), "--max", "1000", url=both_nodes(pair))
    rest = standby_said(pair, replay.stderr, "replay")
    assert rest.startswith(f"would replay {2 * ROUNDS * len(CRAFTED)} packets"), rest


def test_help_says_what_replica_reads() -> None:
    for command in ("log", "stats", "export"):
        text = " ".join(pgvpn(command, "--help").stdout.decode().split())
        assert "--replica read from a hot standby, not the primary" in text
        assert "target_session_attrs=standby" in text and "$PGVPN_REPLICA_URL" in text
        assert "max_standby_streaming_delay" in text


def test_a_prune_on_the_primary_cancels_a_long_standby_read(pair: Pair) -> None:
    """The documented risk: replaying a dropped partition waits for a standby query that
    reads it only max_standby_streaming_delay (1 s here), then cancels it. The export
    says so in one line."""
    with psycopg.connect(pair.primary.conninfo(), autocommit=True) as conn:
        day = clock(conn).date() - timedelta(days=60)
        conn.execute(f"CREATE TABLE pgvpn.packets_{day:%Y%m%d} PARTITION OF pgvpn.packets "
                     f"FOR VALUES FROM ('{day}') TO ('{day + timedelta(days=1)}')")
        conn.execute("INSERT INTO pgvpn.packets (logged_at, sender, seq, receiver, length, "
                     "data) SELECT %s::date + make_interval(secs => g), 'old-peer', g, "
                     "'peer-b', 200, decode(repeat('45', 200), 'hex') "
                     "FROM generate_series(1, 20000) g", [day])
    pair.wait_replayed()
    # stdout is left unread, so the export stops mid-way holding its snapshot and locks
    export = subprocess.Popen(
        [sys.executable, "-m", "pgvpn.cli", "export", "--replica", "--pcap", "-",
         "--since", f"{day}", "--until", f"{day + timedelta(days=1)}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "DATABASE_URL": pair.standby.conninfo()})
    try:
        watch = pair.standby.conninfo("postgres", "postgres")
        deadline = time.monotonic() + 30
        with psycopg.connect(watch, autocommit=True) as standby:
            while not standby.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgvpn export' "
                    "AND state = 'idle in transaction'").fetchone():
                assert export.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        pruned = pgvpn("prune", "--older-than", "30d", url=pair.primary.conninfo())
        assert pruned.returncode == 0, pruned.stderr
        assert f"pgvpn.packets_{day:%Y%m%d}" in pruned.stdout.decode()
        pair.wait_replayed()  # only once the standby cancelled the export
        out, err = export.communicate(timeout=60)
    finally:
        if export.poll() is None:
            export.kill()
            export.wait(timeout=10)
    assert export.returncode == 2
    assert err.decode().splitlines()[-1] == f"pgvpn: error: {CANCELLED}"
    assert len(out) < 20000 * 200  # cut short


# -------------------------------------------------------------- lab wrappers
class _OneNode:
    def admin_conninfo(self, dbname: str = "pgvpn", *, superuser: bool = False) -> str:
        return "host=/run/db port=5432 user=pgvpn_owner target_session_attrs=read-write"


class _Cluster:
    def admin_conninfo(self, dbname: str = "pgvpn", *, superuser: bool = False,
                       replica: bool = False) -> str:
        return f"host=/a,/b port=1,2 user=pgvpn_owner target_session_attrs={replica}"


def test_lab_standby_conninfo_asks_for_a_standby_with_or_without_replica_support() -> None:
    old = logtools.standby_conninfo(_OneNode())  # type: ignore[arg-type]
    assert "target_session_attrs=standby" in old and "read-write" not in old
    assert hosts_tried(old) == ["/run/db:5432"]
    new = logtools.standby_conninfo(_Cluster())  # type: ignore[arg-type]
    assert "target_session_attrs=standby" in new and hosts_tried(new) == ["/a:1", "/b:2"]


def test_lab_tools_with_replica_and_no_standby(netns_lab: LabHandle) -> None:
    """The one-node lab has no standby: --replica says so in one line (the backend's
    admin_conninfo(replica=True) refuses; without that keyword, libpq finds none)."""
    for argv in (["packets"], ["stats", "--by", "peer"], ["export", "--pcap", "/dev/null"]):
        done = netns_lab.cli(*argv, "--replica", check=False)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("lab: error: ") and "no standby" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    assert netns_lab.cli("stats", "--by", "peer").returncode == 0  # the primary still reads
