"""Integration: a database an earlier pgvpn made as a superuser, with packets in it,
is handed to the owner by `pgvpn db init` and migrated by that owner to the latest
schema, every packet kept.

It runs in a scratch database on the lab's own server, so the lab's log is never
touched; the cluster's roles are shared with the lab (they are the same roles).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn import bootstrap, migrate
from pgvpn.errors import DatabaseError, PgvpnError
from tests.conftest import ROOT, LabHandle
from tests.peerside import peer_conninfo

SCRATCH = "pgvpn_upgrade_probe"
BEFORE_TRUST = 4  # the last migration an earlier pgvpn applied as the superuser


def conninfo_for(lab: LabHandle, *, superuser: bool, dbname: str = SCRATCH) -> str:
    params = conninfo_to_dict(lab.conninfo(superuser=superuser))
    params["dbname"] = dbname
    return make_conninfo(**params)


@pytest.fixture
def old_database(any_lab: LabHandle) -> Iterator[LabHandle]:
    """Migrations 001-004 applied by the superuser, and packets logged, as before 005."""
    any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH}", superuser=True)
    any_lab.sql(f"CREATE DATABASE {SCRATCH}", superuser=True)
    try:
        with psycopg.connect(conninfo_for(any_lab, superuser=True), autocommit=True) as conn:
            for step in migrate.available()[:BEFORE_TRUST]:
                with conn.transaction():
                    conn.execute(step.sql.encode())
                    conn.execute("INSERT INTO pgvpn.schema_migrations (version, name) "
                                 "VALUES (%s, %s)", [step.version, step.name])
            with conn.cursor() as cur, cur.copy(
                    "COPY pgvpn.packets (sender, seq, receiver, length, data) FROM STDIN") as copy:
                for seq in range(1, 51):
                    copy.write_row(["peer-a", seq, "peer-b", 20, b"\x45" + bytes(19)])
        yield any_lab
    finally:
        any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)", superuser=True)


def test_init_hands_an_old_database_to_the_owner_who_migrates_it(old_database: LabHandle
                                                                  ) -> None:
    lab = old_database
    said: list[str] = []
    bootstrap.init_database(conninfo_for(lab, superuser=True, dbname="postgres"), SCRATCH,
                            bootstrap.OWNER, None, said.append)
    assert any("schema pgvpn: owner postgres -> pgvpn_owner" in line for line in said), said
    with psycopg.connect(conninfo_for(lab, superuser=False), autocommit=True) as conn:
        assert migrate.migrate(conn) == migrate.available()[-1].version
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'pgvpn'::regnamespace UNION "
            "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc "
            "WHERE pronamespace = 'pgvpn'::regnamespace").fetchall()
        assert owners == [("pgvpn_owner",)]
        assert conn.execute("SELECT count(*), min(seq), max(seq) FROM pgvpn.packets "
                            "WHERE sender = 'peer-a'").fetchone() == (50, 1, 50)
        unsafe = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE p.pronamespace = 'pgvpn'::regnamespace AND p.prosqlbody IS NULL "
            "AND NOT 'search_path=pg_catalog, pg_temp' = ANY(coalesce(p.proconfig, '{}'))"
            ).fetchall()
        assert unsafe == []
        assert conn.execute("SELECT pgvpn.ensure_partitions()").fetchone() is not None
    # the old superuser-made database allowed TEMPORARY to everyone; now nobody has it
    rows = lab.sql("SELECT has_database_privilege('pgvpn_agent', %s, 'TEMPORARY'), "
                   "has_database_privilege('pgvpn_agent', %s, 'CONNECT')",
                   [SCRATCH, SCRATCH], superuser=True)
    assert rows == [(False, True)]
    # nor may peers take advisory locks there any more (sql/007_own_locks.sql)
    with psycopg.connect(conninfo_for(lab, superuser=True), autocommit=True) as conn:
        assert conn.execute("SELECT has_function_privilege('pgvpn_agent', "
                            "'pg_advisory_lock(bigint)', 'EXECUTE')").fetchone() == (False,)


def test_migrating_without_init_stops_at_the_locks_and_says_who_acts(
        old_database: LabHandle) -> None:
    """Where peers may still take any advisory lock (no `pgvpn db init` was run), 007
    refuses, and the schema stays at the version before it."""
    with psycopg.connect(conninfo_for(old_database, superuser=True), autocommit=True) as conn:
        with pytest.raises(PgvpnError, match=r"migration 007_own_locks refused: peers may "
                           r"still take any advisory lock .*a superuser runs 'pgvpn db init'"):
            migrate.migrate(conn)
        assert migrate.applied_version(conn) == 6
        assert conn.execute("SELECT to_regprocedure('pgvpn.lock_own(text)')").fetchone() == (
            None,)


@pytest.fixture
def new_database(any_lab: LabHandle) -> Iterator[LabHandle]:
    """An empty database made by `pgvpn db init`, for the owner to migrate."""
    any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH}", superuser=True)
    try:
        bootstrap.init_database(conninfo_for(any_lab, superuser=True, dbname="postgres"),
                                SCRATCH, bootstrap.OWNER, None, lambda _: None)
        yield any_lab
    finally:
        any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)", superuser=True)


def test_two_migrators_at_once_apply_each_migration_once(new_database: LabHandle) -> None:
    """Two `pgvpn db migrate` started together (two operators, two deploy jobs): one
    migrates, the other waits for it, finds the schema current, and both succeed."""
    latest = migrate.available()[-1].version
    start = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def migrator(index: int) -> None:
        with psycopg.connect(conninfo_for(new_database, superuser=False),
                             autocommit=True) as conn:
            start.wait(timeout=30)
            try:
                outcomes[index] = migrate.migrate(conn)
            except PgvpnError as exc:
                outcomes[index] = exc

    threads = [threading.Thread(target=migrator, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == {0: latest, 1: latest}
    with psycopg.connect(conninfo_for(new_database, superuser=False)) as conn:
        applied = conn.execute("SELECT version, count(*) FROM pgvpn.schema_migrations "
                               "GROUP BY version ORDER BY version").fetchall()
    assert applied == [(version, 1) for version in range(1, latest + 1)]


def test_an_agent_on_an_old_schema_says_who_must_migrate(old_database: LabHandle) -> None:
    """Agents never migrate: they check the version and name the owner's command."""
    params = conninfo_to_dict(peer_conninfo(old_database, "peer-a"))
    params["dbname"] = SCRATCH
    env = {"PATH": "/usr/bin:/bin", "PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b",
           "TUN_IP": "10.230.0.1/24", "TUN_PEER": "10.230.0.2", "PGVPN_CONNECT_ATTEMPTS": "1",
           "DATABASE_URL": make_conninfo(**params)}
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60, check=False)
    latest = migrate.available()[-1].version
    assert done.returncode == 2, done.stderr
    assert (f"schema is at version {BEFORE_TRUST} but this agent needs {latest}: run "
            "'pgvpn db migrate' as the database owner") in done.stderr
    assert "Traceback" not in done.stderr
    with psycopg.connect(conninfo_for(old_database, superuser=True), autocommit=True) as conn:
        assert conn.execute("SELECT max(version) FROM pgvpn.schema_migrations"
                            ).fetchone() == (BEFORE_TRUST,)


