-- plpgsql_check over every PL/pgSQL function of schemas pgvpn and pgvpn_admin:
-- errors, and warnings of every class (other, extra, performance, security,
-- compatibility).  A function fails on any issue that is not in `accepted` below;
-- each accepted one says why it is harmless, and must still occur (so the list
-- never outlives what it excuses).  SQL-language functions are not PL/pgSQL and
-- are not checked here (their bodies are parsed at CREATE).
\ir begin.inc
CREATE SCHEMA plpgsql_check_ext;
CREATE EXTENSION plpgsql_check SCHEMA plpgsql_check_ext;
SELECT plan(12);

CREATE TEMPORARY TABLE checked ON COMMIT DROP AS
SELECT p.oid::regprocedure::text AS fn, t.tgrelid::regclass::text AS trigger_relation
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_language l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
LEFT JOIN pg_catalog.pg_trigger t ON t.tgfoid = p.oid
WHERE p.pronamespace IN ('pgvpn'::regnamespace, 'pgvpn_admin'::regnamespace)
  AND (p.prorettype <> 'trigger'::regtype OR t.tgrelid IS NOT NULL);

CREATE TEMPORARY TABLE issues ON COMMIT DROP AS
SELECT c.fn, r.lineno, r.statement, r.sqlstate, r.message, r.detail, r.hint, r.level, r.query
FROM checked c
CROSS JOIN LATERAL plpgsql_check_ext.plpgsql_check_function_tb(
    c.fn::regprocedure, coalesce(c.trigger_relation::regclass, 0),
    fatal_errors => false, other_warnings => true, extra_warnings => true,
    performance_warnings => true, security_warnings => true,
    compatibility_warnings => true) r;

CREATE TEMPORARY TABLE accepted (fn text, level text, message text, detail text, why text)
ON COMMIT DROP;
INSERT INTO accepted VALUES
    ('pgvpn.ensure_partitions(integer)', 'warning',
     'target type is different type than source type',
     'cast "text" value to "timestamp with time zone" type',
     'origin constant timestamptz := ''2000-01-01 00:00:00+00'': a literal with its own UTC '
     'offset, in ISO form, so its value depends on neither TimeZone nor DateStyle'),
    ('pgvpn.decode_headers(bytea)', 'performance',
     'target type is different type than source type',
     'cast "integer" value to "smallint" type',
     'get_byte() (0-255) and shifts of it into smallint OUT columns: always in range, and '
     'a per-row cast of an int is no cost worth a different signature'),
    ('pgvpn_admin.ensure_peer_role(text,text)', 'performance',
     'routine is marked as VOLATILE, should be STABLE',
     'attention: cannot to determine volatility of used dynamic SQL',
     'wrong advice: its dynamic SQL is CREATE ROLE / GRANT / ALTER ROLE, so VOLATILE it is');

SELECT set_eq(
    $$SELECT fn FROM checked$$,
    ARRAY['pgvpn.blog_v1_notify()', 'pgvpn.decode_headers(bytea)',
          'pgvpn.ensure_partitions(integer)', 'pgvpn.lock_own(text)',
          'pgvpn.routes_changed()', 'pgvpn_admin.disable_peer_role(text)',
          'pgvpn_admin.ensure_peer_role(text,text)'],
    'plpgsql_check checks all seven PL/pgSQL functions of pgvpn and pgvpn_admin');
SELECT is_empty(
    $$SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
      WHERE p.pronamespace IN ('pgvpn'::regnamespace, 'pgvpn_admin'::regnamespace)
        AND p.prorettype = 'trigger'::regtype
        AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid)$$,
    'every trigger function has a trigger, so it was checked against its relation');
SELECT is((SELECT trigger_relation FROM checked WHERE fn = 'pgvpn.blog_v1_notify()'),
          'pgvpn.blog_v1_packets', 'blog_v1_notify() is checked on pgvpn.blog_v1_packets');
SELECT is((SELECT trigger_relation FROM checked WHERE fn = 'pgvpn.routes_changed()'),
          'pgvpn.routes', 'routes_changed() is checked on pgvpn.routes');

SELECT is_empty(
    format($$SELECT i.level || ' ' || i.sqlstate || ' line ' || coalesce(i.lineno::text, '-')
                    || ' (' || coalesce(i.statement, '-') || '): ' || i.message
                    || coalesce(' / ' || i.detail, '') || coalesce(' / ' || i.hint, '')
                    || coalesce(' / query: ' || i.query, '')
             FROM issues i
             WHERE i.fn = %L
               AND NOT EXISTS (SELECT FROM accepted a
                               WHERE a.fn = i.fn AND a.level = i.level
                                 AND a.message = i.message
                                 AND a.detail IS NOT DISTINCT FROM i.detail)
             ORDER BY i.lineno$$, f),
    format('plpgsql_check: %s has no error and no warning but the accepted ones', f))
FROM unnest(ARRAY['pgvpn.blog_v1_notify()',
                  'pgvpn.decode_headers(bytea)', 'pgvpn.ensure_partitions(integer)',
                  'pgvpn.lock_own(text)', 'pgvpn.routes_changed()',
                  'pgvpn_admin.disable_peer_role(text)',
                  'pgvpn_admin.ensure_peer_role(text,text)']) AS f;

SELECT is_empty(
    $$SELECT a.fn || ': ' || a.message FROM accepted a
      WHERE NOT EXISTS (SELECT FROM issues i
                        WHERE i.fn = a.fn AND i.level = a.level AND i.message = a.message
                          AND i.detail IS NOT DISTINCT FROM a.detail)$$,
    'every accepted plpgsql_check warning still occurs (else drop it from the list)');

SELECT * FROM finish();
ROLLBACK;
