-- Who owns what, and what the roles are (SECURITY.md, "The roles"; `pgvpn db init`).
\ir begin.inc
SELECT plan(53);

-- ------------------------------------------------------------------ owners
SELECT db_owner_is(current_database(), 'pgvpn_owner', 'the database is owned by pgvpn_owner');
SELECT schema_owner_is('pgvpn', 'pgvpn_owner', 'schema pgvpn is owned by pgvpn_owner');
SELECT schema_owner_is('pgvpn_admin', 'pgvpn_peermaker',
                       'schema pgvpn_admin is owned by pgvpn_peermaker');

-- The inventory: a new relation or function must be added here, and so to the
-- privilege tests (02, 03), before this suite passes again.
SELECT set_eq(
    $$SELECT c.relname::text, c.relkind::text FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        AND NOT c.relispartition$$,
    $$VALUES ('schema_migrations', 'r'), ('peers', 'r'), ('packets', 'p'), ('cursors', 'r'),
             ('log_settings', 'r'), ('blog_v1_packets', 'r'), ('blog_v2_packets', 'r'),
             ('inbox', 'v'), ('log_partitions', 'v'), ('packet_headers', 'v'), ('routes', 'r'),
             ('packets_id_seq', 'S'), ('blog_v1_packets_id_seq', 'S'),
             ('blog_v2_packets_id_seq', 'S')$$,
    'schema pgvpn holds exactly the known tables, views and sequences (besides partitions)');
SELECT set_eq(
    $$SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
      WHERE p.pronamespace IN ('pgvpn'::regnamespace, 'pgvpn_admin'::regnamespace)$$,
    ARRAY['pgvpn.blog_v1_notify()', 'pgvpn.current_peer()',
          'pgvpn.decode_headers(bytea)', 'pgvpn.ensure_partitions(integer)',
          'pgvpn.expired_partitions(timestamp with time zone)', 'pgvpn.last_sent_seq()',
          'pgvpn.lock_own(text)', 'pgvpn.partition_name(timestamp with time zone,timestamp with time zone)',
          'pgvpn.partition_ranges()', 'pgvpn.routes_changed()',
          'pgvpn.wire_packets(integer,bytea,bytea)',
          'pgvpn_admin.disable_peer_role(text)', 'pgvpn_admin.ensure_peer_role(text,text)',
          'pgvpn_admin.exactly_a_peer_role(oid,boolean)'],
    'schemas pgvpn and pgvpn_admin hold exactly the known functions');

SELECT table_owner_is('pgvpn', t, 'pgvpn_owner', format('table pgvpn.%s is owned by pgvpn_owner', t))
FROM unnest(ARRAY['schema_migrations', 'peers', 'packets', 'cursors', 'log_settings',
                  'blog_v1_packets', 'blog_v2_packets', 'routes']) AS t;
SELECT view_owner_is('pgvpn', v, 'pgvpn_owner', format('view pgvpn.%s is owned by pgvpn_owner', v))
FROM unnest(ARRAY['inbox', 'log_partitions', 'packet_headers']) AS v;
SELECT sequence_owner_is('pgvpn', s, 'pgvpn_owner',
                         format('sequence pgvpn.%s is owned by pgvpn_owner', s))
FROM unnest(ARRAY['packets_id_seq', 'blog_v1_packets_id_seq', 'blog_v2_packets_id_seq']) AS s;

SELECT function_owner_is(f.schema, f.name, f.args, f.owner,
                         format('function %s.%s(%s) is owned by %s', f.schema, f.name,
                                array_to_string(f.args, ', '), f.owner))
