-- `pgvpn db init` (as a superuser, once): the only way the owner makes peer roles.
--
-- Not a migration: migrations run as the owner, who is no superuser and has no
-- CREATEROLE (in PostgreSQL 15 CREATEROLE may grant itself nearly anything, e.g.
-- pg_execute_server_program).  Instead one NOLOGIN role, pgvpn_peermaker, has
-- CREATEROLE and owns this one function; nobody is a member of it, and the owner
-- may only call the function.  So the most a compromised owner can do with roles
-- is what `pgvpn db add-peer` does: make or re-password a peer role that has no
-- attribute and no membership but pgvpn_agent.
--
-- The function touches only the catalog (never a pgvpn table, which the owner
-- could replace with something that runs code as the caller), names everything
-- qualified under a search_path with pg_temp last, and takes a password only as
-- a SCRAM verifier, so no password ever reaches the server or its log.

CREATE SCHEMA IF NOT EXISTS pgvpn_admin AUTHORIZATION pgvpn_peermaker;
REVOKE ALL ON SCHEMA pgvpn_admin FROM PUBLIC;

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
    -- An existing role is re-passworded only if it is exactly a peer's role: no
    -- attribute, member of pgvpn_agent (without ADMIN OPTION, which would let it
    -- hand the group to anyone) and of nothing else, no member of its own, no
    -- object, privilege or setting of its own.
    -- Anything else (the owner, a superuser, a role someone granted more to) would
    -- hand the caller a login with rights beyond a peer's.
    IF EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = existing
               AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
                    OR r.rolbypassrls))
       OR NOT EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                      WHERE m.member = existing AND NOT m.admin_option
                        AND m.roleid = 'pgvpn_agent'::pg_catalog.regrole)
       OR EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                  WHERE (m.member = existing
                         AND m.roleid <> 'pgvpn_agent'::pg_catalog.regrole)
                     OR m.roleid = existing)
       -- owns nothing, holds no privilege of its own, has no settings of its own
       OR EXISTS (SELECT FROM pg_catalog.pg_shdepend d
                  WHERE d.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
                    AND d.refobjid = existing)
       OR EXISTS (SELECT FROM pg_catalog.pg_db_role_setting s WHERE s.setrole = existing)
    THEN
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
