"""What each check in tests/pgtap/ guards against: a weakening of the database, and
exactly the assertions that must go red against it (tests/test_database_checks.py
applies each one inside the transaction of every pgTAP file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

# sql/init_peer_roles.sql's functions, weakened where they stand, so that a weakening
# keeps up with the function it breaks.
INIT_PEER_ROLES = (Path(__file__).resolve().parent.parent / "sql" / "init_peer_roles.sql"
                   ).read_text()


def init_function(name: str, old: str, new: str) -> str:
    """The CREATE OR REPLACE of pgvpn_admin.`name`, with `old` (there once) made `new`."""
    start = INIT_PEER_ROLES.index(f"CREATE OR REPLACE FUNCTION pgvpn_admin.{name}(")
    text = INIT_PEER_ROLES[start:INIT_PEER_ROLES.index("$$;\n", start) + 4]
    assert text.count(old) == 1, (name, old)
    return text.replace(old, new)


# disable_peer_role without its exactly_a_peer_role check: `pgvpn db remove-peer`
# (the owner) may then lock out and cut off any role a CREATEROLE role may alter.
ANY_ROLE_DISABLE_PEER_ROLE = init_function(
    "disable_peer_role", "IF NOT pgvpn_admin.exactly_a_peer_role(existing, removing => true) THEN",
    "IF false THEN")
# The peer-role check with the caller's pg_temp first and bare catalog names: the
# owner's shadows decide what a peer's role is, and run as pgvpn_peermaker.
SHADOWABLE_PEER_ROLE_CHECK = init_function(
    "exactly_a_peer_role", "search_path = pg_catalog, pg_temp", "search_path = pg_temp, pg_catalog"
).replace("pg_catalog.", "")
OWNER_SHADOWS_DEFEATED = tuple(
    "with its pg_temp shadows first in its search_path, the owner still cannot disable "
    f"pgvpn_tap_{role}" for role in ("extra", "owns", "granted"))
OTHER_ROLES_KEEP_LOGIN = ("no other role lost its login or password: pgvpn_owner, postgres, "
                          "the lab's peers and the refused roles keep theirs")

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
        "table-update-on-cursors",  # before sql/008: LOCK TABLE pgvpn.cursors in any mode
        "GRANT UPDATE ON pgvpn.cursors TO pgvpn_agent;",
        {"03_privileges.sql": red(
            "pgvpn_agent on pgvpn.cursors: SELECT, INSERT",
            "pgvpn_agent on pgvpn.cursors(receiver): SELECT, INSERT",
            "pgvpn_agent on pgvpn.cursors(sender): SELECT, INSERT",
            "relations in pgvpn grant exactly the intended privileges, none to PUBLIC or "
            "anyone else")}),
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
            "pgvpn_tap_new's password is now the second verifier"),
         "10_remove_peer.sql": red(
            "ensure_peer_role takes the removed peer's role back (not new)",
            "pgvpn_tap_gone logs in again, with the new password only")}),
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
            "every type in pgvpn is owned by pgvpn_owner")}),
    Weakening(
        "owner-superuser",
        "ALTER ROLE pgvpn_owner SUPERUSER;",
        {"01_ownership_and_roles.sql": red(
            "role pgvpn_owner: LOGIN, no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS",
            "pgvpn_owner is no superuser",
            "no pgvpn role has SUPERUSER, CREATEROLE (but pgvpn_peermaker), CREATEDB, "
            "REPLICATION or BYPASSRLS"),
         # a superuser holds every privilege, CREATE on pgvpn_admin too
         "03_privileges.sql": red("pgvpn_owner on schema pgvpn_admin: USAGE only"),
         "10_remove_peer.sql": red(
            "the owner cannot call exactly_a_peer_role (only the peer maker's functions do)")}),
    Weakening(
        "peer-attribute",
        "ALTER ROLE pgvpn_peer_b CREATEDB;",
        {"01_ownership_and_roles.sql": red(
            "no pgvpn role has SUPERUSER, CREATEROLE (but pgvpn_peermaker), CREATEDB, "
            "REPLICATION or BYPASSRLS",
            "every member of pgvpn_agent is a peer's LOGIN role (or a removed peer's, with "
            "no password): no attribute, no ADMIN OPTION, no members")}),
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
                                        ("data", "INSERT"), ("offload", "INSERT")))),
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
        "show-report-unchecked",  # sql/010 without its CHECKs: a peer reports -1 bytes
        "ALTER TABLE pgvpn.peers DROP CONSTRAINT peers_received_bytes_not_negative;",
        {"08_show.sql": red("a negative count is refused (CHECK)",
                            "its report is what it wrote")}),
    Weakening(
        "show-reports-of-others",  # a peers policy that lets a peer write every row
        "ALTER POLICY own_row ON pgvpn.peers USING (true) WITH CHECK (true);",
        {"03_privileges.sql": red(
            "every policy in pgvpn is permissive with exactly its intended USING and WITH "
            "CHECK"),
         "04_attacks.sql": red("the peer sees only its own peers row"),
         "08_show.sql": red(
            "a peer writes its own report",
            "a peer cannot touch another peer's report (RLS: no row)",
            "a peer sees only its own report")}),
    Weakening(
        "routes-overlap",  # sql/011 without its exclusion constraint: two peers, one prefix
        "ALTER TABLE pgvpn.routes DROP CONSTRAINT routes_do_not_overlap;",
        {"09_routes.sql": red(
            "a shorter prefix over another peer's route is refused",
            "a longer prefix inside another peer's route is refused",
            "another peer's address is refused",
            "a default route over the others is refused",
            "a peer's own routes do not overlap either",
            # the overlapping rows went in, so the counts differ too
            "a peer reads every peer's routes", "a reader reads every route")}),
    Weakening(
        "routes-written-by-peers",  # a peer that may route itself anything
        "GRANT INSERT, UPDATE, DELETE ON pgvpn.routes TO pgvpn_agent;",
        {"03_privileges.sql": red(
            "pgvpn_agent on pgvpn.routes: SELECT",
            "relations in pgvpn grant exactly the intended privileges, none to PUBLIC or "
            "anyone else"),
         "09_routes.sql": red(
            "a peer adds no route",
            "a peer cannot take another peer's route",
            "a peer removes no route",
            "a reader reads every route")}),  # the peer's DELETE went through
    Weakening(
        "remove-peer-any-role",  # disable_peer_role without its exactly-a-peer check
        ANY_ROLE_DISABLE_PEER_ROLE,
        {"10_remove_peer.sql": red(
            # SUPERUSER and REPLICATION roles stay refused: PostgreSQL itself keeps
            # CREATEROLE from altering those
            *(f"refuses to disable the existing role pgvpn_tap_{role} ({why})"
              for role, why in (("createrole", "CREATEROLE"), ("createdb", "CREATEDB"),
                                ("bypassrls", "BYPASSRLS"), ("nogroup", "not in pgvpn_agent"),
                                ("extra", "also in pg_read_all_data"),
                                ("signal", "also in pg_signal_backend"),
                                ("reader", "also in pgvpn_reader"),
                                ("hasmember", "has a member"),
                                ("admin", "pgvpn_agent WITH ADMIN OPTION"),
                                ("owns", "owns a schema"),
                                ("granted", "holds a privilege of its own"))),
            *OWNER_SHADOWS_DEFEATED, OTHER_ROLES_KEEP_LOGIN)}),
    Weakening(
        "peer-role-check-shadowable",  # the owner's pg_temp decides, and runs as peermaker
        SHADOWABLE_PEER_ROLE_CHECK,
        {"02_functions.sql": red(
            "pgvpn_admin.exactly_a_peer_role(oid,boolean) has search_path = pg_catalog, "
            "pg_temp",
            SEARCH_PATH_ANY),
         "10_remove_peer.sql": red(
            *OWNER_SHADOWS_DEFEATED, OTHER_ROLES_KEEP_LOGIN,
            "no shadow of the owner's ran as anyone but the owner",
            "no shadow ran as another role even in a call that failed (counter untouched)",
            # its payload: pgvpn_peermaker's CREATEROLE gave the owner
            # pg_execute_server_program
            "no membership was left behind: pgvpn_peermaker's one-call membership of the "
            "peer role is gone")}),
    Weakening(
        "plpgsql-bugs",
        BROKEN_TRIGGER,
        {"06_plpgsql_check.sql": red(
            "plpgsql_check: pgvpn.blog_v1_notify() has no error and no warning but the "
            "accepted ones")}),
]
