-- `pgvpn db init` (as a superuser, once; again at every run, idempotently): the only
-- way the owner makes, re-passwords and disables peer roles.
--
-- Not a migration: migrations run as the owner, who is no superuser and has no
-- CREATEROLE (in PostgreSQL 15 CREATEROLE may grant itself nearly anything, e.g.
-- pg_execute_server_program).  Instead one NOLOGIN role, pgvpn_peermaker, has
-- CREATEROLE and owns these functions; nobody is a member of it, it is a member of
-- nothing, and the owner may only call ensure_peer_role and disable_peer_role.  So
-- the most a compromised owner can do with roles is what `pgvpn db add-peer` and
-- `pgvpn db remove-peer` do: make, re-password or disable a peer role that has no
-- attribute and no membership but pgvpn_agent, and end that role's sessions.
--
-- The functions touch only the catalog (never a pgvpn table, which the owner
-- could replace with something that runs code as the caller), name everything
-- qualified under a search_path with pg_temp last, and take a password only as
-- a SCRAM verifier, so no password ever reaches the server or its log.

CREATE SCHEMA IF NOT EXISTS pgvpn_admin AUTHORIZATION pgvpn_peermaker;
REVOKE ALL ON SCHEMA pgvpn_admin FROM PUBLIC;

-- Whether role `role_oid` is exactly a peer's role, the only kind the functions below
-- change: no attribute, member of pgvpn_agent (without ADMIN OPTION, which would let
-- it hand the group to anyone) and of nothing else, no member of its own, no object,
-- privilege or setting of its own.  Anything else (the owner, a superuser, a group
-- role, a role someone granted more to) re-passworded would hand the caller a login
-- with rights beyond a peer's, and disabled would let the owner lock out a role that
-- is not its to manage.  LOGIN is no attribute here: a removed peer has none.
--
-- `removing` (disable_peer_role): what any role may make by itself does not count,
-- or a hostile peer could make itself impossible to remove, or another peer, with one
-- statement of its own: settings of its own (ALTER ROLE CURRENT_USER SET ...), large
-- objects (lo_create, GRANT on them) and default privileges (ALTER DEFAULT PRIVILEGES
-- FOR ROLE CURRENT_USER ... TO anyone), each of which it may own or be named in.
-- Attributes and memberships no peer can give itself or another, nor objects of any
-- other kind (peers have no CREATE anywhere), so those are still refused.
-- Callable by nobody but pgvpn_peermaker (through the two functions).
CREATE OR REPLACE FUNCTION pgvpn_admin.exactly_a_peer_role(role_oid oid, removing boolean)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = role_oid
                   AND NOT (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb
                            OR r.rolreplication OR r.rolbypassrls))
       AND EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                   WHERE m.member = role_oid AND NOT m.admin_option
                     AND m.roleid = 'pgvpn_agent'::pg_catalog.regrole)
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                       WHERE (m.member = role_oid
                              AND m.roleid <> 'pgvpn_agent'::pg_catalog.regrole)
                          OR m.roleid = role_oid)
       -- owns nothing, holds no privilege of its own, has no settings of its own
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_shdepend d
                       WHERE d.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
                         AND d.refobjid = role_oid
                         AND NOT (removing AND d.classid IN (
                             'pg_catalog.pg_largeobject'::pg_catalog.regclass,
                             'pg_catalog.pg_default_acl'::pg_catalog.regclass)))
       AND (removing OR NOT EXISTS (SELECT FROM pg_catalog.pg_db_role_setting s
                                    WHERE s.setrole = role_oid))
