"""Integration: the database's own checks, tests/pgtap/, against a lab's pgvpn database.

Every file there is a pgTAP test that runs in one transaction rolled back at its end,
as the server's superuser: owners and roles, functions (SECURITY DEFINER, search_path,
EXECUTE), privileges and policies, a hostile peer's attacks, ensure_peer_role, and
plpgsql_check over every PL/pgSQL function. pg_prove runs them here the way a person
would (`pg_prove tests/pgtap/*.sql` with PGHOST etc. set to the lab's superuser
connection); on the namespace backend the lab's server is the host's, so the host's
postgresql-15-pgtap and -plpgsql-check apply; on Docker, the image's.

A check that cannot fail proves nothing, so each weakening below is applied inside
the same transaction as one test file (psql runs `BEGIN; <weakening>; \\i <file>`,
and the file's ROLLBACK takes the weakening away with everything else), and exactly
the assertions that guard against it must go red. The search_path weakenings show
the escalation itself succeeding: the peer's shadows run as pgvpn_owner, and the
peer ends up with SELECT on the log and with peer-b's login.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import ROOT, LabHandle

PGTAP_DIR = ROOT / "tests" / "pgtap"
TAP_FILES = sorted(PGTAP_DIR.glob("[0-9][0-9]_*.sql"))
# libpq parameters that psql and pg_prove take from the environment.
ENVIRONMENT = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
               "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
               "connect_timeout": "PGCONNECT_TIMEOUT"}


# ------------------------------------------------------------------ TAP, strictly
@dataclass
class TapTest:
    number: int
    ok: bool
    description: str
    todo: str | None
    diagnostics: list[str] = field(default_factory=list)


@dataclass
class TapRun:
    planned: int | None = None
    tests: list[TapTest] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TapTest]:
        """Tests that count as failures (`not ok`, unless marked TODO)."""
        return [t for t in self.tests if not t.ok and t.todo is None]

    def report(self) -> str:
        lines = [f"problem: {p}" for p in self.problems]
        for test in self.failed:
            lines.append(f"not ok {test.number} - {test.description}")
            lines += [f"    {d}" for d in test.diagnostics]
        return "\n".join(lines)


TAP_LINE = re.compile(r"^(?P<not>not )?ok (?P<number>\d+)(?: - (?P<description>.*?))?"
                      r"(?: # TODO ?(?P<todo>.*))?$")


def parse_tap(output: str) -> TapRun:
    """One plan, then tests numbered 1..plan, `# ` diagnostics; anything else is a problem."""
    run = TapRun()
    for line in output.splitlines():
        if not line.strip():
            continue
        if match := re.fullmatch(r"1\.\.(\d+)", line):
            if run.planned is not None:
                run.problems.append(f"a second plan: {line}")
            run.planned = int(match[1])
        elif match := TAP_LINE.match(line):
            number = int(match["number"])
            if number != len(run.tests) + 1:
                run.problems.append(f"test {number} out of sequence after {len(run.tests)}")
            run.tests.append(TapTest(number, match["not"] is None,
                                     match["description"] or "", match["todo"]))
        elif line.startswith("#"):
            if run.tests:
                run.tests[-1].diagnostics.append(line)
            else:
                run.problems.append(f"diagnostic before any test: {line}")
        else:
            run.problems.append(f"not TAP: {line}")
    if run.planned is None:
        run.problems.append("no plan")
    elif run.planned != len(run.tests):
        run.problems.append(f"planned {run.planned} tests, ran {len(run.tests)}")
    return run


# ------------------------------------------------------------- the connection
@dataclass(frozen=True)
class Database:
    """How psql and pg_prove reach the lab's database as its superuser."""

    env: dict[str, str]  # PGHOST etc.; the password only in a 0600 PGPASSFILE
    scratch: Path  # for the weakened scripts


