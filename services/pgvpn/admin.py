"""Owner-side administration: peers' login roles. Agents never run this."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pgvpn.bootstrap import verifier
from pgvpn.config import PEER_NAME, RESERVED_PEER_NAMES
from pgvpn.errors import PgvpnError
from pgvpn.routes import peer_routes


def role_name(peer: str) -> str:
    """The database role of a peer: peer-a -> pgvpn_peer_a.

    The database maps the role back to the peer (pgvpn.current_peer()), which is
    what makes a peer's rows its own; names without '_' keep that mapping one-to-one.
    """
    if not PEER_NAME.match(peer) or peer in RESERVED_PEER_NAMES:
        raise PgvpnError(f"peer name {peer!r}: use 1-57 lower-case letters, digits or '-' "
                         f"(not {' or '.join(sorted(RESERVED_PEER_NAMES))})")
    return "pgvpn_" + peer.replace("-", "_")


def ensure_peer_role(conn: psycopg.Connection, peer: str, password: str) -> bool:
    """Create or update `peer`'s LOGIN role (SCRAM) and its peers row; True if it was new.

    The owner makes roles only through pgvpn_admin.ensure_peer_role (`pgvpn db init`),
    which makes nothing but peer roles. The peers row is made here, by the owner,
    because a peer may only touch its own row and a cursor needs both peers' rows.
    """
    name = role_name(peer)
    require_admin_function(conn, "ensure_peer_role(text, text)")
    try:
        row = conn.execute("SELECT pgvpn_admin.ensure_peer_role(%s, %s)",
                           [peer, verifier(conn, name, password)]).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PgvpnError(f"cannot make the role of peer {peer}: {exc.diag.message_primary} "
                         f"({exc.diag.message_hint or 'connect as the owner of pgvpn'})"
                         ) from None
    conn.execute("INSERT INTO pgvpn.peers (name) VALUES (%s) ON CONFLICT DO NOTHING", [peer])
    return bool(row and row[0])


def require_admin_function(conn: psycopg.Connection, function: str) -> None:
    """The schema, and the pgvpn_admin function the command needs: each missing one
    named with what makes it (an older `pgvpn db init` made no disable_peer_role)."""
    if conn.execute("SELECT to_regclass('pgvpn.peers')").fetchone() in (None, (None,)):
        raise PgvpnError("the pgvpn schema is missing: run 'pgvpn db migrate' first")
    try:
        found = conn.execute("SELECT to_regprocedure(%s)", [f"pgvpn_admin.{function}"]
                             ).fetchone()
    except psycopg.errors.InsufficientPrivilege:  # no USAGE on pgvpn_admin: not the owner
        raise PgvpnError(f"role {conn.info.user} may not manage peers: connect as the owner "
                         "of pgvpn (--database-url or DATABASE_URL)") from None
    if found in (None, (None,)):
        raise PgvpnError(f"pgvpn_admin.{function.split('(')[0]} is missing: a superuser "
                         "runs 'pgvpn db init' (again: it is safe to) to make it")


@dataclass(frozen=True)
class Removal:
    """What `pgvpn db remove-peer` did, for its report."""

    peer: str
    routes: tuple[str, ...]  # the routes it deleted
    role_found: bool  # False: the peer had no login role left to disable
    was_login: bool  # the role could log in until now
    sessions: int  # sessions of the role ended

    @property
    def anything_done(self) -> bool:
        return bool(self.routes) or self.was_login or self.sessions > 0

    def report(self) -> list[str]:
        """One line per thing done, then what was kept and how to undo it."""
        name, peer = role_name(self.peer), self.peer
        if not self.anything_done:
            return [f"peer {peer} was already removed: no routes, role {name} cannot log in, "
                    "no session; its logged packets and cursors are kept"]
        lines = [f"peer {peer}: routes {', '.join(self.routes)} deleted (agents that route "
                 "by the table drop them)" if self.routes else f"peer {peer}: had no routes"]
        if not self.role_found:
            lines.append(f"peer {peer}: no role {name} to disable (a superuser dropped it)")
        else:
            lines.append(f"peer {peer}: role {name} "
                         f"{'can no longer' if self.was_login else 'could already not'} "
                         f"log in, password cleared; {self.sessions} session(s) ended")
        lines.append(f"peer {peer} removed; its logged packets and cursors are kept "
                     f"(pgvpn log --peer {peer}); 'pgvpn db add-peer {peer} --password-file "
                     "FILE' brings it back")
        return lines


DISABLE = "SELECT was_login, sessions_ended FROM pgvpn_admin.disable_peer_role(%s)"


def remove_peer(conn: psycopg.Connection, peer: str) -> Removal:
    """Remove `peer` the way `wg set ... peer X remove` does: at once, in one transaction.

    Its routes are deleted (the routes trigger tells every agent), its role loses LOGIN
    and its sessions end (pgvpn_admin.disable_peer_role, the owner's only way to touch
    a role). Its pgvpn.peers row is never deleted: the cursors (and routes) reference
    it ON DELETE CASCADE, and nothing the product does may delete what was logged.
    `add-peer` brings the peer back; its seq numbering continues from the log.
    """
    name = role_name(peer)
    require_admin_function(conn, "disable_peer_role(text)")
    with conn.transaction():
        # no FOR UPDATE: a peer may hold a lock on its own row for as long as it likes
        if conn.execute("SELECT FROM pgvpn.peers WHERE name = %s", [peer]).fetchone() is None:
            raise PgvpnError(f"no peer {peer}: 'pgvpn show' lists the peers")
        routes = tuple(peer_routes(conn).get(peer, []))
        conn.execute("DELETE FROM pgvpn.routes WHERE peer = %s", [peer])
        role_found = conn.execute("SELECT FROM pg_roles WHERE rolname = %s",
                                  [name]).fetchone() is not None
        was_login, sessions = False, 0
        if role_found:
            try:
                row = conn.execute(DISABLE, [peer]).fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                hint = exc.diag.message_hint or "connect as the owner of pgvpn"
                raise PgvpnError(f"cannot remove peer {peer} (nothing changed): "
                                 f"{exc.diag.message_primary} ({hint})") from None
            assert row is not None
            was_login, sessions = bool(row[0]), int(row[1])
    if role_found:
        # A login that authenticated before the commit above made it NOLOGIN: end it too.
        row = conn.execute(DISABLE, [peer]).fetchone()
        sessions += int(row[1]) if row else 0
    return Removal(peer, routes, role_found, was_login, sessions)
