"""Whether an agent's database connection is fit to carry packets: TLS unless told otherwise.

Every packet crosses the network between an agent and PostgreSQL, so a plaintext
connection would expose (and let a man in the middle alter) all tunnel traffic and
the agent's password exchange. The policy:
- unless the user chose an sslmode (connection string or PGSSLMODE), agents ask for
  `verify-full`: TLS, with the server's certificate checked against sslrootcert
  and its name or address against the host connected to;
- a TCP connection without TLS is refused unless `allow_plaintext` is set, and then
  the agent says so in a warning at start;
- a Unix socket is local: it never leaves the host, so it needs no TLS (libpq does
  not use TLS on sockets at all).
"""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn.errors import DatabaseError

DEFAULT_SSLMODE = "verify-full"
VERIFIED = {"verify-full"}


def agent_conninfo(conninfo: str, allow_plaintext: bool) -> str:
    """`conninfo` with sslmode=verify-full added when the user chose no sslmode."""
    if allow_plaintext or os.environ.get("PGSSLMODE"):
        return conninfo
    if "sslmode" in conninfo_to_dict(conninfo):
        return conninfo
    return make_conninfo(conninfo, sslmode=DEFAULT_SSLMODE)


def is_local_socket(conn: psycopg.Connection) -> bool:
    host = conn.info.host
    return not host or host.startswith(("/", "@"))


def sslmode(conn: psycopg.Connection) -> str:
    """The sslmode libpq used for this connection (its default is 'prefer')."""
    for option in conn.pgconn.info:
        if option.keyword == b"sslmode":
            return (option.val or b"prefer").decode()
    return "prefer"


def describe(conn: psycopg.Connection) -> str:
    """How the connection is protected, in a few words for the agent's start line."""
    if is_local_socket(conn):
        return "local socket"
    if not conn.pgconn.ssl_in_use:
        return "PLAINTEXT"
    row = conn.execute("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                       ).fetchone()
    protocol = row[0] if row and row[0] else "TLS"
    mode = sslmode(conn)
    return f"{protocol}, " + ("server verified" if mode in VERIFIED
                              else f"server NOT verified (sslmode={mode})")


def check(conn: psycopg.Connection, allow_plaintext: bool) -> None:
    """Raise DatabaseError for a TCP connection without TLS, unless plaintext is allowed."""
    if allow_plaintext or is_local_socket(conn) or conn.pgconn.ssl_in_use:
        return
    raise DatabaseError(
        f"the connection to {conn.info.host}:{conn.info.port} is not encrypted "
        f"(sslmode={sslmode(conn)}): every packet would cross the network readable and "
        "alterable. Use TLS (sslmode=verify-full and the server's CA in sslrootcert, or "
        "PGSSLMODE/PGSSLROOTCERT), or set allow_plaintext (PGVPN_ALLOW_PLAINTEXT=true) "
        "to run without it")


def risks(conn: psycopg.Connection) -> str | None:
    """What an operator should be warned of about this connection, or None."""
    if is_local_socket(conn):
        return None
    if not conn.pgconn.ssl_in_use:
        return ("running WITHOUT TLS (allow_plaintext): every packet crosses the network "
                "to the database unencrypted")
    mode = sslmode(conn)
    if mode not in VERIFIED:
        return (f"TLS without verifying the server (sslmode={mode}): a man in the middle "
                "can read and alter packets; use sslmode=verify-full with sslrootcert")
    return None
