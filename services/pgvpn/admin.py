"""Owner-side administration: peers' login roles. Agents never run this."""

from __future__ import annotations

import psycopg

from pgvpn.bootstrap import verifier
from pgvpn.config import PEER_NAME, RESERVED_PEER_NAMES
from pgvpn.errors import PgvpnError


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
    if conn.execute("SELECT to_regclass('pgvpn.peers')").fetchone() in (None, (None,)):
        raise PgvpnError("the pgvpn schema is missing: run 'pgvpn db migrate' first")
    found = conn.execute("SELECT to_regprocedure('pgvpn_admin.ensure_peer_role(text, text)')"
                         ).fetchone()
    if found in (None, (None,)):
        raise PgvpnError("pgvpn_admin.ensure_peer_role is missing: a superuser runs "
                         "'pgvpn db init' once before peers can be added")
    try:
        row = conn.execute("SELECT pgvpn_admin.ensure_peer_role(%s, %s)",
                           [peer, verifier(conn, name, password)]).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PgvpnError(f"cannot make the role of peer {peer}: {exc.diag.message_primary} "
                         f"({exc.diag.message_hint or 'connect as the owner of pgvpn'})"
                         ) from None
    conn.execute("INSERT INTO pgvpn.peers (name) VALUES (%s) ON CONFLICT DO NOTHING", [peer])
    return bool(row and row[0])
