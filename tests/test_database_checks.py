"""Integration: the database's own checks, tests/pgtap/, against a lab's pgvpn database.

Every file there is a pgTAP test that runs in one transaction rolled back at its end,
as the server's superuser: owners and roles, functions (SECURITY DEFINER, search_path,
EXECUTE), privileges and policies, a hostile peer's attacks, ensure_peer_role, and
plpgsql_check over every PL/pgSQL function. pg_prove runs them here the way a person
would (`pg_prove tests/pgtap/*.sql` with PGHOST etc. set to the lab's superuser
connection); on the namespace backend the lab's server is the host's, so the host's
postgresql-15-pgtap and -plpgsql-check apply; on Docker, the image's.

A check that cannot fail proves nothing, so each weakening (tests/weakenings.py) is
applied inside the same transaction as one test file (psql runs `BEGIN; <weakening>;
\\i <file>`, and the file's ROLLBACK takes the weakening away with everything else), and exactly
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
from tests.weakenings import WEAKENINGS, Weakening

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
        "04_attacks.sql", "05_peer_roles.sql", "06_plpgsql_check.sql", "07_locks.sql",
        "08_show.sql", "09_routes.sql", "10_remove_peer.sql"]


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
