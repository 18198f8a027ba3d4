-- 007: a peer takes only its own locks.
--
-- An agent's uplink and downlink each hold a session advisory lock,
-- `pgvpn.sender.<name>` and `pgvpn.receiver.<name>`, so that one process alone
-- numbers or reads that peer's stream (pgvpn.locks).  PostgreSQL's advisory lock
-- functions need no privilege: any peer could take another peer's lock by its
-- name and keep that peer's tunnel down for as long as it liked.
--
-- `pgvpn db init` (a superuser, once) takes EXECUTE on the advisory lock
-- functions away from PUBLIC in this database and gives it to the owner only
-- (whose functions and tools lock: migrate, prune, partition maintenance).  A
-- peer now locks through pgvpn.lock_own(), which takes a lock named after the
-- session's own peer and nothing else.  The migration fails, naming who must
-- act, while peers can still take advisory locks themselves.

-- Take the session lock that makes this session `purpose` ('sender' or
-- 'receiver') for the session's own peer; true if taken, false if another
-- session holds it.  The lock is the session's, as pg_try_advisory_lock's is:
-- it ends with the session, whoever's rights took it.
CREATE FUNCTION pgvpn.lock_own(purpose text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    peer pg_catalog.text := pgvpn.current_peer();
BEGIN
    IF purpose IS NULL OR purpose NOT IN ('sender', 'receiver') THEN
        RAISE EXCEPTION 'no such lock: %', pg_catalog.quote_nullable(purpose)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a peer locks itself as ''sender'' or ''receiver''';
    END IF;
    IF peer IS NULL THEN
        RAISE EXCEPTION 'only a peer''s role takes a peer''s lock (not %)', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN pg_catalog.pg_try_advisory_lock(
        pg_catalog.hashtextextended('pgvpn.' || purpose || '.' || peer, 0));
END
$$;

REVOKE ALL ON FUNCTION pgvpn.lock_own(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.lock_own(text) TO pgvpn_agent;

DO $$
BEGIN
    IF pg_catalog.has_function_privilege('pgvpn_agent', 'pg_catalog.pg_advisory_lock(bigint)',
                                         'EXECUTE') THEN
        RAISE EXCEPTION 'peers may still take any advisory lock in database %',
                        pg_catalog.current_database()
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a superuser runs ''pgvpn db init'' first: it leaves advisory locks '
                         'to the owner, who migrates';
    END IF;
END
$$;
