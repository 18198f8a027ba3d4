"""Pure tests: which database errors a reconnect cures, and how the data path retries."""

from __future__ import annotations

import itertools
import socket

import psycopg
import pytest

from pgvpn import db
from pgvpn.db import Outcome
from pgvpn.errors import DatabaseError
from pgvpn.transports.base import APPLICATION_NAME_MAX, application_name


@pytest.mark.parametrize(("error", "outcome"), [
    (psycopg.OperationalError("consuming input failed: Connection timed out"), Outcome.LOST),
    (psycopg.OperationalError("the connection is closed"), Outcome.LOST),
    (psycopg.errors.ConnectionFailure("08006"), Outcome.LOST),
    (psycopg.errors.AdminShutdown("terminated by administrator command"), Outcome.LOST),
    (psycopg.errors.CrashShutdown("crash"), Outcome.LOST),
    (psycopg.errors.CannotConnectNow("starting up"), Outcome.LOST),
    # a write on a hot standby: a demoted primary, or a host reached without
    # target_session_attrs=read-write; a connection to the primary cures it
    (psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only "
                                           "transaction"), Outcome.LOST),
    (psycopg.errors.QueryCanceled("statement timeout"), Outcome.RETRY),
    (psycopg.errors.LockNotAvailable("lock timeout"), Outcome.RETRY),
    (psycopg.errors.SerializationFailure("40001"), Outcome.RETRY),
    (psycopg.errors.DeadlockDetected("40P01"), Outcome.RETRY),
    (psycopg.errors.DiskFull("53100"), Outcome.BACKOFF),
    (psycopg.errors.OutOfMemory("53200"), Outcome.BACKOFF),
    (psycopg.errors.TooManyConnections("53300"), Outcome.BACKOFF),
    (psycopg.errors.ProgramLimitExceeded("54000"), Outcome.FATAL),
    (psycopg.errors.InsufficientPrivilege("42501"), Outcome.FATAL),
    (psycopg.errors.UndefinedTable("42P01"), Outcome.FATAL),
    (psycopg.errors.CheckViolation("no partition for the row"), Outcome.FATAL),
])
def test_errors_are_sorted_by_sqlstate_not_by_exception_class(
        error: psycopg.Error, outcome: Outcome) -> None:
    # several of these are OperationalErrors that a reconnect cannot cure
    assert db.classify(error) is outcome
    assert db.is_connection_lost(error) is (outcome is Outcome.LOST)


class Script:
    """An action that raises the given errors in turn, then returns 'done'."""

    def __init__(self, *errors: psycopg.Error) -> None:
        self.errors = list(errors)
        self.events: list[str] = []

    def action(self) -> str:
        self.events.append("action")
        if self.errors:
            raise self.errors.pop(0)
        return "done"

    def reconnect(self) -> None:
        self.events.append("reconnect")


