"""Owner-side administration: peers' login roles. Agents never run this."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import psycopg
from psycopg import sql

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

    The peers row is made here, by the owner, because a peer may only touch its own
    row (sql/004_peer_isolation.sql) and a cursor needs both peers' rows.
    """
    name = role_name(peer)
    if conn.execute("SELECT to_regclass('pgvpn.peers')").fetchone() in (None, (None,)):
        raise PgvpnError("the pgvpn schema is missing: run 'pgvpn db migrate' first")
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name]).fetchone()
    verb = sql.SQL("ALTER" if exists else "CREATE")
    conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
        verb, sql.Identifier(name), sql.Literal(scram_verifier(password))))
    conn.execute(sql.SQL("GRANT pgvpn_agent TO {}").format(sql.Identifier(name)))
    conn.execute("INSERT INTO pgvpn.peers (name) VALUES (%s) ON CONFLICT DO NOTHING", [peer])
    return exists is None


SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677).

    Sent instead of the password, so the password never reaches the server, where a
    failed statement or log_statement could write it into the server's log. Non-ASCII
    passwords go as they are: the server applies SASLprep to them, which this does not.
    """
    if not password.isascii():
        return password
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return (f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}"
            f"${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}")