$$;
ALTER FUNCTION pgvpn_admin.exactly_a_peer_role(oid, boolean) OWNER TO pgvpn_peermaker;
REVOKE ALL ON FUNCTION pgvpn_admin.exactly_a_peer_role(oid, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgvpn_admin.ensure_peer_role(peer text, verifier text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    role_name text;
    existing oid;
    parts text[];
BEGIN
    IF peer IS NULL OR peer !~ '^[a-z0-9][a-z0-9-]{0,56}$'
       OR peer IN ('agent', 'reader', 'owner', 'peermaker') THEN
        RAISE EXCEPTION 'invalid peer name: %', pg_catalog.quote_nullable(peer)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use 1-57 lower-case letters, digits or "-" (not agent, reader, '
                         'owner or peermaker)';
    END IF;
    -- What PostgreSQL itself takes as a SCRAM secret (parse_scram_secret): anything
    -- else it would hash as a plaintext password, which would then have reached the
    -- server.  Iterations, a base64 salt, and two base64 keys of 32 bytes each.
    parts := pg_catalog.regexp_match(verifier,
        '^SCRAM-SHA-256\$([1-9][0-9]{0,8}):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$');
    BEGIN
        IF parts IS NULL
           OR pg_catalog.length(pg_catalog.decode(parts[2], 'base64')) < 1
           OR pg_catalog.length(pg_catalog.decode(parts[3], 'base64')) <> 32
           OR pg_catalog.length(pg_catalog.decode(parts[4], 'base64')) <> 32 THEN
            parts := NULL;
        END IF;
    EXCEPTION WHEN invalid_parameter_value THEN  -- not base64 after all
        parts := NULL;
    END;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'a peer''s password is accepted only as a SCRAM-SHA-256 verifier'
            USING ERRCODE = 'invalid_password',
                  HINT = 'pgvpn db add-peer computes it on the client';
    END IF;
    role_name := 'pgvpn_' || pg_catalog.replace(peer, '-', '_');
    SELECT r.oid INTO existing FROM pg_catalog.pg_roles r WHERE r.rolname = role_name;
    IF existing IS NULL THEN
        EXECUTE pg_catalog.format(
            'CREATE ROLE %I WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE '
            'NOREPLICATION NOBYPASSRLS PASSWORD %L', role_name, verifier);
        EXECUTE pg_catalog.format('GRANT pgvpn_agent TO %I', role_name);
        RETURN true;
    END IF;
    -- An existing role is re-passworded only if it is exactly a peer's role (a removed
    -- peer's too: this brings it back).
    IF NOT pgvpn_admin.exactly_a_peer_role(existing, removing => false) THEN
        RAISE EXCEPTION 'role % exists and is not only a pgvpn peer''s role', role_name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a superuser must remove or rename that role first';
    END IF;
    EXECUTE pg_catalog.format('ALTER ROLE %I WITH LOGIN PASSWORD %L', role_name, verifier);
    RETURN false;
END
$$;

ALTER FUNCTION pgvpn_admin.ensure_peer_role(text, text) OWNER TO pgvpn_peermaker;
REVOKE ALL ON FUNCTION pgvpn_admin.ensure_peer_role(text, text) FROM PUBLIC;

-- `pgvpn db remove-peer`: the peer's role can no longer log in (NOLOGIN, and its
-- password cleared, so that nothing but `pgvpn db add-peer` with a new password lets
-- it in again), and its sessions are ended now: an agent already connected is cut
-- off, not left sending.  Only exactly a peer's role (exactly_a_peer_role), as for
-- ensure_peer_role, but blind to what a peer can make by itself (see there); the
-- peers row, its routes and its logged packets are the owner's to keep (remove-peer
-- deletes the routes, nothing else), never this function's.
--
-- Ending the sessions: pg_terminate_backend lets a non-superuser signal a backend
-- only if it has the privileges of the backend's role, or of pg_signal_backend.
-- pg_signal_backend would reach every non-superuser session (the owner's, readers',
-- every peer's); so, for the length of this call only, pgvpn_peermaker grants itself
-- membership in this one peer role (CREATEROLE may: it holds ADMIN of every
-- non-superuser role in PostgreSQL 15), signals that role's sessions and nobody
-- else's, and revokes the membership before returning.  The membership exists only
-- inside the caller's transaction: no other session ever sees it, and an error
-- anywhere rolls it back.  For it to confer the privilege pgvpn_peermaker must be
-- INHERIT (in PostgreSQL 15 a NOINHERIT role gains nothing from its memberships);
-- since it is a member of nothing else, INHERIT changes nothing outside this call.
-- A session of any other role is never signalled: the pids come from this role's
-- sessions only, and PostgreSQL itself would refuse any other (no privilege of it).
-- Each backend is waited for (up to 5 s), so that when this returns the sessions it
-- counts are gone.  They are ended before ALTER ROLE: a peer may alter its own role
-- (its password, its settings) in a transaction it keeps open, and ALTER ROLE would
-- wait for that transaction for as long as the peer liked.  A login that
-- authenticated before the caller commits can outlive this call: `pgvpn db
-- remove-peer` calls it once more after its commit.
CREATE OR REPLACE FUNCTION pgvpn_admin.disable_peer_role(
    peer text, OUT was_login boolean, OUT sessions_ended integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    role_name text;
    existing oid;
    backend integer;
BEGIN
    IF peer IS NULL OR peer !~ '^[a-z0-9][a-z0-9-]{0,56}$'
       OR peer IN ('agent', 'reader', 'owner', 'peermaker') THEN
        RAISE EXCEPTION 'invalid peer name: %', pg_catalog.quote_nullable(peer)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use 1-57 lower-case letters, digits or "-" (not agent, reader, '
                         'owner or peermaker)';
    END IF;
    role_name := 'pgvpn_' || pg_catalog.replace(peer, '-', '_');
    SELECT r.oid, r.rolcanlogin INTO existing, was_login
    FROM pg_catalog.pg_roles r WHERE r.rolname = role_name;
    IF existing IS NULL THEN
        RAISE EXCEPTION 'role % does not exist', role_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'pgvpn show lists the peers';
    END IF;
    IF NOT pgvpn_admin.exactly_a_peer_role(existing, removing => true) THEN
        RAISE EXCEPTION 'role % is not only a pgvpn peer''s role', role_name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a superuser must change or remove that role';
    END IF;
    sessions_ended := 0;
    EXECUTE pg_catalog.format('GRANT %I TO CURRENT_USER', role_name);
    PERFORM pg_catalog.pg_stat_clear_snapshot();  -- the sessions of now, not of the
                                                  -- transaction's first look
    FOR backend IN SELECT a.pid FROM pg_catalog.pg_stat_activity a
                   WHERE a.usesysid = existing AND a.pid <> pg_catalog.pg_backend_pid()
    LOOP
        IF pg_catalog.pg_terminate_backend(backend, 5000) THEN
            sessions_ended := sessions_ended + 1;
        END IF;
    END LOOP;
    EXECUTE pg_catalog.format('REVOKE %I FROM CURRENT_USER', role_name);
    EXECUTE pg_catalog.format('ALTER ROLE %I WITH NOLOGIN PASSWORD NULL', role_name);
END
$$;

ALTER FUNCTION pgvpn_admin.disable_peer_role(text) OWNER TO pgvpn_peermaker;
REVOKE ALL ON FUNCTION pgvpn_admin.disable_peer_role(text) FROM PUBLIC;
