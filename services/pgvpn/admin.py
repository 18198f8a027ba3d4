"""Owner-side administration: peers' login roles. Agents never run this."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgvpn.config import PEER_NAME
from pgvpn.errors import PgvpnError


def role_name(peer: str) -> str:
    """The database role of a peer: peer-a -> pgvpn_peer_a."""
    if not PEER_NAME.match(peer):
        raise PgvpnError(f"peer name {peer!r}: use lower-case letters, digits, '-' or '_'")
    return "pgvpn_" + peer.replace("-", "_")


def ensure_peer_role(conn: psycopg.Connection, peer: str, password: str) -> bool:
    """Create or update `peer`'s LOGIN role (SCRAM) in pgvpn_agent; True if it was new."""
    name = role_name(peer)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name]).fetchone()
    verb = sql.SQL("ALTER" if exists else "CREATE")
    # password_encryption defaults to scram-sha-256: the server stores only the verifier.
    conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
        verb, sql.Identifier(name), sql.Literal(password)))
    conn.execute(sql.SQL("GRANT pgvpn_agent TO {}").format(sql.Identifier(name)))
    return exists is None