def run(script: Script, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    sleeps: list[float] = []
    monkeypatch.setattr(db.time, "sleep", lambda s: (sleeps.append(s), script.events.append(
        f"sleep {s}")))
    assert db.retry_forever(script.action, what="test", should_stop=lambda: False,
                            on_lost=script.reconnect) == "done"
    return sleeps


def test_the_first_reconnect_is_at_once_then_it_backs_off(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    script = Script(lost, lost, lost, lost, lost, lost)
    sleeps = run(script, monkeypatch)
    assert script.events[:3] == ["action", "sleep 0.0", "reconnect"]
    assert sleeps[:3] == [0.0, db.BACKOFF_FIRST, 2 * db.BACKOFF_FIRST]
    assert sleeps[-1] == db.BACKOFF_MAX and sleeps == sorted(sleeps)
    assert script.events.count("reconnect") == 6


def test_transient_errors_retry_the_statement_on_the_same_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(psycopg.errors.QueryCanceled("statement timeout"),
                    psycopg.errors.DeadlockDetected("deadlock"))
    sleeps = run(script, monkeypatch)
    assert "reconnect" not in script.events
    assert sleeps == [0.0, db.BACKOFF_FIRST]


def test_insufficient_resources_back_off_loudly_without_reconnecting(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    script = Script(psycopg.errors.DiskFull("could not extend file: No space left on device"))
    sleeps = run(script, monkeypatch)
    assert "reconnect" not in script.events
    assert sleeps == [db.BACKOFF_FIRST]
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "the database lacks resources (could not extend file" in caplog.text


def test_fatal_errors_propagate_without_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(psycopg.errors.ProgramLimitExceeded("row is too big"))
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        run(script, monkeypatch)
    assert script.events == ["action"]


def test_application_name_keeps_the_instance_mark_of_a_long_peer_name() -> None:
    longest = "p" * 57  # config.PEER_NAME allows 57 characters
    for role in ("control", "uplink", "downlink", "listener", "uplink 12"):
        name = application_name(longest, role, "0123abcd")
        assert len(name.encode()) <= APPLICATION_NAME_MAX
        assert name.startswith("pgvpn ppp") and name.endswith(f" {role} 0123abcd")
    assert application_name("peer-a", "uplink", "0123abcd") == "pgvpn peer-a uplink 0123abcd"


def test_explanations_blame_the_path_only_for_a_dead_connection() -> None:
    lock = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
    assert db.explain(lock) == "canceling statement due to lock timeout"
    dead = psycopg.OperationalError("consuming input failed: could not receive data from "
                                    "server: Connection timed out\nSSL SYSCALL error: "
                                    "Connection timed out")
    assert db.explain(dead).endswith("(the server stopped answering: check the network "
                                     "path to it)")
    # a session the server ended (a failover, pg_terminate_backend) says nothing of TLS
    ended = psycopg.OperationalError("consuming input failed: SSL connection has been closed "
                                     "unexpectedly")
    assert db.explain(ended) == "consuming input failed: SSL connection has been closed " \
        "unexpectedly"


def test_a_write_on_a_standby_says_the_agent_needs_the_primary() -> None:
    standby = psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute INSERT in a read-only transaction")
    assert db.explain(standby) == (
        "cannot execute INSERT in a read-only transaction (a read-only server such as a hot "
        "standby: the agent writes, so it needs the primary; name every node in PGHOST)")
    for said in ("session is read-only", "server is in hot standby mode"):
        refused = psycopg.OperationalError(f'connection to server at "10.232.1.20", port 5432 '
                                           f'failed: {said}')
        assert db.explain(refused).startswith(f"{said} (a read-only server such as a hot")
    starting = psycopg.OperationalError("the database system is not yet accepting "
                                        "connections DETAIL: Hot standby mode is disabled.")
    assert "read-only" not in db.explain(starting)


def test_a_failover_longer_than_a_minute_is_waited_out_one_line_a_try(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The new primary answers only after 90 s: until then every statement finds the
    connection closed and every reconnect fails. The loop neither gives up nor
    hammers: its waits grow to BACKOFF_MAX and stay there, and each try logs one line."""
    clock = [0.0]
    monkeypatch.setattr("pgvpn.db.time.sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    tries: list[float] = []

    def action() -> str:
        if clock[0] < 90:
            raise psycopg.OperationalError("the connection is closed")
        return "done"

    def reconnect() -> None:
        tries.append(clock[0])
        clock[0] += 2  # each attempt pays a connect_timeout
        if clock[0] < 90:
            raise DatabaseError("cannot connect to u@10.232.1.10,10.232.1.20:5432/pgvpn after "
                                "1 attempt(s): every host failed: ...")

    assert db.retry_forever(action, what="uplink", should_stop=lambda: False,
                            on_lost=reconnect) == "done"
    assert clock[0] >= 90 and len(tries) > 15
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert max(gaps) <= 2 + db.BACKOFF_MAX and gaps[-1] == 2 + db.BACKOFF_MAX
    lines = [r.getMessage() for r in caplog.records]
    assert all("\n" not in line for line in lines)
    assert sum("uplink: database connection lost" in line for line in lines) == len(tries)
    assert sum("uplink: reconnect failed: cannot connect" in line for line in lines) == \
        len(tries) - 1


@pytest.mark.parametrize(("hosts", "longest"), [("127.0.0.1", db.BACKOFF_MAX),
                                                 ("127.0.0.1,127.0.0.2", db.BACKOFF_FIRST)])
def test_a_replicated_database_is_retried_without_growing_waits(
        monkeypatch: pytest.MonkeyPatch, hosts: str, longest: float) -> None:
    """With several hosts, a new primary is taken the moment it is promoted: the wait
    between attempts stays short (a dead host's connect_timeout paces them)."""
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    monkeypatch.setattr(db.time, "sleep", sleeps.append)
    ports = ",".join([str(port)] * len(hosts.split(",")))
    with pytest.raises(DatabaseError):
        db.connect(f"host={hosts} port={ports} dbname=x user=x connect_timeout=2",
                   attempts=6)
    assert sleeps[0] == db.BACKOFF_FIRST and max(sleeps) == longest
