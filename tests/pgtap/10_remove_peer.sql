-- pgvpn_admin.disable_peer_role(peer), `pgvpn db remove-peer`'s part that needs role
-- rights (sql/init_peer_roles.sql): called as the owner it takes LOGIN and the password
-- from exactly a peer's role and ends that role's sessions, and refuses everything
-- else: reserved and bad names, roles that are not a peer's (pgvpn's own, the server's,
-- one someone granted more to), whatever the owner put in pg_temp; and a hostile
-- peer cannot make itself (or another peer) impossible to remove with what any role
-- may make by itself.  It touches no pgvpn table, leaves pgvpn_peermaker a member of
-- nothing, and ensure_peer_role brings the peer back.  Peers and readers cannot call it.  (That it really ends a connected
-- peer's sessions, and only those, needs a second session: tests/test_remove_peer.py.)
\ir begin.inc
SELECT plan(50);

-- ------------------------------------------------------------- the scene
\set v1 '''SCRAM-SHA-256$4096:izYqIgdMx9GcJA+aHU2eJQ==$C+rXpB9YW/ySWEqSW1aEeXwdo8YXECegYVGULj2YWFw=:aPVf0VStWYjMjvm2bPQEnPrvobSNWstbVDfgt6P/KAA='''
\set v2 '''SCRAM-SHA-256$4096:u+NdMnntdk0RbdjYVPQARQ==$7mkDlvXsEAYI31KI+3PZp6uxTxdmPKxeC1S4lg/Rm2Q=:n2mywmnVDej89ZKZoIb4djRNiyZbE0peNnDqZTPd/xY='''

-- A peer as `pgvpn db add-peer` makes it, with a route, a logged packet and a cursor.
CREATE ROLE pgvpn_tap_gone LOGIN IN ROLE pgvpn_agent;
ALTER ROLE pgvpn_tap_gone PASSWORD :v1;
INSERT INTO pgvpn.peers (name) VALUES ('tap-gone');
INSERT INTO pgvpn.routes (peer, prefix, address) VALUES ('tap-gone', '10.98.0.7/32', '10.98.0.7/24');
INSERT INTO pgvpn.packets (sender, seq, receiver, length, data)
VALUES ('tap-gone', 1, 'peer-a', 1, '\x45');
INSERT INTO pgvpn.cursors (receiver, sender, last_seq) VALUES ('tap-gone', 'peer-a', 0);

-- Roles whose names are a peer's but which are more than a peer's role, as a
-- superuser (or a careless owner's helper) might have left them.
CREATE ROLE pgvpn_tap_super LOGIN SUPERUSER IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_createrole LOGIN CREATEROLE IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_createdb LOGIN CREATEDB IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_replication LOGIN REPLICATION IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_bypassrls LOGIN BYPASSRLS IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_nogroup LOGIN;
CREATE ROLE pgvpn_tap_extra LOGIN IN ROLE pgvpn_agent, pg_read_all_data;
CREATE ROLE pgvpn_tap_signal LOGIN IN ROLE pgvpn_agent, pg_signal_backend;
CREATE ROLE pgvpn_tap_reader LOGIN IN ROLE pgvpn_agent, pgvpn_reader;
CREATE ROLE pgvpn_tap_hasmember LOGIN IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_member NOLOGIN IN ROLE pgvpn_tap_hasmember;
CREATE ROLE pgvpn_tap_admin LOGIN;
GRANT pgvpn_agent TO pgvpn_tap_admin WITH ADMIN OPTION;
CREATE ROLE pgvpn_tap_owns LOGIN IN ROLE pgvpn_agent;
CREATE SCHEMA tap_owned AUTHORIZATION pgvpn_tap_owns;
CREATE ROLE pgvpn_tap_granted LOGIN IN ROLE pgvpn_agent;
GRANT SELECT ON pgvpn.log_settings TO pgvpn_tap_granted;

-- A hostile peer entangles itself, and another peer, with what any role may make by
-- itself: a setting of its own, a large object, default privileges naming another.
CREATE ROLE pgvpn_tap_hostile LOGIN IN ROLE pgvpn_agent;
CREATE ROLE pgvpn_tap_victim LOGIN IN ROLE pgvpn_agent;
SET SESSION AUTHORIZATION pgvpn_tap_hostile;
SELECT pg_temp.try_command('hostile: a setting of its own',
    $$ALTER ROLE pgvpn_tap_hostile SET work_mem = '1MB'$$);
SELECT pg_temp.try_command('hostile: a large object, granted to another peer',
    $q$DO $d$ BEGIN
        EXECUTE pg_catalog.format('GRANT SELECT ON LARGE OBJECT %s TO pgvpn_tap_victim',
                                  pg_catalog.lo_create(0));
    END $d$$q$);
SELECT pg_temp.try_command('hostile: default privileges naming another peer',
    'ALTER DEFAULT PRIVILEGES FOR ROLE pgvpn_tap_hostile GRANT SELECT ON TABLES TO pgvpn_tap_victim');
RESET SESSION AUTHORIZATION;

CREATE TABLE pg_temp.before AS
SELECT a.rolname, a.rolcanlogin, a.rolpassword FROM pg_catalog.pg_authid a;
CREATE TABLE pg_temp.members_before AS
SELECT m.roleid, m.member, m.admin_option FROM pg_catalog.pg_auth_members m;
-- the lab's agents' sessions, which no call here may end
CREATE TABLE pg_temp.agent_sessions AS
SELECT a.pid FROM pg_catalog.pg_stat_activity a
WHERE pg_catalog.pg_has_role(a.usesysid, 'pgvpn_agent', 'MEMBER');

-- What the owner's shadows report when they run (as whom); a counter of runs under
-- another role that survives any rollback (a sequence is not transactional).
CREATE TABLE pg_temp.ran (vector pg_catalog.text, as_user pg_catalog.text,
                          session pg_catalog.text);
CREATE SEQUENCE pg_temp.ran_as_other;
GRANT ALL ON pg_temp.ran, pg_temp.ran_as_other TO PUBLIC;

-- ------------------------------------------------------------ as the owner
SET SESSION AUTHORIZATION pgvpn_owner;
SELECT pg_temp.try_query('reserved ' || n,
    pg_catalog.format('SELECT was_login FROM pgvpn_admin.disable_peer_role(%L)', n))
FROM pg_catalog.unnest('{agent,reader,owner,peermaker}'::pg_catalog.text[]) n;
SELECT pg_temp.try_query('bad name ' || coalesce(n, 'NULL'),
    pg_catalog.format('SELECT was_login FROM pgvpn_admin.disable_peer_role(%L)', n))
FROM pg_catalog.unnest(ARRAY['Peer-b', 'PEER-B', 'peer_b', '-peer', '', 'peer b', 'pe"er',
                             'x; DROP ROLE pgvpn_peer_b', 'peer-b' || pg_catalog.chr(10), NULL,
                             pg_catalog.repeat('a', 58)]) n;
-- no peer of these names: the server's superuser is pgvpn_postgres to this function
SELECT pg_temp.try_query('no role ' || n,
    pg_catalog.format('SELECT was_login FROM pgvpn_admin.disable_peer_role(%L)', n))
FROM pg_catalog.unnest('{postgres,tap-nobody}'::pg_catalog.text[]) n;
SELECT pg_temp.try_query('existing ' || r, pg_catalog.format(
    'SELECT was_login FROM pgvpn_admin.disable_peer_role(%L)',
    pg_catalog.replace(pg_catalog.substr(r, 7), '_', '-')))
FROM pg_catalog.unnest('{pgvpn_tap_super,pgvpn_tap_createrole,pgvpn_tap_createdb,'
                       'pgvpn_tap_replication,pgvpn_tap_bypassrls,pgvpn_tap_nogroup,'
                       'pgvpn_tap_extra,pgvpn_tap_signal,pgvpn_tap_reader,'
                       'pgvpn_tap_hasmember,pgvpn_tap_admin,pgvpn_tap_owns,'
                       'pgvpn_tap_granted}'::pg_catalog.text[]) r;
SELECT pg_temp.try_query('owner calls the check itself',
    $$SELECT pgvpn_admin.exactly_a_peer_role('pgvpn_tap_extra'::pg_catalog.regrole, true)$$);
SELECT pg_temp.try_query('remove ' || r, pg_catalog.format(
    'SELECT pg_catalog.concat_ws('' '', d.was_login::pg_catalog.text, d.sessions_ended) '
    'FROM pgvpn_admin.disable_peer_role(%L) d', r))
FROM pg_catalog.unnest('{tap-hostile,tap-victim}'::pg_catalog.text[]) r;
SELECT pg_temp.try_query('re-password tap-hostile', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''tap-hostile'', %s)', :'v2'));

-- Shadows in pg_temp (the owner has TEMPORARY) that would make a role look like a
-- peer's (its other memberships, objects and settings hidden) and run the owner's
-- code as pgvpn_peermaker, with pg_temp first in the owner's own search_path; each
-- usable by anyone (the owner's default privileges give PUBLIC no EXECUTE, sql/005,
-- which would make a shadow fail rather than run).
SELECT pg_temp.try_command('shadow: spy()', $q$
CREATE FUNCTION pg_temp.spy(vector pg_catalog.text) RETURNS pg_catalog.bool
LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO pg_temp.ran VALUES (vector, current_user, session_user);
    IF current_user OPERATOR(pg_catalog.<>) session_user THEN
        PERFORM pg_catalog.nextval('pg_temp.ran_as_other');
        BEGIN  -- what pgvpn_peermaker's CREATEROLE could give the owner
            EXECUTE 'GRANT pg_execute_server_program TO pgvpn_owner';
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END IF;
    RETURN true;
END $f$;
GRANT EXECUTE ON FUNCTION pg_temp.spy(pg_catalog.text) TO PUBLIC $q$);
SELECT pg_temp.try_command('shadow: view ' || v.name, pg_catalog.format(
    'CREATE VIEW pg_temp.%I AS SELECT * FROM pg_catalog.%I x WHERE pg_temp.spy(%L) AND %s; '
    'GRANT SELECT ON pg_temp.%I TO PUBLIC', v.name, v.name, 'view ' || v.name, v.hides, v.name))
FROM (VALUES ('pg_roles', 'true'), ('pg_stat_activity', 'true'),
             ('pg_auth_members', 'x.roleid = (SELECT r.oid FROM pg_catalog.pg_roles r '
                                  'WHERE r.rolname = ''pgvpn_agent'')'), ('pg_shdepend', 'false'),
             ('pg_db_role_setting', 'false')) AS v(name, hides);
SELECT pg_temp.try_command('shadow: function ' || f.signature, pg_catalog.format(
    'CREATE FUNCTION pg_temp.%s RETURNS %s LANGUAGE sql AS %L; '
    'GRANT EXECUTE ON FUNCTION pg_temp.%s TO PUBLIC', f.signature, f.returns,
    pg_catalog.format('SELECT %s WHERE pg_temp.spy(%L)', f.answer, 'function ' || f.signature),
    f.signature))
FROM (VALUES
    ('exactly_a_peer_role(oid, pg_catalog.bool)', 'pg_catalog.bool', 'true'),
    ('replace(pg_catalog.text, pg_catalog.text, pg_catalog.text)', 'pg_catalog.text',
     '''tap_gone'''),
    ('quote_nullable(pg_catalog.text)', 'pg_catalog.text', '''x'''),
    ('pg_terminate_backend(pg_catalog.int4, pg_catalog.int8)', 'pg_catalog.bool', 'true')
) AS f(signature, returns, answer);
SET search_path = pg_temp, pgvpn_admin, pg_catalog;
SELECT pg_temp.try_query('shadowed ' || r, pg_catalog.format(
    'SELECT was_login FROM pgvpn_admin.disable_peer_role(%L)',
    pg_catalog.replace(pg_catalog.substr(r, 7), '_', '-')))
FROM pg_catalog.unnest('{pgvpn_tap_extra,pgvpn_tap_owns,pgvpn_tap_granted}'::pg_catalog.text[]) r;
SELECT pg_temp.try_query('remove tap-gone', $$
    SELECT pg_catalog.concat_ws(' ', d.was_login::pg_catalog.text, d.sessions_ended)
    FROM pgvpn_admin.disable_peer_role('tap-gone') d$$);
SELECT pg_temp.try_query('remove tap-gone again', $$
    SELECT pg_catalog.concat_ws(' ', d.was_login::pg_catalog.text, d.sessions_ended)
    FROM pgvpn_admin.disable_peer_role('tap-gone') d$$);
RESET search_path;
RESET SESSION AUTHORIZATION;
SET LOCAL search_path = pgtap, pg_catalog, pg_temp;
SELECT pg_catalog.pg_stat_clear_snapshot();
CREATE TABLE pg_temp.removed AS
SELECT a.rolcanlogin, a.rolpassword FROM pg_catalog.pg_authid a WHERE a.rolname = 'pgvpn_tap_gone';
CREATE TABLE pg_temp.members_after_removal AS
SELECT m.roleid, m.member, m.admin_option FROM pg_catalog.pg_auth_members m;

-- ------------------------------------------------ as a peer, as a reader
SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_query('peer removes peer-b',
    $$SELECT was_login FROM pgvpn_admin.disable_peer_role('peer-b')$$);
SELECT pg_temp.try_query('peer removes itself',
    $$SELECT was_login FROM pgvpn_admin.disable_peer_role('peer-a')$$);
SELECT pg_temp.try_query('peer calls the check',
    $$SELECT pgvpn_admin.exactly_a_peer_role('pgvpn_peer_b'::pg_catalog.regrole, true)$$);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pgvpn_reader;
SELECT pg_temp.try_query('reader removes peer-b',
    $$SELECT was_login FROM pgvpn_admin.disable_peer_role('peer-b')$$);
RESET SESSION AUTHORIZATION;

-- ------------------------------------------------- add-peer brings it back
SET SESSION AUTHORIZATION pgvpn_owner;
SELECT pg_temp.try_query('add tap-gone again', pg_catalog.format(
    'SELECT pgvpn_admin.ensure_peer_role(''tap-gone'', %s)', :'v2'));
RESET SESSION AUTHORIZATION;
SET LOCAL search_path = pgtap, pg_catalog, pg_temp;

-- --------------------------------------------------------------- verdicts
SELECT is(pg_temp.outcome('reserved ' || n), '22023',
          format('refuses the reserved peer name %s', n))
FROM unnest('{agent,reader,owner,peermaker}'::text[]) n;
SELECT is_empty(
    $$SELECT o.label || ': ' || coalesce(o.sqlstate, 'accepted') FROM pg_temp.outcomes o
      WHERE o.label LIKE 'bad name %' AND o.sqlstate IS DISTINCT FROM '22023'$$,
    'refuses bad peer names: upper case, _, leading -, empty, space, quote, SQL, newline, NULL, 58 characters');
SELECT is(count(*)::integer, 11, 'all 11 bad names were tried')
FROM pg_temp.outcomes o WHERE o.label LIKE 'bad name %';
SELECT is(pg_temp.outcome('no role postgres'), '42704',
          'the name postgres is role pgvpn_postgres here, which does not exist: refused');
SELECT is(pg_temp.outcome('no role tap-nobody'), '42704', 'refuses a peer without a role');
SELECT is(pg_temp.outcome('existing ' || r), '42501',
          format('refuses to disable the existing role %s (%s)', r, why))
FROM (VALUES ('pgvpn_tap_super', 'SUPERUSER'), ('pgvpn_tap_createrole', 'CREATEROLE'),
             ('pgvpn_tap_createdb', 'CREATEDB'), ('pgvpn_tap_replication', 'REPLICATION'),
             ('pgvpn_tap_bypassrls', 'BYPASSRLS'),
             ('pgvpn_tap_nogroup', 'not in pgvpn_agent'),
             ('pgvpn_tap_extra', 'also in pg_read_all_data'),
             ('pgvpn_tap_signal', 'also in pg_signal_backend'),
             ('pgvpn_tap_reader', 'also in pgvpn_reader'),
             ('pgvpn_tap_hasmember', 'has a member'),
             ('pgvpn_tap_admin', 'pgvpn_agent WITH ADMIN OPTION'),
             ('pgvpn_tap_owns', 'owns a schema'),
             ('pgvpn_tap_granted', 'holds a privilege of its own')) AS x(r, why);
SELECT is(pg_temp.outcome('owner calls the check itself'), '42501',
          'the owner cannot call exactly_a_peer_role (only the peer maker''s functions do)');

SELECT is_empty($$SELECT o.label || ': ' || o.sqlstate || ' ' || o.message FROM pg_temp.outcomes o
                  WHERE o.label LIKE 'shadow: %' AND o.sqlstate IS NOT NULL$$,
                'the owner made its shadows: spy(), 5 views, 4 functions');
SELECT is(count(*)::integer, 10, 'all 10 shadows were tried')
FROM pg_temp.outcomes o WHERE o.label LIKE 'shadow: %';
SELECT is(pg_temp.outcome('shadowed ' || r), '42501',
          format('with its pg_temp shadows first in its search_path, the owner still cannot disable %s', r))
FROM unnest('{pgvpn_tap_extra,pgvpn_tap_owns,pgvpn_tap_granted}'::text[]) r;
SELECT is_empty($$SELECT r.vector || ' ran as ' || r.as_user FROM pg_temp.ran r
                  WHERE r.as_user <> r.session$$,
                'no shadow of the owner''s ran as anyone but the owner');
SELECT is((SELECT s.is_called FROM pg_temp.ran_as_other s), false,
          'no shadow ran as another role even in a call that failed (counter untouched)');

SELECT is(pg_temp.outcome(o), '00000', format('a peer may make by itself: %s', substr(o, 10)))
FROM unnest(ARRAY['hostile: a setting of its own',
                  'hostile: a large object, granted to another peer',
                  'hostile: default privileges naming another peer']) o;
SELECT is(pg_temp.result('remove ' || r), 'true 0',
          format('disables %s all the same: no peer can make itself, or another, impossible to remove', r))
FROM unnest('{tap-hostile,tap-victim}'::text[]) r;
SELECT is(pg_temp.outcome('re-password tap-hostile'), '42501',
          're-passwording stays strict: ensure_peer_role refuses the entangled role (a superuser cleans it first)');

SELECT is(pg_temp.result('remove tap-gone'), 'true 0',
          'disables pgvpn_tap_gone: it could log in, and it had no session to end');
SELECT results_eq($$SELECT r.rolcanlogin, r.rolpassword IS NULL FROM pg_temp.removed r$$,
                  $$VALUES (false, true)$$,
                  'pgvpn_tap_gone can no longer log in, and its password is cleared');
SELECT is(pg_temp.result('remove tap-gone again'), 'false 0',
          'removing it again changes nothing and says it could not log in already');
SELECT results_eq(
    $$SELECT m.roleid::regrole::text, m.admin_option FROM pg_temp.members_after_removal m
      WHERE m.member = 'pgvpn_tap_gone'::regrole$$,
    $$VALUES ('pgvpn_agent', false)$$,
    'pgvpn_tap_gone is still exactly a peer''s role: in pgvpn_agent only (add-peer brings it back)');
SELECT is_empty(
    $$SELECT m.member::regrole::text || ' in ' || m.roleid::regrole::text
      FROM pg_temp.members_after_removal m
      WHERE (m.roleid, m.member, m.admin_option) NOT IN (
          SELECT b.roleid, b.member, b.admin_option FROM pg_temp.members_before b)$$,
    'no membership was left behind: pgvpn_peermaker''s one-call membership of the peer role is gone');
SELECT is_empty(
    $$SELECT m.roleid::regrole::text FROM pg_catalog.pg_auth_members m
      WHERE m.member = 'pgvpn_peermaker'::regrole$$,
    'pgvpn_peermaker is a member of nothing');
SELECT is_empty(
    $$SELECT a.rolname::text FROM pg_catalog.pg_authid a JOIN pg_temp.before b USING (rolname)
      WHERE (a.rolcanlogin, a.rolpassword) IS DISTINCT FROM (b.rolcanlogin, b.rolpassword)
        AND a.rolname NOT IN ('pgvpn_tap_gone', 'pgvpn_tap_hostile', 'pgvpn_tap_victim')$$,
    'no other role lost its login or password: pgvpn_owner, postgres, the lab''s peers and the refused roles keep theirs');
SELECT results_eq(
    $$SELECT (SELECT count(*) FROM pgvpn.peers WHERE name = 'tap-gone'),
             (SELECT count(*) FROM pgvpn.routes WHERE peer = 'tap-gone'),
             (SELECT count(*) FROM pgvpn.packets WHERE sender = 'tap-gone'),
             (SELECT count(*) FROM pgvpn.cursors WHERE receiver = 'tap-gone')$$,
    $$VALUES (1::bigint, 1::bigint, 1::bigint, 1::bigint)$$,
    'the function touches no pgvpn table: the peers row, its route, its packet and its cursor stay');
SELECT is_empty(
    $$SELECT s.pid::text FROM pg_temp.agent_sessions s
      WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid = s.pid)$$,
    'every session of the lab''s agents is still there');

SELECT is(pg_temp.outcome('peer removes peer-b'), '42501', 'a peer cannot disable another peer');
SELECT is(pg_temp.outcome('peer removes itself'), '42501', 'a peer cannot call disable_peer_role at all');
SELECT is(pg_temp.outcome('peer calls the check'), '42501', 'a peer cannot call exactly_a_peer_role');
SELECT is(pg_temp.outcome('reader removes peer-b'), '42501', 'a reader cannot disable a peer');

SELECT is(pg_temp.result('add tap-gone again'), 'false',
          'ensure_peer_role takes the removed peer''s role back (not new)');
SELECT results_eq(
    format($$SELECT a.rolcanlogin, a.rolpassword = %L FROM pg_catalog.pg_authid a
             WHERE a.rolname = 'pgvpn_tap_gone'$$, :v2),
    $$VALUES (true, true)$$,
    'pgvpn_tap_gone logs in again, with the new password only');

SELECT * FROM finish();
ROLLBACK;
