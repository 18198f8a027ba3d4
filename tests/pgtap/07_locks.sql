-- Advisory locks: a peer takes its own and no other (sql/007_own_locks.sql,
-- `pgvpn db init`).  In PostgreSQL any role may take any advisory lock; a peer
-- holding `pgvpn.sender.<other>` would keep that other peer's tunnel down.  In
-- this database only the owner may call the advisory lock functions, and a peer
-- locks through pgvpn.lock_own(), which names the lock after the session's peer.
--
-- The peer here is pgvpn_tap_lock, made in this transaction (rolled back), so
-- that no running agent already holds its locks.  Session locks outlive a
-- rollback: the file releases them itself before it ends.
\ir begin.inc
SELECT plan(12);

CREATE TEMPORARY TABLE advisory ON COMMIT DROP AS
SELECT p.oid AS fn, p.oid::regprocedure::text AS signature
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND p.proname ~ '^pg_(try_)?advisory_(xact_)?lock(_shared)?$';
GRANT SELECT ON pg_temp.advisory TO PUBLIC;

SELECT is((SELECT count(*)::integer FROM pg_temp.advisory), 16,
          'PostgreSQL 15 has 16 functions that take an advisory lock');
SELECT is_empty(
    $$SELECT a.signature FROM pg_temp.advisory a
      CROSS JOIN LATERAL pg_catalog.aclexplode(coalesce(
          (SELECT p.proacl FROM pg_catalog.pg_proc p WHERE p.oid = a.fn),
          pg_catalog.acldefault('f', 10))) x
      WHERE x.grantee = 0$$,
    'PUBLIC may call none of the advisory lock functions in this database');
SELECT is_empty(
    $$SELECT r.role || ': ' || a.signature
      FROM pg_temp.advisory a
      CROSS JOIN unnest('{pgvpn_agent,pgvpn_reader,pgvpn_peer_a,pgvpn_peer_b}'::text[]) r(role)
      WHERE pg_catalog.has_function_privilege(r.role, a.fn, 'EXECUTE')$$,
    'no peer, agent or reader role may call an advisory lock function');
SELECT is_empty(
    $$SELECT a.signature FROM pg_temp.advisory a
      WHERE NOT pg_catalog.has_function_privilege('pgvpn_owner', a.fn, 'EXECUTE')$$,
    'the owner may call every advisory lock function (migrate, prune, maintenance)');

CREATE ROLE pgvpn_tap_lock LOGIN IN ROLE pgvpn_agent;
CREATE ROLE tap_lock_reader LOGIN IN ROLE pgvpn_reader;

-- -------------------------------------------- as a peer, before anything else
SET SESSION AUTHORIZATION pgvpn_tap_lock;
-- every advisory lock function, on the sender key of another peer that has no agent
-- running (so that a weakened database lets the waiting ones return at once)
SELECT pg_temp.try_query('peer: ' || a.signature, pg_catalog.format(
    'SELECT pg_catalog.%s(%s)', (SELECT p.proname FROM pg_catalog.pg_proc p WHERE p.oid = a.fn),
    CASE WHEN a.signature LIKE '%(bigint)'
         THEN 'pg_catalog.hashtextextended(''pgvpn.sender.tap-other'', 0)'
         ELSE '1, 2' END))
FROM pg_temp.advisory a;
SELECT pg_temp.try_query('peer: lock_own(sender)', 'SELECT pgvpn.lock_own(''sender'')');
SELECT pg_temp.try_query('peer: lock_own(receiver)', 'SELECT pgvpn.lock_own(''receiver'')');
SELECT pg_temp.try_query('peer: lock_own(maintenance)', 'SELECT pgvpn.lock_own(''maintenance'')');
SELECT pg_temp.try_query('peer: lock_own(sender.peer-b)',
                         'SELECT pgvpn.lock_own(''sender.peer-b'')');
SELECT pg_temp.try_query('peer: lock_own(NULL)', 'SELECT pgvpn.lock_own(NULL)');
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION tap_lock_reader;
SELECT pg_temp.try_query('reader: lock_own(sender)', 'SELECT pgvpn.lock_own(''sender'')');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pgvpn_owner;
SELECT pg_temp.try_query('owner: lock_own(sender)', 'SELECT pgvpn.lock_own(''sender'')');
RESET SESSION AUTHORIZATION;
SET LOCAL search_path = pgtap, pg_catalog, pg_temp;

-- ---------------------------------------------------------------- verdicts
SELECT is_empty(
    $$SELECT o.label || ': ' || coalesce(o.sqlstate, 'succeeded')
      FROM pg_temp.outcomes o
      WHERE o.label LIKE 'peer: pg\_%' AND o.sqlstate IS DISTINCT FROM '42501'$$,
    'a peer is refused every advisory lock function, on any key');
SELECT is((SELECT pg_catalog.count(*)::integer FROM pg_temp.outcomes o
           WHERE o.label LIKE 'peer: pg\_%'), 16, 'all 16 were tried');
SELECT is(pg_temp.result('peer: lock_own(sender)') || ',' || pg_temp.result('peer: lock_own(receiver)'),
          'true,true', 'a peer takes its own sender and receiver locks through lock_own()');
SELECT set_eq(
    $$SELECT ((l.classid::bigint << 32) | l.objid::bigint) FROM pg_catalog.pg_locks l
      WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid() AND l.granted$$,
    $$VALUES (pg_catalog.hashtextextended('pgvpn.sender.tap-lock', 0)),
             (pg_catalog.hashtextextended('pgvpn.receiver.tap-lock', 0))$$,
    'the locks held are exactly pgvpn.sender.tap-lock and pgvpn.receiver.tap-lock');
SELECT is(pg_temp.outcome('peer: lock_own(maintenance)') || ','
          || pg_temp.outcome('peer: lock_own(sender.peer-b)') || ','
          || pg_temp.outcome('peer: lock_own(NULL)'),
          '22023,22023,22023', 'lock_own() takes no other purpose (and no name in one)');
SELECT is(pg_temp.outcome('reader: lock_own(sender)'), '42501',
          'a reader may not call lock_own()');
SELECT is(pg_temp.outcome('owner: lock_own(sender)'), '42501',
          'the owner, no peer, takes no peer''s lock through lock_own()');

SELECT pg_catalog.pg_advisory_unlock_all();
SELECT is_empty(
    $$SELECT 1 FROM pg_catalog.pg_locks l
      WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid()$$,
    'this file leaves no advisory lock behind');

SELECT * FROM finish();
ROLLBACK;
