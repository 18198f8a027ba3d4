-- pgvpn_admin.ensure_peer_role(peer, verifier), the owner's only way to make roles
-- (sql/init_peer_roles.sql): called as the owner it makes or re-passwords exactly a
-- peer's role and refuses everything else; a peer cannot call it at all.
\ir begin.inc
SELECT plan(32);

-- Roles that exist with more than a peer's role has, as a superuser might have
-- left them: each must be refused, its password untouched.
CREATE ROLE pgvpn_tap_super LOGIN SUPERUSER IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_createrole LOGIN CREATEROLE IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_createdb LOGIN CREATEDB IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_replication LOGIN REPLICATION IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_bypassrls LOGIN BYPASSRLS IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_nogroup LOGIN;
CREATE ROLE pgvpn_tap_extra LOGIN IN ROLE pgvpn_agent, pg_read_all_data;
CREATE ROLE pgvpn_tap_reader LOGIN IN ROLE pgvpn_agent, pgvpn_reader;
CREATE ROLE pgvpn_tap_hasmember LOGIN IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_member NOLOGIN IN ROLE pgvpn_tap_hasmember;
CREATE ROLE pgvpn_tap_admin LOGIN;
GRANT pgvpn_agent TO pgvpn_tap_admin WITH ADMIN OPTION;
CREATE TABLE pg_temp.before AS
SELECT a.rolname, a.rolpassword FROM pg_catalog.pg_authid a;

\set v1 '''SCRAM-SHA-256$4096:izYqIgdMx9GcJA+aHU2eJQ==$C+rXpB9YW/ySWEqSW1aEeXwdo8YXECegYVGULj2YWFw=:aPVf0VStWYjMjvm2bPQEnPrvobSNWstbVDfgt6P/KAA='''
\set v2 '''SCRAM-SHA-256$4096:u+NdMnntdk0RbdjYVPQARQ==$7mkDlvXsEAYI31KI+3PZp6uxTxdmPKxeC1S4lg/Rm2Q=:n2mywmnVDej89ZKZoIb4djRNiyZbE0peNnDqZTPd/xY='''

-- ------------------------------------------------------------ as the owner
SET SESSION AUTHORIZATION pgvpn_owner;
SELECT pg_temp.try_query('reserved ' || n,
                         pg_catalog.format('SELECT pgvpn_admin.ensure_peer_role(%L, %s)', n, :'v1'))
FROM pg_catalog.unnest('{agent,reader,owner,peermaker}'::pg_catalog.text[]) n;
SELECT pg_temp.try_query('bad name ' || coalesce(n, 'NULL'),
                         pg_catalog.format('SELECT pgvpn_admin.ensure_peer_role(%L, %s)', n, :'v1'))
FROM pg_catalog.unnest(ARRAY['Peer', 'peer_x', '-peer', '', 'peer x', 'pe"er', NULL,
                             pg_catalog.repeat('a', 58)]) n;
SELECT pg_temp.try_query('password ' || coalesce(v.label, 'NULL'),
                         pg_catalog.format('SELECT pgvpn_admin.ensure_peer_role(''tap-new'', %L)',
                                           v.verifier))
FROM (VALUES ('plaintext', 'correct horse battery staple'),
             ('md5', 'md5' || pg_catalog.md5('secretpgvpn_tap_new')),
             ('SCRAM-like text', 'SCRAM-SHA-256$4096:salt$key:key and more'),
             ('NULL', NULL)) AS v(label, verifier);
SELECT pg_temp.try_query('malformed SCRAM verifier',
    $q$SELECT pgvpn_admin.ensure_peer_role('tap-malformed', 'SCRAM-SHA-256$4096:AAAA$BBBB:CCCC')$q$);
SELECT pg_temp.try_query('existing ' || r, pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(%L, %s)',
    pg_catalog.replace(pg_catalog.substr(r, 7), '_', '-'), :'v1'))
FROM pg_catalog.unnest('{pgvpn_tap_super,pgvpn_tap_createrole,pgvpn_tap_createdb,'
                       'pgvpn_tap_replication,pgvpn_tap_bypassrls,pgvpn_tap_nogroup,'
                       'pgvpn_tap_extra,pgvpn_tap_reader,pgvpn_tap_hasmember,'
                       'pgvpn_tap_admin}'::pg_catalog.text[]) r;
SELECT pg_temp.try_query('make tap-new', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''tap-new'', %s)', :'v1'));
RESET SESSION AUTHORIZATION;
CREATE TABLE pg_temp.made AS
SELECT a.rolpassword FROM pg_catalog.pg_authid a WHERE a.rolname = 'pgvpn_tap_new';
SET SESSION AUTHORIZATION pgvpn_owner;
SELECT pg_temp.try_query('re-password tap-new', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''tap-new'', %s)', :'v2'));
RESET SESSION AUTHORIZATION;