@pytest.fixture(scope="module")
def database(any_lab: LabHandle) -> Iterator[Database]:
    missing = [tool for tool in ("psql", "pg_prove") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not installed: run scripts/setup.sh"
    conninfo = any_lab.conninfo(superuser=True)
    with psycopg.connect(conninfo) as conn:
        available = {name for (name,) in conn.execute(
            "SELECT name FROM pg_available_extensions WHERE name IN ('pgtap', 'plpgsql_check')")}
    assert available == {"pgtap", "plpgsql_check"}, (
        f"the lab's server lacks {sorted({'pgtap', 'plpgsql_check'} - available)}: "
        "postgresql-15-pgtap and postgresql-15-plpgsql-check (scripts/setup.sh on the "
        "host for netns; images/postgres/Dockerfile for Docker)")
    params = conninfo_to_dict(conninfo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({ENVIRONMENT[k]: str(v) for k, v in params.items() if k in ENVIRONMENT})
    with tempfile.TemporaryDirectory(prefix="pgvpn-pgtap-") as scratch:
        if password := params.get("password"):
            passfile = Path(scratch) / "pgpass"
            passfile.touch(mode=0o600)
            escaped = password.replace("\\", "\\\\").replace(":", "\\:")
            passfile.write_text(f"*:*:*:*:{escaped}\n")
            env["PGPASSFILE"] = str(passfile)
        yield Database(env, Path(scratch))


def run_psql(database: Database, script: Path) -> tuple[TapRun, str]:
    """A file through psql as pg_prove runs it; its TAP, and stderr for the report."""
    done = subprocess.run(
        ["psql", "--no-psqlrc", "--no-align", "--quiet", "--tuples-only",
         "--set", "ON_ERROR_STOP=1", "--pset", "pager=off", "--file", str(script)],
        capture_output=True, text=True, env=database.env, timeout=300, check=False)
    run = parse_tap(done.stdout)
    if done.returncode != 0:
        run.problems.append(f"psql exited {done.returncode}")
    errors = "\n".join(line for line in done.stderr.splitlines()
                       if "there is already a transaction in progress" not in line)
    return run, errors


# ------------------------------------------------------------------- the suite
def test_tap_is_read_strictly() -> None:
    """No lab needed: what counts as a failure, and what is not TAP at all."""
    good = parse_tap("1..3\nok 1 - a\nnot ok 2 - b # TODO known\n# why\n\nok 3 - c\n")
    assert not good.problems and not good.failed and good.tests[1].todo == "known"
    bad = parse_tap("1..3\nok 1 - a\nnot ok 2 - b\n#     have: 1\n")
    assert [t.description for t in bad.failed] == ["b"]
    assert bad.failed[0].diagnostics == ["#     have: 1"]
    assert bad.problems == ["planned 3 tests, ran 2"]
    assert parse_tap("ok 1 - a\n").problems == ["no plan"]
    assert parse_tap("1..2\nok 1\nok 3\n").problems == ["test 3 out of sequence after 1"]
    assert parse_tap("1..1\nERROR: boom\nok 1\n").problems == ["not TAP: ERROR: boom"]


def test_pgtap_files_are_there() -> None:
    assert [f.name for f in TAP_FILES] == [
        "01_ownership_and_roles.sql", "02_functions.sql", "03_privileges.sql",
        "04_attacks.sql", "05_peer_roles.sql", "06_plpgsql_check.sql", "07_locks.sql"]


def test_pgtap_suite_passes(database: Database) -> None:
    """pg_prove over tests/pgtap/: every assertion ok (a TODO counts as a failure too)."""
    done = subprocess.run(["pg_prove", "--verbose", *map(str, TAP_FILES)],
                          capture_output=True, text=True, env=database.env, timeout=600,
                          check=False, cwd=ROOT)
    output = done.stdout + done.stderr
    failed = [line for line in output.splitlines() if line.startswith("not ok")]
    assert done.returncode == 0 and "Result: PASS" in output and not failed, (
        "pgTAP assertions failed:\n" + "\n".join(failed) + "\n\npg_prove said:\n" + output)
    # The same files once more through psql, read strictly: pg_prove's verdict is
    # not the only thing standing between a broken file and a green test.
    for tap_file in TAP_FILES:
        run, errors = run_psql(database, tap_file)
        assert not run.problems and not run.failed, (
            f"{tap_file.name}:\n{run.report()}\n{errors}")


# ------------------------------------------------ each check can fail
@dataclass(frozen=True)
class Weakening:
    name: str
    sql: str
    # file -> descriptions of exactly the assertions that must fail there
    red: dict[str, frozenset[str]]


def red(*descriptions: str) -> frozenset[str]:
    return frozenset(descriptions)


# What a peer gains when one of its shadows runs as the owner (tests/pgtap/04).
ESCALATED = red(
    "no shadow ran as anyone but the peer",
    "no shadow ran as another role even in a call that failed (counter untouched)",
    "the peer updates only its own cursor under attack",
    "peer-b's cursor is untouched",
    "the peer still cannot read pgvpn.packets",
    "after the attack the peer has no privilege on pgvpn.packets",
    "after the attack row-level security is still on for pgvpn.cursors",
    "after the attack no role was made and no password changed (peer-b's login is safe)",
)
SEARCH_PATH_ANY = ("every function in pgvpn and pgvpn_admin runs with search_path = "
                   "pg_catalog, pg_temp or has a SQL-standard body (and is no definer)")
# sql/003's partition_ranges: unqualified catalog names, pgvpn before an implicit pg_temp.
OLD_PARTITION_RANGES = r"""
CREATE OR REPLACE FUNCTION pgvpn.partition_ranges()
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               detach_pending boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
    SELECT i.inhrelid::regclass,
           CASE WHEN b[1] = 'MINVALUE' THEN '-infinity'
                ELSE trim(both '''' FROM b[1]) END::timestamptz,
           CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity'
                ELSE trim(both '''' FROM b[2]) END::timestamptz,
           i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS b
    WHERE i.inhparent = 'pgvpn.packets'::regclass
$$;
"""
# 005's current_peer() with its body as a string (bound at each call, by the caller's
# search_path) instead of BEGIN ATOMIC.
STRING_BODY_CURRENT_PEER = r"""
CREATE OR REPLACE FUNCTION pgvpn.current_peer() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(session_user::text, 6) = 'pgvpn_'
                     AND session_user::text NOT IN (
                         'pgvpn_agent', 'pgvpn_reader', 'pgvpn_owner', 'pgvpn_peermaker')
                THEN replace(substr(session_user::text, 7), '_', '-') END
$$;
"""
# blog_v1_notify with an injectable EXECUTE and a misspelt column.
BROKEN_TRIGGER = r"""
CREATE OR REPLACE FUNCTION pgvpn.blog_v1_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    channel text;
BEGIN
    channel := 'pgvpn.v1.' || NEW.receiver;
    EXECUTE 'NOTIFY "' || channel || '", ''' || NEW.id || '''';
    PERFORM pg_catalog.pg_notify('pgvpn.v1.' || NEW.reciever, NEW.id::pg_catalog.text);
    RETURN NULL;
END
$$;
"""
# lock_own() that takes whatever lock it is asked for: a name after the purpose
# reaches another peer's lock.
ANY_NAME_LOCK_OWN = r"""
CREATE OR REPLACE FUNCTION pgvpn.lock_own(purpose text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pgvpn.current_peer() IS NULL THEN
        RAISE EXCEPTION 'not a peer' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN pg_catalog.pg_try_advisory_lock(
        pg_catalog.hashtextextended('pgvpn.' || purpose || '.' || pgvpn.current_peer(), 0));
END
$$;
"""

WEAKENINGS = [
    Weakening(
        "definer-search-path",
        "ALTER FUNCTION pgvpn.ensure_partitions(integer) SET search_path = pg_catalog, pgvpn;",
        {"02_functions.sql": red(
            "pgvpn.ensure_partitions(integer) has search_path = pg_catalog, pg_temp",
            SEARCH_PATH_ANY),
         "04_attacks.sql": ESCALATED}),
    Weakening(
        "reported-attack",  # the trust review's pg_inherits view, as reported
        OLD_PARTITION_RANGES,
        {"02_functions.sql": red(
            "pgvpn.partition_ranges() has search_path = pg_catalog, pg_temp", SEARCH_PATH_ANY),
         "04_attacks.sql": ESCALATED}),
    Weakening(
        "temporary-for-public",
        "DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', "
        "current_database()); END $$;",
        {"03_privileges.sql": red(
            "public on the database: nothing",
            "pgvpn_agent on the database: CONNECT",
            "pgvpn_reader on the database: CONNECT",
            "pgvpn_peer_a on the database: CONNECT",
            "pgvpn_peer_b on the database: CONNECT",
            "pgvpn_peermaker on the database: nothing",
            "the database grants CONNECT to pgvpn_agent and pgvpn_reader and nothing else "
            "to anyone",
            "no peer role may create temporary objects or schemas in the database"),
         "04_attacks.sql": red(
            "without TEMPORARY the reported attack is refused at CREATE FUNCTION pg_temp.f",
            "without TEMPORARY the peer cannot create the view pg_temp.pg_inherits",
            "without TEMPORARY the peer cannot create a temporary table",
            "the lent TEMPORARY went to peer-a only")}),
    Weakening(
        "execute-for-public",
        "GRANT EXECUTE ON FUNCTION pgvpn.last_sent_seq() TO PUBLIC;",
        {"02_functions.sql": red(
            "PUBLIC may not execute pgvpn.last_sent_seq()",
            "pgvpn_reader may not execute pgvpn.last_sent_seq()",
            "the functions' ACLs grant EXECUTE to exactly the intended roles, none to PUBLIC "
            "or anyone else")}),
    Weakening(
        "current-peer-string-body",
        STRING_BODY_CURRENT_PEER,
        {"02_functions.sql": red(
            "pgvpn.current_peer() has a SQL-standard body (BEGIN ATOMIC) and no SET clause",
            SEARCH_PATH_ANY)}),
    Weakening(
        "security-invoker-peer-maker",
        "ALTER FUNCTION pgvpn_admin.ensure_peer_role(text, text) SECURITY INVOKER;",
        {"02_functions.sql": red("pgvpn_admin.ensure_peer_role(text, text) is SECURITY DEFINER"),
         "05_peer_roles.sql": red(
            "makes the new peer role pgvpn_tap_new",
            "pgvpn_tap_new: LOGIN INHERIT and no other attribute",
            "pgvpn_tap_new is a member of pgvpn_agent only, without ADMIN OPTION",
            "pgvpn_tap_new's password is the verifier given, stored as it is",
            "re-passwords a role that is exactly a peer's (returns false: not new)",
            "pgvpn_tap_new's password is now the second verifier")}),
    Weakening(
        "peer-maker-for-agents",
        "GRANT USAGE ON SCHEMA pgvpn_admin TO pgvpn_agent; "
        "GRANT EXECUTE ON FUNCTION pgvpn_admin.ensure_peer_role(text, text) TO pgvpn_agent;",
        {"02_functions.sql": red(
            "pgvpn_agent may not execute pgvpn_admin.ensure_peer_role(text, text)",
            "peer role pgvpn_peer_a executes pgvpn_admin.ensure_peer_role(text, text) only as "
            "pgvpn_agent may",
            "the functions' ACLs grant EXECUTE to exactly the intended roles, none to PUBLIC "
            "or anyone else"),
         "03_privileges.sql": red(
            "pgvpn_agent on schema pgvpn_admin: nothing",
            "pgvpn_peer_a on schema pgvpn_admin: nothing"),
         "05_peer_roles.sql": red(
            "no role's password changed but pgvpn_tap_new's (the refused ones and the lab's "
            "peers keep theirs)",
            "a peer cannot call ensure_peer_role",
            "a peer cannot re-password another peer through ensure_peer_role",
            "the peer made no role")}),
    Weakening(
        "ownership",  # a definer function and a table handed to the superuser
        "ALTER FUNCTION pgvpn.last_sent_seq() OWNER TO postgres; "
        "ALTER TABLE pgvpn.peers OWNER TO postgres;",
        {"01_ownership_and_roles.sql": red(
            "table pgvpn.peers is owned by pgvpn_owner",
            "function pgvpn.last_sent_seq() is owned by pgvpn_owner",
            "every relation in pgvpn (partitions and indexes too) is owned by pgvpn_owner",
            "every type in pgvpn is owned by pgvpn_owner"),
         # apply_retention (as pgvpn_owner) can no longer read pgvpn.peers
         "04_attacks.sql": red(
            "pgvpn.apply_retention() under attack drops expired partitions",
            "the expired partition is gone")}),
    Weakening(
        "owner-superuser",
        "ALTER ROLE pgvpn_owner SUPERUSER;",
        {"01_ownership_and_roles.sql": red(
            "role pgvpn_owner: LOGIN, no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS",
            "pgvpn_owner is no superuser",
            "no pgvpn role has SUPERUSER, CREATEROLE (but pgvpn_peermaker), CREATEDB, "
            "REPLICATION or BYPASSRLS"),
         # a superuser holds every privilege, CREATE on pgvpn_admin too
         "03_privileges.sql": red("pgvpn_owner on schema pgvpn_admin: USAGE only")}),
    Weakening(
        "peer-attribute",
        "ALTER ROLE pgvpn_peer_b CREATEDB;",
        {"01_ownership_and_roles.sql": red(
            "no pgvpn role has SUPERUSER, CREATEROLE (but pgvpn_peermaker), CREATEDB, "
            "REPLICATION or BYPASSRLS",
            "every member of pgvpn_agent is a peer's LOGIN role: no attribute, no ADMIN "
            "OPTION, no members")}),
    Weakening(
        "log-readable-by-agents",
        "GRANT SELECT ON pgvpn.packets TO pgvpn_agent;",
        {"03_privileges.sql": red(
            "pgvpn_agent on pgvpn.packets: nothing",
            "relations in pgvpn grant exactly the intended privileges, none to PUBLIC or "
            "anyone else",
            # table-level SELECT shows in has_column_privilege too
            *(f"{role} on pgvpn.packets({column}): {privilege}"
              for role in ("pgvpn_agent", "pgvpn_peer_a")
              for column, privilege in (("id", "nothing"), ("logged_at", "nothing"),
                                        ("sender", "nothing"), ("seq", "INSERT"),
                                        ("receiver", "INSERT"), ("length", "INSERT"),
                                        ("data", "INSERT")))),
         "04_attacks.sql": red(
            "the peer still cannot read pgvpn.packets",
            "after the attack the peer has no privilege on pgvpn.packets")}),
    Weakening(
        "partition-grant",
        "DO $$ BEGIN EXECUTE format('GRANT SELECT ON %s TO pgvpn_agent', (SELECT "
        "i.inhrelid::regclass FROM pg_inherits i WHERE i.inhparent = 'pgvpn.packets'"
        "::regclass LIMIT 1)); END $$;",
        {"01_ownership_and_roles.sql": red(
            "partitions: all of pgvpn.packets, with no grants of their own and no RLS"),
         "03_privileges.sql": red(
            "relations in pgvpn grant exactly the intended privileges, none to PUBLIC or "
            "anyone else")}),
    Weakening(
        "rls-off",
        "ALTER TABLE pgvpn.cursors DISABLE ROW LEVEL SECURITY;",
        {"03_privileges.sql": red(
            "row-level security is enabled on exactly cursors, peers, blog_v1_packets, "
            "blog_v2_packets"),
         "04_attacks.sql": red(
            "the peer updates only its own cursor under attack",
            "peer-b's cursor is untouched",
            "after the attack row-level security is still on for pgvpn.cursors")}),
    Weakening(
        "policy-for-public",
        "ALTER POLICY own_cursors ON pgvpn.cursors TO public;",
        {"03_privileges.sql": red(
            "policy own_cursors on pgvpn.cursors applies to pgvpn_agent only")}),
    Weakening(
        "advisory-locks-for-public",
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_advisory_lock(bigint), "
        "pg_catalog.pg_try_advisory_lock_shared(integer, integer) TO PUBLIC;",
        {"07_locks.sql": red(
            "PUBLIC may call none of the advisory lock functions in this database",
            "no peer, agent or reader role may call an advisory lock function",
            "a peer is refused every advisory lock function, on any key",
            "the locks held are exactly pgvpn.sender.tap-lock and pgvpn.receiver.tap-lock")}),
    Weakening(
        "lock-own-any-name",
        ANY_NAME_LOCK_OWN,
        {"07_locks.sql": red(
            "lock_own() takes no other purpose (and no name in one)",
            "the locks held are exactly pgvpn.sender.tap-lock and pgvpn.receiver.tap-lock")}),
    Weakening(
        "plpgsql-bugs",
        BROKEN_TRIGGER,
        {"06_plpgsql_check.sql": red(
            "plpgsql_check: pgvpn.blog_v1_notify() has no error and no warning but the "
            "accepted ones")}),
]


@pytest.mark.parametrize("weakening", WEAKENINGS, ids=lambda w: w.name)
def test_each_check_goes_red_against_its_weakening(database: Database,
                                                   weakening: Weakening) -> None:
    seen: dict[str, frozenset[str]] = {}
    reports = []
    for tap_file in TAP_FILES:
        script = database.scratch / f"{weakening.name}-{tap_file.name}"
        script.write_text(f"BEGIN;\n{weakening.sql}\n\\i {tap_file}\n")
        run, errors = run_psql(database, script)
        assert not run.problems, (
            f"{tap_file.name} did not run to its end:\n{run.report()}\n{errors}")
        seen[tap_file.name] = frozenset(t.description for t in run.failed)
        if run.failed:
            reports.append(f"{tap_file.name}:\n{run.report()}")
    expected = {name: weakening.red.get(name, frozenset()) for name in seen}
    assert seen == expected, ("\n".join(reports) or "nothing failed") + "\n\nunexpected: " + str(
        {name: {"missing": sorted(expected[name] - got), "extra": sorted(got - expected[name])}
         for name, got in seen.items() if got != expected[name]})
