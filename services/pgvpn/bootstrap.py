"""`pgvpn db init`: what a superuser does once, so that nothing else needs one.

It makes the roles (the owner, the group roles pgvpn_agent and pgvpn_reader, and
pgvpn_peermaker behind the functions that make and disable peer roles), the database
owned by the owner, and takes CONNECT, TEMPORARY and advisory locks in it away
from PUBLIC (peers take their own locks through pgvpn.lock_own). A
database that an earlier pgvpn made as a superuser is handed over to the owner,
schema and all. Afterwards `pgvpn db migrate`, `add-peer`, `remove-peer`, `prune`
and `retention` run as the owner, so a hole in any function the owner runs yields
the owner's rights at most, never a superuser's (SECURITY.md, the roles).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgvpn.errors import PgvpnError

OWNER = "pgvpn_owner"
PEER_MAKER = "pgvpn_peermaker"
GROUP_ROLES = ("pgvpn_agent", "pgvpn_reader")
# What schema pgvpn_admin holds (sql/init_peer_roles.sql): the two functions the owner
# may call, and the check they share, which nobody else may call.
OWNER_FUNCTIONS = ("pgvpn_admin.disable_peer_role(text)",
                   "pgvpn_admin.ensure_peer_role(text,text)")
PEER_MAKER_FUNCTIONS = (*OWNER_FUNCTIONS, "pgvpn_admin.exactly_a_peer_role(oid,boolean)")
ROLE_NAME = re.compile(r"\A[a-z_][a-z0-9_]{0,62}\Z")
DATABASE_NAME = re.compile(r"\A[a-z_][a-z0-9_-]{0,62}\Z")
# Relations of the schema by kind, for handing them over; each partition is handed
# over by itself (ALTER TABLE does not recurse), indexes, TOAST tables and sequences
# owned by a column follow their table.
ALTER_KIND = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW",
              "f": "FOREIGN TABLE", "S": "SEQUENCE"}
Progress = Callable[[str], None]
# Every function that takes an advisory lock (session or transaction, shared or not,
# waiting or trying; bigint and int-pair keys): 16 in PostgreSQL 15.  Unlocking
# touches only the caller's own locks and stays PUBLIC's.
ADVISORY_LOCKS = ("SELECT p.oid::regprocedure::text FROM pg_proc p "
                  "WHERE p.pronamespace = 'pg_catalog'::regnamespace "
                  "AND p.proname ~ '^pg_(try_)?advisory_(xact_)?lock(_shared)?$' ORDER BY 1")


def owner_role(name: str) -> str:
    """A role name for the owner: not one of pgvpn's other roles, no quoting needed."""
    if (not ROLE_NAME.match(name) or name in (*GROUP_ROLES, PEER_MAKER)
            or name.startswith("pg_")):
        raise ValueError(f"use 1-63 lower-case letters, digits and '_' (not pg_..., "
                         f"{', '.join((*GROUP_ROLES, PEER_MAKER))})")
    return name


def database_name(name: str) -> str:
    if not DATABASE_NAME.match(name):
        raise ValueError("use 1-63 lower-case letters, digits, '_' and '-'")
    return name