@pytest.mark.parametrize("check", [migrate.require_current, migrate.migrate])
def test_an_older_pgvpn_than_the_schema_says_to_upgrade_it(any_lab: LabHandle,
                                                           check: Any) -> None:
    """Migrating is not the cure for an agent (or a migrator) that is behind, and an
    older `pgvpn db migrate` never reports success on a newer schema."""
    latest = migrate.available()[-1].version
    with psycopg.connect(any_lab.conninfo()) as conn, conn.transaction(force_rollback=True):
        conn.execute("INSERT INTO pgvpn.schema_migrations (version, name) "
                     "VALUES (%s, 'from_a_newer_pgvpn')", [latest + 1])
        with pytest.raises(DatabaseError) as caught:
            check(conn)
    assert str(caught.value) == (f"schema is at version {latest + 1}, newer than this pgvpn "
                                 f"(which knows up to {latest}): upgrade it")


def test_init_never_runs_the_owners_code_as_the_superuser(any_lab: LabHandle) -> None:
    """The owner owns its database's schema public and settings: an operator it planted
    there, and a search_path that finds it first, must not run in init's session."""
    planted = [
        "CREATE FUNCTION public.ne(a oid, b regrole) RETURNS boolean LANGUAGE plpgsql AS $$ "
        "BEGIN IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) "
        "THEN EXECUTE 'ALTER ROLE pgvpn_owner SUPERUSER'; END IF; "
        "RETURN a OPERATOR(pg_catalog.<>) b::oid; END $$",
        "CREATE OPERATOR public.<> (LEFTARG = oid, RIGHTARG = regrole, FUNCTION = public.ne)",
        "ALTER DATABASE pgvpn SET search_path = public, pg_catalog"]
    for statement in planted:
        any_lab.sql(statement)
    try:
        bootstrap.init_database(conninfo_for(any_lab, superuser=True, dbname="postgres"),
                                "pgvpn", bootstrap.OWNER, None, lambda line: None)
        assert any_lab.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'pgvpn_owner'",
                           superuser=True) == [(False,)]
    finally:
        for statement in ("ALTER DATABASE pgvpn RESET search_path",
                          "DROP OPERATOR public.<> (oid, regrole)", "DROP FUNCTION public.ne"):
            any_lab.sql(statement, superuser=True)
        any_lab.sql("ALTER ROLE pgvpn_owner NOSUPERUSER", superuser=True)


def test_init_takes_over_nothing_it_should_not(any_lab: LabHandle) -> None:
    superuser = conninfo_for(any_lab, superuser=True, dbname="postgres")
    with pytest.raises(PgvpnError, match="the server's own"):
        bootstrap.init_database(superuser, "postgres", bootstrap.OWNER, None, print)
    any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH}", superuser=True)
    any_lab.sql(f"CREATE DATABASE {SCRATCH}", superuser=True)
    any_lab.sql("CREATE ROLE trust_owner_cr LOGIN CREATEROLE", superuser=True)
    try:
        with psycopg.connect(conninfo_for(any_lab, superuser=True), autocommit=True) as conn:
            conn.execute("CREATE TABLE public.someone_elses (x int)")
        with pytest.raises(PgvpnError, match="holds 1 relation"):
            bootstrap.init_database(superuser, SCRATCH, bootstrap.OWNER, None, print)
        with pytest.raises(PgvpnError, match=r"more than pgvpn's part for it \(CREATEROLE\)"):
            bootstrap.init_database(superuser, "pgvpn_fresh_probe", "trust_owner_cr", None,
                                    print)
        assert any_lab.sql("SELECT pg_get_userbyid(datdba) FROM pg_database "
                           "WHERE datname = %s", [SCRATCH], superuser=True) == [("postgres",)]
        assert any_lab.sql("SELECT count(*) FROM pg_database WHERE datname = "
                           "'pgvpn_fresh_probe'", superuser=True) == [(0,)]
    finally:
        any_lab.sql(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)", superuser=True)
        any_lab.sql("DROP ROLE trust_owner_cr", superuser=True)