FROM (VALUES
    ('pgvpn', 'blog_v1_notify', '{}'::name[], 'pgvpn_owner'),
    ('pgvpn', 'current_peer', '{}', 'pgvpn_owner'),
    ('pgvpn', 'decode_headers', '{bytea}', 'pgvpn_owner'),
    ('pgvpn', 'ensure_partitions', '{integer}', 'pgvpn_owner'),
    ('pgvpn', 'expired_partitions', '{timestamp with time zone}', 'pgvpn_owner'),
    ('pgvpn', 'last_sent_seq', '{}', 'pgvpn_owner'),
    ('pgvpn', 'lock_own', '{text}', 'pgvpn_owner'),
    ('pgvpn', 'partition_name', '{timestamp with time zone,timestamp with time zone}',
     'pgvpn_owner'),
    ('pgvpn', 'partition_ranges', '{}', 'pgvpn_owner'),
    ('pgvpn', 'routes_changed', '{}', 'pgvpn_owner'),
    ('pgvpn_admin', 'disable_peer_role', '{text}', 'pgvpn_peermaker'),
    ('pgvpn_admin', 'ensure_peer_role', '{text,text}', 'pgvpn_peermaker'),
    ('pgvpn_admin', 'exactly_a_peer_role', '{oid,boolean}', 'pgvpn_peermaker')
) AS f(schema, name, args, owner);

-- Whatever else lives in the schemas: partitions, indexes, row types.
SELECT is_empty(
    $$SELECT c.oid::regclass::text || ' owned by ' || pg_catalog.pg_get_userbyid(c.relowner)
      FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relowner <> 'pgvpn_owner'::regrole$$,
    'every relation in pgvpn (partitions and indexes too) is owned by pgvpn_owner');
SELECT is_empty(
    $$SELECT t.oid::regtype::text || ' owned by ' || pg_catalog.pg_get_userbyid(t.typowner)
      FROM pg_catalog.pg_type t
      WHERE t.typnamespace = 'pgvpn'::regnamespace AND t.typowner <> 'pgvpn_owner'::regrole$$,
    'every type in pgvpn is owned by pgvpn_owner');
SELECT is_empty(
    $$SELECT c.oid::regclass::text FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'pgvpn_admin'::regnamespace
      UNION ALL
      SELECT t.oid::regtype::text FROM pg_catalog.pg_type t
      WHERE t.typnamespace = 'pgvpn_admin'::regnamespace$$,
    'schema pgvpn_admin holds no relation and no type');
SELECT is_empty(
    $$SELECT c.oid::regclass::text FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relispartition
        AND (c.relacl IS NOT NULL OR c.relrowsecurity
             OR NOT EXISTS (SELECT FROM pg_catalog.pg_inherits i
                            WHERE i.inhrelid = c.oid
                              AND i.inhparent IN ('pgvpn.packets'::regclass)))
        AND c.relkind = 'r'$$,
    'partitions: all of pgvpn.packets, with no grants of their own and no RLS');

-- ------------------------------------------------------------------- roles
SELECT results_eq(
    format($$SELECT r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
                    r.rolreplication, r.rolbypassrls
             FROM pg_catalog.pg_roles r WHERE r.rolname = %L$$, x.role),
    format('VALUES (false, %s, %s, false, %s, false, false)', x.inherit::text,
           x.createrole::text, x.login::text),
    format('role %s: %s', x.role, x.says))
FROM (VALUES
    ('pgvpn_owner', true, false, true, 'LOGIN, no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS'),
    -- INHERIT: a member of nothing (below), so it matters only inside
    -- disable_peer_role, whose one-call membership of a peer role must confer the
    -- right to end that role's sessions (sql/init_peer_roles.sql)
    ('pgvpn_peermaker', true, true, false, 'NOLOGIN INHERIT CREATEROLE and nothing else'),
    ('pgvpn_agent', true, false, false, 'a NOLOGIN group with no attribute'),
    ('pgvpn_reader', true, false, false, 'a NOLOGIN group with no attribute')
) AS x(role, inherit, createrole, login, says);

SELECT isnt_superuser(r, format('%s is no superuser', r))
FROM unnest(ARRAY['pgvpn_owner', 'pgvpn_peermaker', 'pgvpn_agent', 'pgvpn_reader',
                  'pgvpn_peer_a', 'pgvpn_peer_b']) AS r;