def verifier(conn: psycopg.Connection, role: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of `password`, made by libpq on the client.

    PQencryptPasswordConn applies SASLprep as the server would, so any password
    works and only the verifier ever reaches the server (and its log).
    """
    return conn.pgconn.encrypt_password(password.encode(), role.encode(),
                                        b"scram-sha-256").decode()


def init_database(conninfo: str, database: str, owner: str, owner_password: str | None,
                  progress: Progress) -> None:
    """Roles, database, privileges and the peer-role function; safe to run again."""
    for check, value, what in ((owner_role, owner, "owner role"),
                               (database_name, database, "database name")):
        try:
            check(value)
        except ValueError as exc:
            raise PgvpnError(f"{what} {value!r}: {exc}") from None
    with _superuser(conninfo) as conn:
        row = conn.execute("SELECT rolsuper, current_setting('server_version_num')::int "
                           "FROM pg_roles WHERE rolname = current_user").fetchone()
        if not row or not row[0]:
            raise PgvpnError("'pgvpn db init' needs a superuser connection (it creates the "
                             "roles and the database once; nothing after it needs one)")
        if not 150000 <= row[1] < 160000:
            raise PgvpnError(f"PostgreSQL {row[1] // 10000} is not supported yet: the peer "
                             "roles' rules rest on PostgreSQL 15's CREATEROLE (16 changed it)")
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              [database]).fetchone()
    if exists:
        with _superuser(conninfo, database) as conn:
            _refuse_foreign_database(conn, database)
    with _superuser(conninfo) as conn:
        _ensure_roles(conn, owner, owner_password, progress)
        _ensure_database(conn, database, owner, progress)
    with _superuser(conninfo, database) as conn, conn.transaction():
        _restrict_database(conn, database, owner)
        _hand_over_schema(conn, owner, progress)
        conn.execute(sql.SQL(resources.files("pgvpn.migrations")
                             .joinpath("init_peer_roles.sql").read_text()))
        _check_peer_maker_schema(conn)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgvpn_admin TO {owner}; "
                             "GRANT EXECUTE ON FUNCTION {functions} TO {owner}").format(
            owner=sql.Identifier(owner),
            functions=sql.SQL(", ").join(map(sql.SQL, OWNER_FUNCTIONS))))
    progress(f"database {database} ready; its owner {owner} runs the rest")


def _superuser(conninfo: str, database: str | None = None) -> psycopg.Connection:
    """A superuser session that nothing the owner made can reach into.

    The owner owns the database and its schema public, and may set the database's
    search_path: the session's own, given at connect, comes first and names only
    the catalog (pg_temp, last, is the superuser's own).
    """
    params = {"dbname": database} if database else {}
    return psycopg.connect(make_conninfo(conninfo, **params), autocommit=True,
                           connect_timeout=10, options="-c search_path=pg_catalog,pg_temp")


def _refuse_foreign_database(conn: psycopg.Connection, database: str) -> None:
    """An existing database is taken over only if it is pgvpn's or holds nothing yet.

    Handing another application's database to the owner would give the owner its
    schema public and cut every other role's CONNECT.
    """
    if database in ("postgres", "template0", "template1"):
        raise PgvpnError(f"database {database} is the server's own: give pgvpn a database "
                         "of its own (--database)")
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'pgvpn'), "
        "(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
        " AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'"
        " AND n.nspname NOT IN ('pgvpn', 'pgvpn_admin'))").fetchone()
    assert row is not None
    has_pgvpn, foreign = row
    if not has_pgvpn and foreign:
        raise PgvpnError(f"database {database} already holds {foreign} relation(s) of "
                         "something else: give pgvpn a database of its own (--database)")


# What a role found already in place may be, so that pgvpn's rules about it hold:
# attributes that would give it more than its part, and memberships it must not have.
ROLE_PROBLEMS = """
SELECT concat_ws(', ',
    CASE WHEN r.rolsuper THEN 'SUPERUSER' END,
    CASE WHEN r.rolcreaterole AND NOT %(maker)s THEN 'CREATEROLE' END,
    CASE WHEN r.rolreplication THEN 'REPLICATION' END,
    CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END,
    CASE WHEN r.rolcanlogin AND NOT %(login)s THEN 'LOGIN' END,
    (SELECT 'member of ' || string_agg(m.roleid::regrole::text, ', ')
     FROM pg_auth_members m WHERE m.member = r.oid),
    CASE WHEN %(maker)s THEN (SELECT 'has members ' || string_agg(m.member::regrole::text, ', ')
                             FROM pg_auth_members m WHERE m.roleid = r.oid) END)
FROM pg_roles r WHERE r.rolname = %(name)s
"""


def _existing_role(conn: psycopg.Connection, name: str, *, login: bool = False,
                   maker: bool = False) -> bool:
    """True if role `name` exists; PgvpnError if it is more than pgvpn's part for it."""
    row = conn.execute(ROLE_PROBLEMS, {"name": name, "login": login, "maker": maker}
                       ).fetchone()
    if row is None:
        return False
    if row[0]:
        raise PgvpnError(f"role {name} exists and is more than pgvpn's part for it "
                         f"({row[0]}): a superuser must change or remove it first")
    return True


def _ensure_roles(conn: psycopg.Connection, owner: str, password: str | None,
                  progress: Progress) -> None:
    for group in GROUP_ROLES:
        if not _existing_role(conn, group):
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
            progress(f"created group role {group}")
    if not _existing_role(conn, PEER_MAKER, maker=True):
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN INHERIT CREATEROLE")
                     .format(sql.Identifier(PEER_MAKER)))
        progress(f"created {PEER_MAKER} (owns the functions that make and disable peer "
                 "roles)")
    elif conn.execute("SELECT NOT rolinherit FROM pg_roles WHERE rolname = %s",
                      [PEER_MAKER]).fetchone() == (True,):
        # an earlier init's: disable_peer_role ends a peer's sessions through a
        # membership it holds for one call, which a NOINHERIT role could not use
        conn.execute(sql.SQL("ALTER ROLE {} INHERIT").format(sql.Identifier(PEER_MAKER)))
        progress(f"{PEER_MAKER}: NOINHERIT -> INHERIT (it is a member of nothing; "
                 "sql/init_peer_roles.sql says why)")
    found = _existing_role(conn, owner, login=True)
    password_clause = (sql.SQL(" PASSWORD {}").format(
        sql.Literal(verifier(conn, owner, password))) if password else sql.SQL(""))
    if not found:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                             "NOREPLICATION NOBYPASSRLS{}").format(sql.Identifier(owner),
                                                                   password_clause))
        progress(f"created owner role {owner}")
    elif password:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN{}").format(sql.Identifier(owner),
                                                            password_clause))


