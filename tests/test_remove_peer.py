"""Integration: `pgvpn db remove-peer` against a lab's real Postgres, as `wg set wg0 peer
X remove` behaves: the peer is gone at once (its routes deleted and announced, its
login refused, its open session cut off, even one holding locks in an open
transaction), nothing it logged is deleted, and `pgvpn db add-peer` brings it back.

The lab's own peers are never removed here (other tests use them): a third peer is
added for each test and dropped afterwards, with its rows (as the superuser: the
owner has no way to drop a role, and the product never deletes logged packets).
tests/pgtap/10_remove_peer.sql holds the refusals of pgvpn_admin.disable_peer_role.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn.admin import Removal
from pgvpn.show import PeerStatus
from tests.conftest import ROOT, LabHandle
from tests.peerside import connect_as, peer_conninfo
from tests.test_trust import login_as

PEER, ROLE = "gone-c", "pgvpn_gone_c"
IMPOSTOR, IMPOSTOR_ROLE = "gone-d", "pgvpn_gone_d"  # a role that is more than a peer's
HOSTILE, HOSTILE_ROLE = "gone-e", "pgvpn_gone_e"  # a peer that resists its removal
PASSWORD, NEW_PASSWORD = "gone-c-first-password-1234", "gone-c-second-password-5678"


def login(lab: LabHandle, password: str, role: str = ROLE) -> psycopg.Connection:
    """A session of a test's peer, here over the lab's Unix socket (which checks LOGIN
    but, on the netns backend, no password: login_as checks those over TLS)."""
    params: dict[str, Any] = conninfo_to_dict(lab.conninfo())
    params.update(user=role, password=password, application_name=f"pgvpn tests as {role}")
    return psycopg.connect(make_conninfo(**params), connect_timeout=10)


@pytest.fixture
def owner(netns_lab: LabHandle, tmp_path: Path) -> Iterator[LabHandle]:
    """The lab, with the third peer's role, rows and logged packets removed before and
    after (as a superuser)."""
    def clean() -> None:
        for name in (PEER, IMPOSTOR, HOSTILE):
            netns_lab.sql("DELETE FROM pgvpn.packets WHERE sender = %s OR receiver = %s",
                          [name, name], superuser=True)
            netns_lab.sql("DELETE FROM pgvpn.peers WHERE name = %s", [name], superuser=True)
        for role in (ROLE, IMPOSTOR_ROLE, HOSTILE_ROLE):
            if netns_lab.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]):
                netns_lab.sql(f"DROP OWNED BY {role}", superuser=True)  # its large objects
                netns_lab.sql(f"DROP ROLE {role}", superuser=True)
    clean()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "new-pw").write_text(NEW_PASSWORD + "\n")
    try:
        yield netns_lab
    finally:
        clean()


def shown(lab: LabHandle) -> dict[str, dict[str, object]]:
    lines = lab.pgvpn("show", "--json").stdout.decode().splitlines()
    return {peer["name"]: peer for peer in map(json.loads, lines)}


def test_a_removed_peer_is_cut_off_at_once_and_its_log_stays(owner: LabHandle,
                                                             tmp_path: Path) -> None:
    owner.pgvpn("db", "add-peer", PEER, "--password-file", str(tmp_path / "pw"),
                "--address", "10.240.9.3/24", "--route", "192.168.249.0/24")
    # The peer, connected: it logs a row (to itself: no agent of the lab reads it) and
    # makes its cursor, and stays connected, as its agent would.
    peer = login(owner, PASSWORD)
    peer.execute("INSERT INTO pgvpn.packets (seq, receiver, length, data) "
                 "VALUES (1, %s, 1, '\\x45')", [PEER])
    peer.execute("INSERT INTO pgvpn.cursors (receiver, sender) VALUES (%s, 'peer-a')", [PEER])
    peer.commit()
    bystander = connect_as(owner, "peer-a")  # another peer's session: it must stay
    listener = psycopg.connect(owner.conninfo(), autocommit=True)
    listener.execute("LISTEN pgvpn_routes")
    try:
        said = owner.pgvpn("db", "remove-peer", PEER).stderr.decode().splitlines()
        assert said == [
            f"peer {PEER}: routes 10.240.9.3/32, 192.168.249.0/24 deleted (agents that route "
            "by the table drop them)",
            f"peer {PEER}: role {ROLE} can no longer log in, password cleared; 1 session(s) "
            "ended",
            f"peer {PEER} removed; its logged packets and cursors are kept (pgvpn log --peer "
            f"{PEER}); 'pgvpn db add-peer {PEER} --password-file FILE' brings it back"], said
        # cut off: the open session is gone
        with pytest.raises(psycopg.OperationalError):
            peer.execute("INSERT INTO pgvpn.packets (seq, receiver, length, data) "
                         "VALUES (2, %s, 1, '\\x45')", [PEER])
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            login(owner, PASSWORD).close()
        # as its agent would, from a peer's host: its password is no more (the server says
        # so before it looks at LOGIN)
        over_tls = login_as(owner, ROLE, PASSWORD)
        assert (over_tls.returncode != 0
                and "password authentication failed" in over_tls.stderr), over_tls
        # its routes are gone, and the agents were told
        assert owner.sql("SELECT count(*) FROM pgvpn.routes WHERE peer = %s", [PEER]) == [(0,)]
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [
            "pgvpn_routes"]
        # nothing logged went: its row, its peers row, its cursor
        assert owner.sql("SELECT sender, seq, receiver FROM pgvpn.packets WHERE sender = %s",
                         [PEER]) == [(PEER, 1, PEER)]
        assert owner.sql("SELECT count(*) FROM pgvpn.peers WHERE name = %s", [PEER]) == [(1,)]
        assert owner.sql("SELECT receiver, sender FROM pgvpn.cursors WHERE receiver = %s",
                         [PEER]) == [(PEER, "peer-a")]
        assert bystander.execute("SELECT pgvpn.current_peer()").fetchone() == ("peer-a",)
        peers = shown(owner)
        assert peers[PEER]["state"] == "removed" and peers[PEER]["routes"] == []
        assert peers["peer-a"]["state"] == "connected"
        assert f"{PEER} " in owner.pgvpn("show").stdout.decode()
    finally:
        for conn in (peer, bystander, listener):
            conn.close()

    # Again: nothing left to do, said so, exit 0.
    again = owner.pgvpn("db", "remove-peer", PEER).stderr.decode().splitlines()
    assert again == [f"peer {PEER} was already removed: no routes, role {ROLE} cannot log in, "
                     "no session; its logged packets and cursors are kept"], again

    # add-peer brings it back: a new password (the old one is refused), its route, and
    # its numbering goes on from its last logged packet.
    added = owner.pgvpn("db", "add-peer", PEER, "--password-file", str(tmp_path / "new-pw"),
                        "--address", "10.240.9.3/24").stderr.decode()
    assert f"role {ROLE} for peer {PEER} updated" in added
    refused = login_as(owner, ROLE, PASSWORD)
    assert "password authentication failed" in refused.stderr, refused
    logged_in = login_as(owner, ROLE, NEW_PASSWORD)
    assert (logged_in.returncode, logged_in.stdout.strip()) == (0, PEER), logged_in
    with login(owner, NEW_PASSWORD) as back:
        assert back.execute("SELECT pgvpn.last_sent_seq()").fetchone() == (1,)
        back.execute("INSERT INTO pgvpn.packets (seq, receiver, length, data) "
                     "VALUES (2, %s, 1, '\\x45')", [PEER])
    assert shown(owner)[PEER]["routes"] == ["10.240.9.3/32"]
    assert shown(owner)[PEER]["state"] == "never connected"


def test_a_hostile_peer_cannot_keep_itself_from_being_removed(owner: LabHandle,
                                                              tmp_path: Path) -> None:
    """Whatever a peer may do to itself: objects and settings of its own (which would
    fail a check that its role owns nothing), and an open transaction holding its own
    rows and its own role's catalog row (which ALTER ROLE would wait for). remove-peer
    ends it all the same, at once; only add-peer then refuses it (re-passwording stays
    strict: a superuser cleans such a role first)."""
    owner.pgvpn("db", "add-peer", HOSTILE, "--password-file", str(tmp_path / "pw"),
                "--address", "10.240.9.5/24")
    peer = login(owner, PASSWORD, HOSTILE_ROLE)
    peer.execute(f"ALTER ROLE {HOSTILE_ROLE} SET work_mem = '1MB'")
    peer.execute("SELECT lo_create(0)")
    peer.execute(f"ALTER DEFAULT PRIVILEGES FOR ROLE {HOSTILE_ROLE} GRANT SELECT ON TABLES "
                 "TO PUBLIC")
    peer.commit()
    peer.execute("SELECT FROM pgvpn.peers FOR UPDATE")
    peer.execute("SELECT FROM pgvpn.cursors FOR UPDATE")
    peer.execute("LOCK TABLE pgvpn.routes IN ACCESS SHARE MODE")
    peer.execute(f"ALTER ROLE {HOSTILE_ROLE} PASSWORD '{PASSWORD}'")  # its pg_authid row
    try:
        started = time.monotonic()
        said = owner.pgvpn("db", "remove-peer", HOSTILE, timeout=60).stderr.decode()
        took = time.monotonic() - started
        assert f"role {HOSTILE_ROLE} can no longer log in, password cleared; 1 session(s) " \
               "ended" in said, said
        assert took < 20, f"remove-peer waited {took:.1f} s for the peer"
        with pytest.raises(psycopg.OperationalError):
            peer.execute("SELECT 1")
    finally:
        peer.close()
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        login(owner, PASSWORD, HOSTILE_ROLE).close()
    assert owner.sql("SELECT count(*) FROM pgvpn.routes WHERE peer = %s", [HOSTILE]) == [(0,)]
    refused = owner.pgvpn("db", "add-peer", HOSTILE, "--password-file", str(tmp_path / "pw"),
                          check=False)
    assert refused.returncode == 2 and (f"role {HOSTILE_ROLE} exists and is not only a pgvpn "
                                        "peer's role") in refused.stderr.decode(), refused


def test_what_is_no_peer_is_refused_and_nothing_changes(owner: LabHandle) -> None:
    done = owner.pgvpn("db", "remove-peer", "nosuch-peer", check=False)
    said = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in said, said
    assert "no peer nosuch-peer: 'pgvpn show' lists the peers" in said
    # A peer whose role a superuser made more than a peer's (here also a reader): the
    # owner may not disable it, and the transaction takes its route deletion back.
    owner.sql(f"CREATE ROLE {IMPOSTOR_ROLE} LOGIN PASSWORD 'gone-d-password-12345' "
              "IN ROLE pgvpn_agent, pgvpn_reader", superuser=True)
    owner.sql("INSERT INTO pgvpn.peers (name) VALUES (%s)", [IMPOSTOR])
    owner.sql("INSERT INTO pgvpn.routes (peer, prefix) VALUES (%s, '192.168.248.0/24')",
              [IMPOSTOR])
    done = owner.pgvpn("db", "remove-peer", IMPOSTOR, check=False)
    said = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in said, said
    assert (f"cannot remove peer {IMPOSTOR} (nothing changed): role {IMPOSTOR_ROLE} is not "
            "only a pgvpn peer's role (a superuser must change or remove that role)") in said
    assert owner.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                     [IMPOSTOR_ROLE]) == [(True,)]
    assert owner.sql("SELECT prefix::text FROM pgvpn.routes WHERE peer = %s",
                     [IMPOSTOR]) == [("192.168.248.0/24",)]
    # a peer (here peer-a, over its own login) may remove nobody
    as_peer = subprocess.run([sys.executable, "-m", "pgvpn.cli", "db", "remove-peer", "peer-b",
                              "--database-url", peer_conninfo(owner, "peer-a")],
                             capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert as_peer.returncode == 2 and "Traceback" not in as_peer.stderr, as_peer
    assert "role pgvpn_peer_a may not manage peers: connect as the owner" in as_peer.stderr
    assert owner.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'pgvpn_peer_b'"
                     ) == [(True,)]
    # and the owner cannot reach around the command
    with psycopg.connect(owner.conninfo(), autocommit=True) as conn, pytest.raises(
            errors.InsufficientPrivilege):
        conn.execute("SELECT pgvpn_admin.exactly_a_peer_role(%s::regrole, true)",
                     [IMPOSTOR_ROLE])


def test_the_report_says_what_was_done() -> None:
    """No lab: the lines for a peer with no routes and no role left, and for one removed
    twice; `pgvpn show`'s state for a removed peer."""
    assert Removal("peer-x", (), False, False, 0).report() == [
        "peer peer-x was already removed: no routes, role pgvpn_peer_x cannot log in, no "
        "session; its logged packets and cursors are kept"]
    lines = Removal("peer-x", ("10.0.0.1/32",), False, False, 0).report()
    assert lines[1] == "peer peer-x: no role pgvpn_peer_x to disable (a superuser dropped it)"
    lines = Removal("peer-x", (), True, False, 2).report()
    assert lines[:2] == ["peer peer-x: had no routes",
                         "peer peer-x: role pgvpn_peer_x could already not log in, password "
                         "cleared; 2 session(s) ended"]
    status = PeerStatus("peer-x", [], None, None, 0, 0, 0, 0, datetime.now(UTC), [],
                        removed=True)
    assert status.state == "removed" and status.as_json()["connected"] is False