-- pgvpn's own roles belong to nothing but what a peer belongs to: no pg_* role
-- (pg_execute_server_program, pg_read_server_files ...), not each other.
SELECT is_empty(
    $$SELECT m.member::regrole::text || ' is a member of ' || m.roleid::regrole::text
      FROM pg_catalog.pg_auth_members m
      JOIN pg_catalog.pg_roles r ON r.oid = m.member
      WHERE r.rolname LIKE 'pgvpn\_%'
        AND NOT (m.roleid = 'pgvpn_agent'::regrole
                 AND r.rolname NOT IN ('pgvpn_owner', 'pgvpn_peermaker', 'pgvpn_agent',
                                       'pgvpn_reader'))$$,
    'no pgvpn role is a member of any role, except peers of pgvpn_agent');
SELECT is_empty(
    $$SELECT m.member::regrole::text FROM pg_catalog.pg_auth_members m
      WHERE m.roleid IN ('pgvpn_peermaker'::regrole, 'pgvpn_owner'::regrole)$$,
    'nobody is a member of pgvpn_peermaker or pgvpn_owner');
SELECT is_empty(
    $$SELECT r.rolname::text FROM pg_catalog.pg_roles r
      WHERE r.rolname LIKE 'pgvpn\_%' AND r.rolname <> 'pgvpn_peermaker'
        AND (r.rolcreaterole OR r.rolsuper OR r.rolbypassrls OR r.rolreplication
             OR r.rolcreatedb)$$,
    'no pgvpn role has SUPERUSER, CREATEROLE (but pgvpn_peermaker), CREATEDB, REPLICATION or BYPASSRLS');

-- Peers: every member of pgvpn_agent is exactly a peer's role, which logs in, or
-- which `pgvpn db remove-peer` removed (NOLOGIN and no password: disable_peer_role).
SELECT set_has(
    $$SELECT m.member::regrole::text FROM pg_catalog.pg_auth_members m
      WHERE m.roleid = 'pgvpn_agent'::regrole$$,
    $$VALUES ('pgvpn_peer_a'), ('pgvpn_peer_b')$$,
    'the lab''s peers pgvpn_peer_a and pgvpn_peer_b are members of pgvpn_agent');
SELECT is_empty(
    $$SELECT r.rolname::text FROM pg_catalog.pg_auth_members m
      JOIN pg_catalog.pg_authid r ON r.oid = m.member
      WHERE m.roleid = 'pgvpn_agent'::regrole
        AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
             OR r.rolbypassrls OR (NOT r.rolcanlogin AND r.rolpassword IS NOT NULL)
             OR m.admin_option
             OR r.rolname !~ '^pgvpn_[a-z0-9][a-z0-9_]{0,56}$'
             OR r.rolname IN ('pgvpn_owner', 'pgvpn_peermaker', 'pgvpn_agent', 'pgvpn_reader')
             OR EXISTS (SELECT FROM pg_catalog.pg_auth_members o
                        WHERE o.roleid = r.oid))$$,
    'every member of pgvpn_agent is a peer''s LOGIN role (or a removed peer''s, with no password): no attribute, no ADMIN OPTION, no members');
SELECT is_empty(
    $$SELECT r.rolname::text FROM pg_catalog.pg_auth_members m
      JOIN pg_catalog.pg_roles r ON r.oid = m.member
      WHERE m.roleid = 'pgvpn_agent'::regrole
        AND NOT EXISTS (SELECT FROM pgvpn.peers p
                        WHERE 'pgvpn_' || pg_catalog.replace(p.name, '-', '_') = r.rolname)$$,
    'every peer role has its pgvpn.peers row');
SELECT is_member_of('pgvpn_agent', ARRAY['pgvpn_peer_a', 'pgvpn_peer_b'],
                    'pgvpn_peer_a and pgvpn_peer_b are members of pgvpn_agent');

SELECT * FROM finish();
ROLLBACK;
