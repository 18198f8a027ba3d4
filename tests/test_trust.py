"""Integration: a hostile peer, over its own login, cannot borrow anyone's rights.

The attack of the trust review: a peer shadows a catalog relation in pg_temp and
calls a SECURITY DEFINER function, hoping it runs the peer's code as the owner.
sql/005_trust.sql closes it twice (no TEMPORARY for peers; pg_temp last in every
function's search_path), and `pgvpn db init` makes the owner a plain role, so a
future hole of this kind would yield the owner's rights at most. tests/pgtap/
checks every object's settings and privileges; this file runs the attacks the
way a peer would, on both backends.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from lab.measure import ping
from pgvpn import migrate
from tests.conftest import ROOT, CliBackend, LabHandle
from tests.peerside import connect_as, lab_cli, owner_execute, temporary_lent

# Runs the caller's wish whenever it runs with someone else's rights, and says so.
ESCALATE = """
CREATE FUNCTION pg_temp.f() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF current_user <> session_user THEN
        RAISE NOTICE 'ran as %', current_user;
        EXECUTE format('GRANT SELECT ON pgvpn.packets TO %I', session_user);
        BEGIN
            EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;  -- the owner is no superuser: the GRANT above is what it could give
        END;
    END IF;
    RETURN true;
END $$"""
# Catalog relations the definer functions read, each shadowed by a view that runs f().
SHADOWED = ("pg_inherits", "pg_class", "pg_namespace", "pg_roles", "pg_auth_members")


def gained(lab: LabHandle, role: str) -> list[str]:
    """What `role` holds beyond a peer's rights, as the superuser sees it."""
    row = lab.sql("SELECT r.rolsuper, r.rolcreaterole, r.rolbypassrls, "
                  "has_table_privilege(r.oid, 'pgvpn.packets', 'SELECT'), "
                  "(SELECT array_agg(m.roleid::regrole::text ORDER BY m.roleid) "
                  " FROM pg_auth_members m WHERE m.member = r.oid) "
                  "FROM pg_roles r WHERE r.rolname = %s", [role], superuser=True)[0]
    found = [name for name, held in zip(("superuser", "createrole", "bypassrls",
                                         "SELECT on pgvpn.packets"), row[:4], strict=True)
             if held]
    return found + [f"member of {m}" for m in row[4] or [] if m != "pgvpn_agent"]


def test_the_reported_attack_is_refused_at_its_first_step(any_lab: LabHandle) -> None:
    with connect_as(any_lab, "peer-a") as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="temporary"):
            conn.execute(ESCALATE)
        with pytest.raises(errors.InsufficientPrivilege, match="temporary"):
            conn.execute("CREATE TEMPORARY TABLE scratch (x int)")
    assert gained(any_lab, "pgvpn_peer_a") == []


@pytest.mark.parametrize("call", ["SELECT pgvpn.ensure_partitions()",
                                  "SELECT pgvpn.last_sent_seq()",
                                  "SELECT pgvpn.lock_own('receiver')"])
def test_shadowed_catalogs_never_run_as_the_owner(any_lab: LabHandle, call: str) -> None:
    """With TEMPORARY lent, the search_path (pg_temp last) is the defence, and it holds."""
    lab = any_lab
    ran: list[str] = []
    with temporary_lent(lab, "peer-a"), connect_as(lab, "peer-a") as conn:
        conn.add_notice_handler(lambda notice: ran.append(notice.message_primary or ""))
        conn.execute(ESCALATE)
        # each view readable by all, or a non-superuser owner could not even use it
        for name, schema in [*((n, "pg_catalog") for n in SHADOWED), ("log_settings", "pgvpn")]:
            conn.execute(f"CREATE VIEW pg_temp.{name} AS "
                         f"SELECT * FROM {schema}.{name} WHERE pg_temp.f()")
            conn.execute(f"GRANT SELECT ON pg_temp.{name} TO PUBLIC")
        conn.execute(call)
        assert conn.execute("SELECT pgvpn.current_peer()").fetchone() == ("peer-a",)
    assert ran == []
    assert gained(lab, "pgvpn_peer_a") == []


