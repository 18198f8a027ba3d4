-- A hostile peer against every function that runs with someone else's rights.
--
-- The peer is pgvpn_peer_a, for real: SET SESSION AUTHORIZATION changes
-- session_user, which pgvpn.current_peer() reads.  First the attack of the trust
-- review as reported, without TEMPORARY: refused at its first CREATE.  Then, with
-- TEMPORARY lent (so the search_path of the functions is the only defence left),
-- the peer shadows in pg_temp every relation, type, function and operator that
-- the SECURITY DEFINER functions, the policies, the sender default and the views
-- use; each shadow calls pg_temp.escalate(), which, whenever it runs as anyone but
-- the peer, tries to give the peer more: SELECT on the log, SUPERUSER, pgvpn_reader,
-- RLS off on the cursors, and peer-b's login (a password of its choice, through
-- the owner's pgvpn_admin.ensure_peer_role).  Then it calls everything a peer
-- can call, with pg_temp first in its own search_path.  Nothing may have run as
-- the owner, and the peer must have gained nothing.
\ir begin.inc
SELECT plan(29);

-- ------------------------------------------------------------- the scene
-- A packet each way between the lab's peers, a cursor of each for a sender no
-- agent uses.
INSERT INTO pgvpn.peers (name) VALUES ('tap-x') ON CONFLICT DO NOTHING;
INSERT INTO pgvpn.cursors (receiver, sender, last_seq)
VALUES ('peer-a', 'tap-x', 0), ('peer-b', 'tap-x', 0)
ON CONFLICT (receiver, sender) DO UPDATE SET last_seq = 0;
INSERT INTO pgvpn.packets (sender, seq, receiver, length, data)
VALUES ('peer-b', 900000001, 'peer-a', 1, '\x01'), ('peer-a', 900000001, 'peer-b', 1, '\x02');
CREATE TABLE pg_temp.before AS
SELECT r.rolname, a.rolpassword
FROM pg_catalog.pg_roles r JOIN pg_catalog.pg_authid a ON a.oid = r.oid;

-- What the attacker's code reports: every call (as whom), and a counter of calls
-- under another role that survives any rollback (a sequence is not transactional).
CREATE TABLE pg_temp.ran (vector pg_catalog.text, as_user pg_catalog.text,
                          session pg_catalog.text);
CREATE SEQUENCE pg_temp.ran_as_other;
GRANT ALL ON pg_temp.ran, pg_temp.ran_as_other TO PUBLIC;

-- ---------------------------------------- 1. the reported attack, no TEMPORARY
SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_command('issue: CREATE FUNCTION pg_temp.f', $q$
    CREATE FUNCTION pg_temp.f() RETURNS boolean LANGUAGE plpgsql AS $f$
    BEGIN
        IF current_user <> session_user THEN
            EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
        END IF;
        RETURN true;
    END $f$ $q$);
SELECT pg_temp.try_command('issue: CREATE VIEW pg_temp.pg_inherits',
    'CREATE VIEW pg_temp.pg_inherits AS SELECT * FROM pg_catalog.pg_inherits');
SELECT pg_temp.try_command('issue: CREATE TEMPORARY TABLE',
    'CREATE TEMPORARY TABLE scratch (x integer)');
RESET SESSION AUTHORIZATION;