def _ensure_database(conn: psycopg.Connection, database: str, owner: str,
                     progress: Progress) -> None:
    row = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                       [database]).fetchone()
    if row is None:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(database), sql.Identifier(owner)))
        progress(f"created database {database} owned by {owner}")
    elif row[0] != owner:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(database), sql.Identifier(owner)))
        progress(f"database {database}: owner {row[0]} -> {owner}")


def _check_peer_maker_schema(conn: psycopg.Connection) -> None:
    """pgvpn_admin must be pgvpn_peermaker's and hold its functions, nothing else.

    The owner may create schemas in its database: one it made in advance under this
    name would otherwise stay its own, beside the functions that have CREATEROLE.
    """
    row = conn.execute(
        "SELECT pg_get_userbyid(n.nspowner), "
        "ARRAY(SELECT p.oid::regprocedure::text FROM pg_proc p "
        "      WHERE p.pronamespace = n.oid), "
        "(SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid) + "
        "(SELECT count(*) FROM pg_type t WHERE t.typnamespace = n.oid) + "
        "(SELECT count(*) FROM pg_operator o WHERE o.oprnamespace = n.oid) "
        "FROM pg_namespace n WHERE n.nspname = 'pgvpn_admin'").fetchone()
    if row is None or (row[0], sorted(row[1]), row[2]) != (
            PEER_MAKER, sorted(PEER_MAKER_FUNCTIONS), 0):
        raise PgvpnError(f"schema pgvpn_admin is not as pgvpn makes it (owner and objects: "
                         f"{row}): a superuser must drop it, then run 'pgvpn db init' again")


def _restrict_database(conn: psycopg.Connection, database: str, owner: str) -> None:
    """CONNECT for pgvpn's roles only; TEMPORARY for nobody but the owner; advisory
    locks for the owner only (peers take their own through pgvpn.lock_own, 007)."""
    name = sql.Identifier(database)
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(name))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        name, sql.SQL(", ").join(map(sql.Identifier, GROUP_ROLES))))
    conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    # pg_proc is per database: this changes who may lock here, nowhere else.
    functions = sql.SQL(", ").join(
        sql.SQL(function) for (function,) in conn.execute(ADVISORY_LOCKS).fetchall())
    conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(functions))
    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
        functions, sql.Identifier(owner)))


def _hand_over_schema(conn: psycopg.Connection, owner: str, progress: Progress) -> None:
    """Make `owner` the owner of schema pgvpn and everything in it (an earlier install's)."""
    row = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace "
                       "WHERE nspname = 'pgvpn'").fetchone()
    if row is None:
        return
    to = sql.Identifier(owner)
    if row[0] != owner:
        conn.execute(sql.SQL("ALTER SCHEMA pgvpn OWNER TO {}").format(to))
    relations = conn.execute(
        "SELECT c.oid::regclass::text, c.relkind FROM pg_class c "
        "WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind = ANY(%s) "
        "AND c.relowner <> %s::regrole "
        "AND NOT (c.relkind = 'S' AND EXISTS (SELECT FROM pg_depend d "
        "         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid "
        "         AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))) "
        "ORDER BY c.oid", [list(ALTER_KIND), owner]).fetchall()
    for relation, kind in relations:
        conn.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
            sql.SQL(ALTER_KIND[kind]), sql.SQL(relation), to))
    routines = conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p "
                            "WHERE p.pronamespace = 'pgvpn'::regnamespace "
                            "AND p.proowner <> %s::regrole", [owner]).fetchall()
    for (routine,) in routines:
        conn.execute(sql.SQL("ALTER ROUTINE {} OWNER TO {}").format(sql.SQL(routine), to))
    if row[0] != owner or relations or routines:
        progress(f"schema pgvpn: owner {row[0]} -> {owner} ({len(relations)} relations, "
                 f"{len(routines)} functions handed over)")