def test_only_the_owner_chooses_how_far_ahead(any_lab: LabHandle) -> None:
    """A peer cannot make years of partitions that every query would then open."""
    before = any_lab.sql("SELECT count(*) FROM pgvpn.log_partitions")[0][0]
    with connect_as(any_lab, "peer-a") as conn, pytest.raises(
            errors.InsufficientPrivilege, match="only the owner"):
        conn.execute("SELECT pgvpn.ensure_partitions(400)")
    assert any_lab.sql("SELECT count(*) FROM pgvpn.log_partitions")[0][0] == before


def test_a_peer_cannot_hold_another_peers_lock(any_lab: LabHandle) -> None:
    """Advisory locks need no privilege in PostgreSQL: peer-a holding peer-b's sender
    lock would keep peer-b's uplink out for as long as it liked. Here it may take
    none; its own lock it takes through pgvpn.lock_own, and its agent holds that."""
    with connect_as(any_lab, "peer-a") as conn:
        for call in ("pg_advisory_lock(hashtextextended('pgvpn.sender.peer-b', 0))",
                     "pg_try_advisory_lock(hashtextextended('pgvpn.receiver.peer-b', 0))",
                     "pg_advisory_lock_shared(1, 2)"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(f"SELECT {call}")
        with pytest.raises(errors.InvalidParameterValue):
            conn.execute("SELECT pgvpn.lock_own('sender.peer-b')")
        # its own sender lock is its running agent's: refused, not stolen
        assert conn.execute("SELECT pgvpn.lock_own('sender')").fetchone() == (False,)
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                            "AND locktype = 'advisory'").fetchone() == (0,)
        # peer-b's agent takes its locks afresh while peer-a's session is still there
        lab_cli(any_lab, "restart", "peer-b")
        assert ping(CliBackend(any_lab), "peer-b", "10.230.0.1", count=2).received == 2