-- ------------------------------------------------------------- as a peer
SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_query('peer calls it', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''tap-peer'', %s)', :'v1'));
SELECT pg_temp.try_query('peer re-passwords peer-b', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''peer-b'', %s)', :'v1'));
RESET SESSION AUTHORIZATION;
SET LOCAL search_path = pgtap, pg_catalog, pg_temp;

-- --------------------------------------------------------------- verdicts
SELECT is(pg_temp.outcome('reserved ' || n), '22023',
          format('refuses the reserved peer name %s', n))
FROM unnest('{agent,reader,owner,peermaker}'::text[]) n;
SELECT is_empty(
    $$SELECT o.label || ': ' || coalesce(o.sqlstate, 'accepted') FROM pg_temp.outcomes o
      WHERE o.label LIKE 'bad name %' AND o.sqlstate IS DISTINCT FROM '22023'$$,
    'refuses bad peer names: upper case, _, leading -, empty, space, quote, NULL, 58 characters');
SELECT is(count(*)::integer, 8, 'all 8 bad names were tried')
FROM pg_temp.outcomes o WHERE o.label LIKE 'bad name %';
SELECT is(pg_temp.outcome('password ' || p), '28P01',
          format('refuses a password given as %s', p))
FROM unnest('{plaintext,md5,"SCRAM-like text","NULL"}'::text[]) p;
-- A string of the verifier's shape that is no valid SCRAM secret (here: salt and
-- keys of the wrong length) is taken by PostgreSQL as a plaintext password and
-- hashed: the "password" then is that string, and it did reach the server.
SELECT is(pg_temp.outcome('malformed SCRAM verifier'), '28P01',
          'refuses a verifier of the right shape that is no valid SCRAM secret');
SELECT is(pg_temp.outcome('existing ' || r), '42501',
          format('refuses to re-password the existing role %s (%s)', r, why))
FROM (VALUES ('pgvpn_tap_super', 'SUPERUSER'), ('pgvpn_tap_createrole', 'CREATEROLE'),
             ('pgvpn_tap_createdb', 'CREATEDB'), ('pgvpn_tap_replication', 'REPLICATION'),
             ('pgvpn_tap_bypassrls', 'BYPASSRLS'),
             ('pgvpn_tap_nogroup', 'not in pgvpn_agent'),
             ('pgvpn_tap_extra', 'also in pg_read_all_data'),
             ('pgvpn_tap_reader', 'also in pgvpn_reader'),
             ('pgvpn_tap_hasmember', 'has a member')) AS x(r, why);
SELECT is(pg_temp.outcome('existing pgvpn_tap_admin'), '42501',
          'refuses to re-password pgvpn_tap_admin (pgvpn_agent WITH ADMIN OPTION)');
SELECT is_empty(
    $$SELECT a.rolname::text FROM pg_catalog.pg_authid a JOIN pg_temp.before b USING (rolname)
      WHERE a.rolpassword IS DISTINCT FROM b.rolpassword AND a.rolname <> 'pgvpn_tap_admin'$$,
    'no role''s password changed but pgvpn_tap_new''s (the refused ones and the lab''s peers keep theirs)');

SELECT is(pg_temp.result('make tap-new'), 'true', 'makes the new peer role pgvpn_tap_new');
SELECT results_eq(
    $$SELECT a.rolcanlogin, a.rolsuper, a.rolinherit, a.rolcreaterole, a.rolcreatedb,
             a.rolreplication, a.rolbypassrls FROM pg_catalog.pg_authid a
      WHERE a.rolname = 'pgvpn_tap_new'$$,
    $$VALUES (true, false, true, false, false, false, false)$$,
    'pgvpn_tap_new: LOGIN INHERIT and no other attribute');
SELECT results_eq(
    $$SELECT m.roleid::regrole::text, m.admin_option FROM pg_catalog.pg_auth_members m
      WHERE m.member = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgvpn_tap_new')$$,
    $$VALUES ('pgvpn_agent', false)$$,
    'pgvpn_tap_new is a member of pgvpn_agent only, without ADMIN OPTION');
SELECT is_empty($$SELECT m.member::regrole::text FROM pg_catalog.pg_auth_members m
                  WHERE m.roleid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgvpn_tap_new')$$,
                'pgvpn_tap_new has no members');
SELECT is((SELECT m.rolpassword FROM pg_temp.made m),
          :v1, 'pgvpn_tap_new''s password is the verifier given, stored as it is');
SELECT is(pg_temp.result('re-password tap-new'), 'false',
          're-passwords a role that is exactly a peer''s (returns false: not new)');
SELECT is((SELECT a.rolpassword FROM pg_catalog.pg_authid a WHERE a.rolname = 'pgvpn_tap_new'),
          :v2, 'pgvpn_tap_new''s password is now the second verifier');

SELECT is(pg_temp.outcome('peer calls it'), '42501', 'a peer cannot call ensure_peer_role');
SELECT is(pg_temp.outcome('peer re-passwords peer-b'), '42501',
          'a peer cannot re-password another peer through ensure_peer_role');
SELECT hasnt_role('pgvpn_tap_peer', 'the peer made no role');

SELECT * FROM finish();
ROLLBACK;