-- ------------------------------ 2. TEMPORARY lent: the search_path on its own
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO pgvpn_peer_a', current_database());
END
$$;
SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_query('peer may create temporary objects now',
    $$SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY')$$);

-- The payload.  Every name qualified: the shadows below are in its way too.
SELECT pg_temp.try_command('shadow: escalate()', $q$
CREATE FUNCTION pg_temp.escalate(vector pg_catalog.text) RETURNS pg_catalog.bool
LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO pg_temp.ran VALUES (vector, current_user, session_user);
    IF current_user OPERATOR(pg_catalog.<>) session_user THEN
        PERFORM pg_catalog.nextval('pg_temp.ran_as_other');
        BEGIN
            EXECUTE pg_catalog.format('GRANT SELECT ON pgvpn.packets TO %I', session_user);
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
        BEGIN
            EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
        BEGIN
            EXECUTE pg_catalog.format('GRANT pgvpn_reader TO %I', session_user);
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
        BEGIN
            EXECUTE 'ALTER TABLE pgvpn.cursors DISABLE ROW LEVEL SECURITY';
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
        BEGIN
            PERFORM pgvpn_admin.ensure_peer_role('peer-b',
                'SCRAM-SHA-256$4096:V/X4+RHeU4u1ZNajr/6RYQ==$eCRdtG9M0kcXmCLr4THp5z2UIMllm6M/'
                'qrUAhTJ/J4g=:qD1a+iAB7pUZgoDwJ+JjpFOYnRlTmLDfRoxUVV4ukOk=');
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END IF;
    RETURN true;
END $f$ $q$);
-- The reported attack itself, now that it can be created.
SELECT pg_temp.try_command('shadow: issue f()', $q$
CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS pg_catalog.bool LANGUAGE sql
AS $f$ SELECT pg_temp.escalate('issue f()') $f$ $q$);

-- Catalog relations the functions read, and pgvpn's own relations by bare name;
-- readable by anyone, as a real attacker would make them (the owner is no
-- superuser: without the GRANT its SELECT would fail before the payload ran).
SELECT pg_temp.try_command('shadow: view ' || v,
    pg_catalog.format('CREATE OR REPLACE VIEW pg_temp.%I AS SELECT * FROM pg_catalog.%I '
                      'WHERE pg_temp.escalate(%L); GRANT SELECT ON pg_temp.%I TO PUBLIC',
                      v, v, 'view ' || v, v))
FROM pg_catalog.unnest('{pg_inherits,pg_class,pg_namespace,pg_roles,pg_auth_members,'
                       'pg_proc,pg_type,pg_database,pg_policy}'::pg_catalog.text[]) v;
SELECT pg_temp.try_command('shadow: view ' || v.name,
    pg_catalog.format('CREATE VIEW pg_temp.%I AS SELECT * FROM pgvpn.%I '
                      'WHERE pg_temp.escalate(%L); GRANT SELECT ON pg_temp.%I TO PUBLIC',
                      v.name, v.source, 'view ' || v.name, v.name))
FROM (VALUES ('packets', 'inbox'), ('inbox', 'inbox'), ('peers', 'peers'),
             ('cursors', 'cursors'), ('log_settings', 'log_settings'),
             ('schema_migrations', 'schema_migrations')) AS v(name, source);

-- Types, under their catalog names and the SQL spellings (integer, bigint, boolean
-- are grammar for pg_catalog's types, but a domain of that name may exist).
SELECT pg_temp.try_command('shadow: domain ' || d.name,
    pg_catalog.format('CREATE DOMAIN pg_temp.%I AS pg_catalog.%I CHECK (pg_temp.escalate(%L))',
                      d.name, d.base, 'domain ' || d.name))
FROM (VALUES ('text', 'text'), ('regclass', 'regclass'), ('regrole', 'regrole'),
             ('timestamptz', 'timestamptz'), ('interval', 'interval'), ('int4', 'int4'),
             ('integer', 'int4'), ('int8', 'int8'), ('bigint', 'int8'), ('name', 'name'),
             ('oid', 'oid'), ('bool', 'bool'), ('boolean', 'bool'), ('bytea', 'bytea'),
             ('inet', 'inet'), ('time', 'time'), ('record', 'text')) AS d(name, base);

-- Functions and operators.  PostgreSQL never looks for these in pg_temp, but an
-- unqualified call in a body bound at call time would at least be worth knowing
-- about: each answers what would hijack its caller (replace() and current_peer()
-- say 'peer-b', = says true).
SELECT pg_temp.try_command('shadow: function ' || f.name, pg_catalog.format(
    'CREATE FUNCTION pg_temp.%s RETURNS %s LANGUAGE sql AS %L',
    f.signature, f.returns,
    pg_catalog.format('SELECT %s WHERE pg_temp.escalate(%L)', f.answer, 'function ' || f.name)))
FROM (VALUES
    ('now', 'now()', 'pg_catalog.timestamptz', 'pg_catalog.now()'),
    ('format', 'format(pg_catalog.text, VARIADIC pg_catalog.text[])', 'pg_catalog.text', '''x'''),
    ('format1', 'format(pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('hashtextextended', 'hashtextextended(pg_catalog.text, pg_catalog.int8)',
     'pg_catalog.int8', '0'),
    ('pg_has_role', 'pg_has_role(pg_catalog.name, pg_catalog.oid, pg_catalog.text)',
     'pg_catalog.bool', 'true'),
    ('date_bin', 'date_bin(pg_catalog.interval, pg_catalog.timestamptz, pg_catalog.timestamptz)',
     'pg_catalog.timestamptz', 'pg_catalog.now()'),
    ('make_interval', 'make_interval(days pg_catalog.int4)', 'pg_catalog.interval',
     '''1000 days''::pg_catalog.interval'),
    ('pg_advisory_xact_lock', 'pg_advisory_xact_lock(pg_catalog.int8)', 'void', 'NULL'),
    ('pg_try_advisory_xact_lock', 'pg_try_advisory_xact_lock(pg_catalog.int8)',
     'pg_catalog.bool', 'true'),
    ('current_peer', 'current_peer()', 'pg_catalog.text', '''peer-b'''),
    ('left', '"left"(pg_catalog.text, pg_catalog.int4)', 'pg_catalog.text', '''pgvpn_'''),
    ('replace', '"replace"(pg_catalog.text, pg_catalog.text, pg_catalog.text)',
     'pg_catalog.text', '''peer-b'''),
    ('substr', 'substr(pg_catalog.text, pg_catalog.int4)', 'pg_catalog.text', '''peer_b'''),
    ('quote_nullable', 'quote_nullable(pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('pg_notify', 'pg_notify(pg_catalog.text, pg_catalog.text)', 'void', 'NULL'),
    ('to_char', 'to_char(pg_catalog.timestamp, pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('btrim', 'btrim(pg_catalog.text, pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('regexp_match', 'regexp_match(pg_catalog.text, pg_catalog.text)', 'pg_catalog.text[]',
     'NULL::pg_catalog.text[]'),
    ('pg_get_expr', 'pg_get_expr(pg_catalog.pg_node_tree, pg_catalog.oid)', 'pg_catalog.text',
     'NULL'),
    ('partition_ranges', 'partition_ranges()', 'pg_catalog.text', 'NULL'),
    ('expired_partitions', 'expired_partitions(pg_catalog.timestamptz)', 'pg_catalog.text',
     'NULL'),
    ('partition_name', 'partition_name(pg_catalog.timestamptz, pg_catalog.timestamptz)',
     'pg_catalog.text', '''packets_evil'''),
    ('nextval', 'nextval(pg_catalog.regclass)', 'pg_catalog.int8', '0'),
    ('clock_timestamp', 'clock_timestamp()', 'pg_catalog.timestamptz', 'pg_catalog.now()'),
    ('pg_sleep', 'pg_sleep(pg_catalog.float8)', 'void', 'NULL'),
    ('texteq', 'texteq(pg_catalog.text, pg_catalog.text)', 'pg_catalog.bool', 'true'),
    ('textcat', 'textcat(pg_catalog.text, pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('timestamptz_lt', 'timestamptz_lt(pg_catalog.timestamptz, pg_catalog.timestamptz)',
     'pg_catalog.bool', 'true'),
    ('int8larger', 'int8larger(pg_catalog.int8, pg_catalog.int8)', 'pg_catalog.int8',
     '900000099')
) AS f(name, signature, returns, answer);
SELECT pg_temp.try_command('shadow: aggregate max', 'CREATE AGGREGATE pg_temp.max(pg_catalog.int8) '
                           '(SFUNC = pg_temp.int8larger, STYPE = pg_catalog.int8)');
SELECT pg_temp.try_command('shadow: operator ' || o.op || ' ' || o.arg, pg_catalog.format(
    'CREATE OPERATOR pg_temp.%s (LEFTARG = pg_catalog.%s, RIGHTARG = pg_catalog.%s, '
    'FUNCTION = pg_temp.%s)', o.op, o.arg, o.arg, o.func))
FROM (VALUES ('=', 'text', 'texteq'), ('||', 'text', 'textcat'),
             ('<', 'timestamptz', 'timestamptz_lt')) AS o(op, arg, func);

-- Hostile: the peer's own search_path puts pg_temp first (relations and types;
-- PostgreSQL never takes functions or operators from there).
SET LOCAL search_path = pg_temp, pgvpn, pg_catalog;
-- Sanity: the peer's own query does reach its shadows (as itself, harmlessly).
SELECT pg_temp.try_query('peer reads its shadow pg_class',
                         'SELECT pg_catalog.count(*) FROM pg_class');

-- Everything a peer can call.
SELECT pg_temp.try_query('ensure_partitions()', 'SELECT pgvpn.ensure_partitions()');
SELECT pg_temp.try_query('ensure_partitions(30) as a peer', 'SELECT pgvpn.ensure_partitions(30)');
SELECT pg_temp.try_query('lock_own(receiver)', 'SELECT pgvpn.lock_own(''receiver'')');
SELECT pg_temp.try_query('last_sent_seq()', 'SELECT pgvpn.last_sent_seq()');
SELECT pg_temp.try_query('current_peer()', 'SELECT pgvpn.current_peer()');
SELECT pg_temp.try_query('inbox: receivers',
    'SELECT pg_catalog.string_agg(DISTINCT i.receiver, '','') FROM pgvpn.inbox i');
SELECT pg_temp.try_query('inbox: the packet from peer-b',
    'SELECT pg_catalog.count(*) FROM pgvpn.inbox i '
    'WHERE i.seq = 900000001 AND i.sender = ''peer-b''');
SELECT pg_temp.try_command('insert a packet',
    'INSERT INTO pgvpn.packets (seq, receiver, length, data) '
    'VALUES (900000002, ''peer-b'', 1, ''\x03'')');
SELECT pg_temp.try_command('insert a packet as peer-b',
    'INSERT INTO pgvpn.packets (sender, seq, receiver, length, data) '
    'VALUES (''peer-b'', 900000003, ''peer-a'', 1, ''\x04'')');
SELECT pg_temp.try_query('update cursors for sender tap-x',
    'WITH u AS (UPDATE pgvpn.cursors c SET last_seq = 7 WHERE c.sender = ''tap-x'' '
    'RETURNING c.receiver) SELECT pg_catalog.string_agg(u.receiver, '','') FROM u');
SELECT pg_temp.try_query('peers visible',
    'SELECT pg_catalog.string_agg(p.name, '','') FROM pgvpn.peers p');
SELECT pg_temp.try_query('read pgvpn.packets', 'SELECT pg_catalog.count(*) FROM pgvpn.packets');
RESET SESSION AUTHORIZATION;
SET LOCAL search_path = pgtap, pg_catalog, pg_temp;

-- --------------------------------------------------------------- verdicts
SELECT is(pg_temp.outcome('issue: CREATE FUNCTION pg_temp.f'), '42501',
          'without TEMPORARY the reported attack is refused at CREATE FUNCTION pg_temp.f');
SELECT is(pg_temp.outcome('issue: CREATE VIEW pg_temp.pg_inherits'), '42501',
          'without TEMPORARY the peer cannot create the view pg_temp.pg_inherits');
SELECT is(pg_temp.outcome('issue: CREATE TEMPORARY TABLE'), '42501',
          'without TEMPORARY the peer cannot create a temporary table');

SELECT is(pg_temp.result('peer may create temporary objects now'), 'true',
          'TEMPORARY lent: the peer may create temporary objects for the rest of the attack');
SELECT is_empty(
    $$SELECT o.label || ': ' || o.sqlstate || ' ' || o.message FROM pg_temp.outcomes o
      WHERE o.label LIKE 'shadow: %' AND o.sqlstate IS NOT NULL$$,
    'the peer created every shadow (views, domains, functions, operators) and its payload');
SELECT cmp_ok((SELECT pg_catalog.count(*)::integer FROM pg_temp.outcomes o
               WHERE o.label LIKE 'shadow: %'), '=', 67,
              'all 67 shadows were attempted');
SELECT ok(EXISTS (SELECT FROM pg_temp.ran r WHERE r.vector = 'view pg_class'
                  AND r.as_user = 'pgvpn_peer_a'),
          'the shadows are live: the peer''s own query reached pg_temp.pg_class');

SELECT is_empty(
    $$SELECT DISTINCT r.vector || ' ran as ' || r.as_user FROM pg_temp.ran r
      WHERE r.as_user <> r.session$$,
    'no shadow ran as anyone but the peer');
SELECT is((SELECT s.is_called FROM pg_temp.ran_as_other s), false,
          'no shadow ran as another role even in a call that failed (counter untouched)');

SELECT is(pg_temp.outcome('ensure_partitions()'), '00000',
          'pgvpn.ensure_partitions() works for the peer under attack');
SELECT is(pg_temp.outcome('ensure_partitions(30) as a peer'), '42501',
          'pgvpn.ensure_partitions(days_ahead) is refused to a peer');
SELECT is(pg_temp.outcome('lock_own(receiver)'), '00000',
          'pgvpn.lock_own() works for the peer under attack');
SELECT is(pg_temp.result('last_sent_seq()'), '900000001',
          'pgvpn.last_sent_seq() under attack is the peer''s own last seq');
SELECT is(pg_temp.result('current_peer()'), 'peer-a',
          'pgvpn.current_peer() under attack still says peer-a');
SELECT is(pg_temp.result('inbox: receivers'), 'peer-a',
          'pgvpn.inbox under attack shows only packets for peer-a');
SELECT is(pg_temp.result('inbox: the packet from peer-b'), '1',
          'pgvpn.inbox under attack shows the packet peer-b sent to peer-a');
SELECT is(pg_temp.outcome('insert a packet'), '00000', 'the peer logs a packet under attack');
SELECT results_eq(
    $$SELECT p.sender FROM pgvpn.packets p WHERE p.seq = 900000002 AND p.data = '\x03'$$,
    $$VALUES ('peer-a'::text)$$,
    'the sender default recorded it as peer-a');
SELECT is(pg_temp.outcome('insert a packet as peer-b'), '42501',
          'a packet with sender peer-b is refused');
SELECT is(pg_temp.result('update cursors for sender tap-x'), 'peer-a',
          'the peer updates only its own cursor under attack');
SELECT results_eq(
    $$SELECT c.receiver, c.last_seq FROM pgvpn.cursors c WHERE c.sender = 'tap-x'
      ORDER BY c.receiver$$,
    $$VALUES ('peer-a'::text, 7::bigint), ('peer-b', 0)$$,
    'peer-b''s cursor is untouched');
SELECT is(pg_temp.result('peers visible'), 'peer-a', 'the peer sees only its own peers row');
SELECT is(pg_temp.outcome('read pgvpn.packets'), '42501', 'the peer still cannot read pgvpn.packets');

-- What the peer gained: nothing.
SELECT table_privs_are('pgvpn', 'packets', 'pgvpn_peer_a', '{}',
                       'after the attack the peer has no privilege on pgvpn.packets');
SELECT isnt_superuser('pgvpn_peer_a', 'after the attack the peer is no superuser');
SELECT results_eq(
    $$SELECT m.roleid::regrole::text FROM pg_catalog.pg_auth_members m
      WHERE m.member = 'pgvpn_peer_a'::regrole$$,
    $$VALUES ('pgvpn_agent')$$,
    'after the attack the peer is a member of pgvpn_agent only');
SELECT ok((SELECT c.relrowsecurity FROM pg_catalog.pg_class c
           WHERE c.oid = 'pgvpn.cursors'::regclass),
          'after the attack row-level security is still on for pgvpn.cursors');
SELECT is_empty(
    $$SELECT a.rolname::text FROM pg_catalog.pg_authid a
      LEFT JOIN pg_temp.before b ON b.rolname = a.rolname
      WHERE b.rolname IS NULL OR a.rolpassword IS DISTINCT FROM b.rolpassword$$,
    'after the attack no role was made and no password changed (peer-b''s login is safe)');
SELECT is_empty(
    $$SELECT 'TEMPORARY for ' || r.rolname FROM pg_catalog.pg_roles r
      WHERE r.rolname = 'pgvpn_peer_b'
        AND pg_catalog.has_database_privilege(r.oid, pg_catalog.current_database(), 'TEMPORARY')$$,
    'the lent TEMPORARY went to peer-a only');

SELECT * FROM finish();
ROLLBACK;