def test_the_owner_is_a_plain_role_that_owns_everything(any_lab: LabHandle) -> None:
    assert any_lab.sql("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls "
                       "FROM pg_roles WHERE rolname = current_user") == [
        (False, False, False, False)]
    owners = any_lab.sql(
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
        "WHERE relnamespace = 'pgvpn'::regnamespace UNION "
        "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc "
        "WHERE pronamespace = 'pgvpn'::regnamespace UNION "
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'pgvpn'")
    assert owners == [("pgvpn_owner",)]
    with pytest.raises(errors.InsufficientPrivilege):
        owner_execute(any_lab, "CREATE ROLE pgvpn_trust_probe LOGIN")
    # and its commands need nothing more (the lab's `lab up` ran migrate and add-peer so)
    latest = str(migrate.available()[-1].version)
    assert any_lab.pgvpn("db", "version").stdout.decode().strip() == latest
    assert any_lab.pgvpn("db", "migrate").returncode == 0
    assert any_lab.pgvpn("db", "version").stdout.decode().strip() == latest


# SASLprep maps U+00A0 (no-break space) to a space and NFKC-folds the ligature U+FB01
# ("fi"): a hand-made verifier that skipped either would not let this password in.
UNICODE_PASSWORD = "p\u00e4ss\u00a0w\u00f6rd-\ufb01ve-\u2603-long-enough"
LOGIN_AS = """
import sys, psycopg
with psycopg.connect(host=sys.argv[1], dbname="pgvpn", user=sys.argv[2], password=sys.argv[3],
                     sslmode="verify-full", sslrootcert=sys.argv[4], connect_timeout=10) as c:
    print(c.execute("SELECT pgvpn.current_peer()").fetchone()[0])
"""


def login_as(lab: LabHandle, user: str, password: str) -> subprocess.CompletedProcess[str]:
    """Log in over the network with a password, TLS verified, as a peer does from
    peer-a's place (its namespace on netns; the host reaches Docker's networks)."""
    where = ["ip", "netns", "exec", lab.namespace("peer-a")] if lab.backend == "netns" else []
    return subprocess.run([*where, sys.executable, "-c", LOGIN_AS, "10.231.1.10", user,
                           password, str(lab.state_dir / "secrets" / "ca-cert")],
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_owner_adds_a_peer_whose_unicode_password_logs_in(any_lab: LabHandle,
                                                               tmp_path: Path) -> None:
    """`pgvpn db add-peer` as the owner (no superuser): the SCRAM verifier is libpq's
    (SASLprep included), made on the client, so the password itself never reaches the
    server, and a wrong one is refused."""
    secret = tmp_path / "password"
    secret.write_text(UNICODE_PASSWORD + "\n")
    try:
        added = any_lab.pgvpn("db", "add-peer", "trust-added", "--password-file", str(secret))
        said = added.stderr.decode().splitlines()
        assert said[-2:] == ["role pgvpn_trust_added for peer trust-added created",
                             "peer trust-added routes nothing"], said  # no --address given
        (stored,), = any_lab.sql("SELECT rolpassword FROM pg_authid "
                                 "WHERE rolname = 'pgvpn_trust_added'", superuser=True)
        assert stored.startswith("SCRAM-SHA-256$4096:") and UNICODE_PASSWORD not in stored
        logged_in = login_as(any_lab, "pgvpn_trust_added", UNICODE_PASSWORD)
        assert (logged_in.returncode, logged_in.stdout.strip()) == (0, "trust-added"), logged_in
        refused = login_as(any_lab, "pgvpn_trust_added", UNICODE_PASSWORD.replace("\u00a0", ""))
        assert "password authentication failed" in refused.stderr, refused
    finally:
        owner_execute(any_lab, "DELETE FROM pgvpn.peers WHERE name = 'trust-added'")
        any_lab.sql("DROP ROLE IF EXISTS pgvpn_trust_added", superuser=True)


def test_the_owner_makes_peer_roles_and_nothing_else(any_lab: LabHandle) -> None:
    with psycopg.connect(any_lab.conninfo(), autocommit=True) as conn:
        verifier = conn.pgconn.encrypt_password(b"x" * 24, b"pgvpn_trust_probe",
                                                b"scram-sha-256").decode()
        refusals = [("owner", verifier, "invalid peer name"),
                    ("Peer_A", verifier, "invalid peer name"),
                    ("trust-probe", "a plaintext password", "SCRAM-SHA-256 verifier")]
        for peer, secret, message in refusals:
            with pytest.raises(psycopg.Error, match=message):
                conn.execute("SELECT pgvpn_admin.ensure_peer_role(%s, %s)", [peer, secret])
        # a role that is more than a peer's is never re-passworded (it would be a login
        # with more rights): here one a superuser also made a reader
        any_lab.sql("CREATE ROLE pgvpn_trust_probe LOGIN IN ROLE pgvpn_agent, pgvpn_reader",
                    superuser=True)
        try:
            with pytest.raises(errors.InsufficientPrivilege, match="not only a pgvpn peer"):
                conn.execute("SELECT pgvpn_admin.ensure_peer_role('trust-probe', %s)",
                             [verifier])
            any_lab.sql("REVOKE pgvpn_reader FROM pgvpn_trust_probe", superuser=True)
            assert conn.execute("SELECT pgvpn_admin.ensure_peer_role('trust-probe', %s)",
                                [verifier]).fetchone() == (False,)
        finally:
            any_lab.sql("DROP ROLE pgvpn_trust_probe", superuser=True)
        assert conn.execute("SELECT pgvpn_admin.ensure_peer_role('trust-probe', %s)",
                            [verifier]).fetchone() == (True,)
    try:
        assert gained(any_lab, "pgvpn_trust_probe") == []
    finally:
        any_lab.sql("DROP ROLE pgvpn_trust_probe", superuser=True)
    with connect_as(any_lab, "peer-a") as peer, pytest.raises(errors.InsufficientPrivilege):
        peer.execute("SELECT pgvpn_admin.ensure_peer_role('peer-z', %s)", [verifier])


def test_only_pgvpn_roles_may_connect(any_lab: LabHandle) -> None:
    """CONNECT is pgvpn_agent's and pgvpn_reader's: other roles of the server stay out."""
    any_lab.sql("CREATE ROLE trust_stranger LOGIN PASSWORD 'stranger-password-123'",
                superuser=True)
    try:
        params = conninfo_to_dict(any_lab.conninfo())
        params.update(user="trust_stranger", password="stranger-password-123")
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(make_conninfo(**params), connect_timeout=10).close()
    finally:
        any_lab.sql("DROP ROLE trust_stranger", superuser=True)


def test_a_reader_reads_the_whole_log_and_changes_nothing(any_lab: LabHandle,
                                                           tmp_path: Path) -> None:
    """pgvpn_reader: the log tools work, every write is refused, no temporary objects."""
    assert ping(CliBackend(any_lab), "peer-a", "10.230.0.2", count=2).received == 2
    any_lab.sql("CREATE ROLE trust_reader LOGIN PASSWORD 'reader-password-1234' "
                "IN ROLE pgvpn_reader", superuser=True)
    try:
        params = conninfo_to_dict(any_lab.conninfo())
        params.update(user="trust_reader", password="reader-password-1234")
        reader = make_conninfo(**params)
        env = {**any_lab.env, "DATABASE_URL": reader}
        for argv in (["log", "-n", "5", "--proto", "icmp"], ["stats", "--top", "3"],
                     ["export", "--pcap", str(tmp_path / "r.pcap"), "--proto", "icmp"]):
            done = subprocess.run([sys.executable, "-m", "pgvpn.cli", *argv], env=env,
                                  capture_output=True, text=True, cwd=ROOT, timeout=60,
                                  check=False)
            assert done.returncode == 0, (argv, done.stderr)
        assert (tmp_path / "r.pcap").stat().st_size > 24  # a header and packets
        with psycopg.connect(reader, autocommit=True) as conn:
            senders = {s for (s,) in conn.execute("SELECT DISTINCT sender FROM pgvpn.packets")}
            assert senders >= {"peer-a", "peer-b"}
            receivers = {r for (r,) in conn.execute("SELECT receiver FROM pgvpn.cursors")}
            assert receivers >= {"peer-a", "peer-b"}
            assert conn.execute("SELECT count(*) FROM pgvpn.log_partitions").fetchone() != (0,)
            for statement in ("DELETE FROM pgvpn.packets", "TRUNCATE pgvpn.packets",
                              "UPDATE pgvpn.cursors SET last_seq = 0",
                              "UPDATE pgvpn.log_settings SET retention = '1 day'",
                              "INSERT INTO pgvpn.packets (seq, receiver, length, data) "
                              "VALUES (1, 'peer-a', 1, '\\x45')",
                              "SELECT pgvpn.ensure_partitions()",
                              "CREATE TEMPORARY TABLE scratch (x int)"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        any_lab.sql("DROP ROLE trust_reader", superuser=True)


# LOCK TABLE's modes, strongest first. Agents' own statements take ROW EXCLUSIVE (COPY,
# cursor updates) and ACCESS SHARE (reads); no weaker mode blocks them.
LOCK_MODES = ("ACCESS EXCLUSIVE", "EXCLUSIVE", "SHARE ROW EXCLUSIVE", "SHARE",
              "SHARE UPDATE EXCLUSIVE", "ROW SHARE", "ROW EXCLUSIVE", "ACCESS SHARE")
HARMLESS_MODES = {"ROW EXCLUSIVE", "ACCESS SHARE", None}
# What a peer may execute (sql/005, 007, 008): a new grant must be thought through here.
PEER_FUNCTIONS = {"pgvpn.current_peer()", "pgvpn.ensure_partitions(integer)",
                  "pgvpn.last_sent_seq()", "pgvpn.lock_own(text)"}


@pytest.fixture
def hostile_peer(any_lab: LabHandle) -> Iterator[psycopg.Connection]:
    """A third peer, registered as any other, whose session the test keeps hostile."""
    any_lab.sql("CREATE ROLE pgvpn_mallory LOGIN PASSWORD 'mallory-password-1234' "
                "IN ROLE pgvpn_agent", superuser=True)
    owner_execute(any_lab, "INSERT INTO pgvpn.peers (name) VALUES ('mallory')")
    params = conninfo_to_dict(any_lab.conninfo())
    params.update(user="pgvpn_mallory", password="mallory-password-1234")
    try:
        with psycopg.connect(make_conninfo(**params)) as conn:
            yield conn
    finally:
        owner_execute(any_lab, "DELETE FROM pgvpn.peers WHERE name = 'mallory'")
        any_lab.sql("DROP ROLE pgvpn_mallory", superuser=True)


def strongest_lock(conn: psycopg.Connection, relation: str) -> str | None:
    """Take the strongest LOCK TABLE mode the session may on `relation`, and keep it."""
    for mode in LOCK_MODES:
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the rest standing
                conn.execute(f"LOCK TABLE {relation} IN {mode} MODE NOWAIT")
        except errors.InsufficientPrivilege:
            continue
        except errors.LockNotAvailable:
            pass  # allowed, and only busy: the agents' locks conflict with it
        return mode
    return None


def test_a_peer_holding_all_it_can_in_an_open_transaction_stops_no_traffic(
        any_lab: LabHandle, hostile_peer: psycopg.Connection) -> None:
    """Locks last until the transaction ends, and a peer may keep one open for ever.
    Whatever another peer takes, calls or locks in it, peer-a and peer-b still talk:
    no peer may drop a partition (sql/008 took apply_retention() away) nor lock a
    table beyond the modes the agents' own statements take (no table-level UPDATE)."""
    conn = hostile_peer
    callable_ = {str(f) for (f,) in conn.execute(
        "SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace IN "
        "('pgvpn'::regnamespace, 'pgvpn_admin'::regnamespace) "
        "AND has_function_privilege(p.oid, 'EXECUTE')")}
    assert callable_ == PEER_FUNCTIONS
    relations = [str(r) for (r,) in conn.execute(
        "SELECT c.oid::regclass FROM pg_class c WHERE c.relnamespace = 'pgvpn'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'v') ORDER BY 1")]
    # a partition to attach, so that ensure_partitions() takes and keeps its locks too:
    # the owner drops the last one ahead (days in the future: empty), the peer's call
    # makes it again
    (last,), = any_lab.sql("SELECT partition::text FROM pgvpn.log_partitions "
                           "WHERE range_from > now() + interval '1 day' "
                           "ORDER BY range_from DESC LIMIT 1")
    assert any_lab.sql(f"SELECT count(*) FROM {last}") == [(0,)]
    owner_execute(any_lab, f"DROP TABLE {last}")
    with conn.transaction():
        assert conn.execute("SELECT pgvpn.current_peer()").fetchone() == ("mallory",)
        assert conn.execute("SELECT pgvpn.ensure_partitions()").fetchone()[0] > 0  # type: ignore[index]
        conn.execute("SELECT pgvpn.last_sent_seq(), pgvpn.lock_own('sender'), "
                     "pgvpn.lock_own('receiver')")
        conn.execute("SELECT FROM pgvpn.peers FOR UPDATE")  # its own row (RLS)
        taken = {relation: strongest_lock(conn, relation) for relation in relations}
        assert {r: m for r, m in taken.items() if m not in HARMLESS_MODES} == {}
        assert taken["pgvpn.cursors"] == "ROW EXCLUSIVE"  # INSERT's mode, no more
        for host, target in (("peer-a", "10.230.0.2"), ("peer-b", "10.230.0.1")):
            result = ping(CliBackend(any_lab), host, target, count=3, interval=0.2)
            assert result.received == 3, (host, result, taken)
