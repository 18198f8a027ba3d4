-- What pgvpn_agent (every peer), pgvpn_reader and PUBLIC may do to each table,
-- view, sequence, schema and the database; row-level security and its policies
-- (sql/001-005, SECURITY.md "What a peer can and cannot do").
\ir begin.inc
SELECT plan(130);

-- ---------------------------------------------------------------- tables, views
-- Effective privileges (has_table_privilege: membership and PUBLIC included).
-- A peer INSERTs into pgvpn.packets, and UPDATEs cursors and peers, only through
-- column privileges (below): table-level UPDATE would let it LOCK TABLE in any mode.
CREATE TEMPORARY TABLE intended (relation name, agent name[], reader name[]) ON COMMIT DROP;
INSERT INTO intended VALUES
    ('schema_migrations', '{SELECT}',               '{SELECT}'),
    ('peers',             '{SELECT,INSERT}',        '{SELECT}'),
    ('packets',           '{}',                     '{SELECT}'),
    ('cursors',           '{SELECT,INSERT}',        '{SELECT}'),
    ('log_settings',      '{SELECT}',               '{SELECT}'),
    ('blog_v1_packets',   '{SELECT,INSERT}',        '{SELECT}'),
    ('blog_v2_packets',   '{SELECT,INSERT}',        '{SELECT}'),
    ('inbox',             '{SELECT}',               '{}'),
    ('log_partitions',    '{}',                     '{SELECT}'),
    ('packet_headers',    '{}',                     '{SELECT}'),
    ('routes',            '{SELECT}',               '{SELECT}');

SELECT table_privs_are('pgvpn', i.relation, r.role,
                       CASE r.role WHEN 'pgvpn_agent' THEN i.agent
                                   WHEN 'pgvpn_reader' THEN i.reader ELSE '{}' END,
                       format('%s on pgvpn.%s: %s', r.role, i.relation,
                              coalesce(nullif(array_to_string(
                                  CASE r.role WHEN 'pgvpn_agent' THEN i.agent
                                              WHEN 'pgvpn_reader' THEN i.reader
                                              ELSE '{}' END, ', '), ''), 'nothing')))
FROM intended i CROSS JOIN unnest('{public,pgvpn_agent,pgvpn_reader}'::name[]) AS r(role)
ORDER BY i.relation, r.role;

-- Every peer role has exactly pgvpn_agent's rights on every relation of the schema.
SELECT is_empty(
    $$SELECT r.rolname || ' on ' || c.oid::regclass::text || ': ' || p.priv
      FROM pg_catalog.pg_auth_members m
      JOIN pg_catalog.pg_roles r ON r.oid = m.member
      CROSS JOIN pg_catalog.pg_class c
      CROSS JOIN unnest('{SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER}'::text[]) p(priv)
      WHERE m.roleid = 'pgvpn_agent'::regrole
        AND c.relnamespace = 'pgvpn'::regnamespace AND c.relkind IN ('r', 'p', 'v')
        AND pg_catalog.has_table_privilege(r.oid, c.oid, p.priv)
            <> pg_catalog.has_table_privilege('pgvpn_agent', c.oid, p.priv)$$,
    'every peer role has exactly pgvpn_agent''s table privileges, on every table, view and partition');

-- Exactly these grants, to anyone (relation ACLs, owner's own left out).
SELECT set_eq(
    $$SELECT c.relname::text,
             CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
             a.privilege_type
      FROM pg_catalog.pg_class c
      CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
      WHERE c.relnamespace = 'pgvpn'::regnamespace AND a.grantee <> c.relowner$$,
    $$SELECT i.relation::text, 'pgvpn_agent', p::text FROM intended i, unnest(i.agent) p
      UNION ALL
      SELECT i.relation::text, 'pgvpn_reader', p::text FROM intended i, unnest(i.reader) p
      UNION ALL
      VALUES ('packets_id_seq', 'pgvpn_agent', 'USAGE')$$,
    'relations in pgvpn grant exactly the intended privileges, none to PUBLIC or anyone else');

-- ----------------------------------------------------------------- columns
-- Agents INSERT (and COPY) pgvpn.packets' seq, receiver, length, data, offload; sender is
-- the column default (the session's peer), never theirs to set; nothing else.
SELECT column_privs_are('pgvpn', 'packets', c.col, r.role,
                        CASE WHEN c.col IN ('seq', 'receiver', 'length', 'data', 'offload')
                             THEN '{INSERT}'::name[] ELSE '{}'::name[] END,
                        format('%s on pgvpn.packets(%s): %s', r.role, c.col,
                               CASE WHEN c.col IN ('seq', 'receiver', 'length', 'data', 'offload')
                                    THEN 'INSERT' ELSE 'nothing' END))
FROM unnest('{id,logged_at,sender,seq,receiver,length,data,offload}'::name[]) AS c(col)
CROSS JOIN unnest('{pgvpn_agent,pgvpn_peer_a}'::name[]) AS r(role);
SELECT column_privs_are('pgvpn', 'blog_v1_packets', 'received', 'pgvpn_agent',
                        '{SELECT,INSERT,UPDATE}',
                        'pgvpn_agent on pgvpn.blog_v1_packets(received): SELECT, INSERT, UPDATE');
SELECT column_privs_are('pgvpn', 'blog_v1_packets', 'sender', 'pgvpn_agent', '{SELECT,INSERT}',
                        'pgvpn_agent on pgvpn.blog_v1_packets(sender): SELECT, INSERT (no UPDATE)');
-- Cursors and peers: UPDATE of exactly the columns the agents move (sql/008).
-- Table-level UPDATE would also allow LOCK TABLE ... ACCESS EXCLUSIVE, which a
-- peer could hold in an open transaction and stop every downlink.
SELECT column_privs_are('pgvpn', c.rel, c.col, 'pgvpn_agent', c.privs,
                        format('pgvpn_agent on pgvpn.%s(%s): %s', c.rel, c.col,
                               array_to_string(c.privs, ', ')))
FROM (VALUES ('cursors', 'receiver', '{SELECT,INSERT}'::name[]),
             ('cursors', 'sender', '{SELECT,INSERT}'),
             ('cursors', 'last_seq', '{SELECT,INSERT,UPDATE}'),
             ('cursors', 'updated_at', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'name', '{SELECT,INSERT}'),
             ('peers', 'tunnel_addr', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'last_seen', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'tunnel_addr6', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'agent_started', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'sent_packets', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'sent_bytes', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'received_packets', '{SELECT,INSERT,UPDATE}'),
             ('peers', 'received_bytes', '{SELECT,INSERT,UPDATE}')) AS c(rel, col, privs);
SELECT set_eq(
    $$SELECT c.relname::text, t.attname::text,
             CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
             a.privilege_type
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_attribute t ON t.attrelid = c.oid
      CROSS JOIN LATERAL pg_catalog.aclexplode(t.attacl) a
      WHERE c.relnamespace = 'pgvpn'::regnamespace$$,
    $$VALUES ('packets', 'seq', 'pgvpn_agent', 'INSERT'),
             ('packets', 'receiver', 'pgvpn_agent', 'INSERT'),
             ('packets', 'length', 'pgvpn_agent', 'INSERT'),
             ('packets', 'data', 'pgvpn_agent', 'INSERT'),
             ('packets', 'offload', 'pgvpn_agent', 'INSERT'),
             ('blog_v1_packets', 'received', 'pgvpn_agent', 'UPDATE'),
             ('cursors', 'last_seq', 'pgvpn_agent', 'UPDATE'),
             ('cursors', 'updated_at', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'tunnel_addr', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'last_seen', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'tunnel_addr6', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'agent_started', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'sent_packets', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'sent_bytes', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'received_packets', 'pgvpn_agent', 'UPDATE'),
             ('peers', 'received_bytes', 'pgvpn_agent', 'UPDATE')$$,
    'column grants in pgvpn are exactly INSERT on packets(seq, receiver, length, data, offload) and UPDATE on blog_v1_packets(received), cursors(last_seq, updated_at), peers(tunnel_addr, last_seen, and what pgvpn show reads: tunnel_addr6, agent_started, sent/received packets/bytes), to pgvpn_agent');
SELECT col_default_is('pgvpn', 'packets', 'sender', 'pgvpn.current_peer()',
                      'pgvpn.packets.sender defaults to pgvpn.current_peer()');

-- --------------------------------------------------------------- sequences
SELECT sequence_privs_are('pgvpn', s.seq, r.role,
                          CASE WHEN s.seq = 'packets_id_seq' AND r.role = 'pgvpn_agent'
                               THEN '{USAGE}'::name[] ELSE '{}'::name[] END,
                          format('%s on sequence pgvpn.%s: %s', r.role, s.seq,
                                 CASE WHEN s.seq = 'packets_id_seq' AND r.role = 'pgvpn_agent'
                                      THEN 'USAGE' ELSE 'nothing' END))
FROM unnest('{packets_id_seq,blog_v1_packets_id_seq,blog_v2_packets_id_seq}'::name[]) AS s(seq)
CROSS JOIN unnest('{public,pgvpn_agent,pgvpn_reader}'::name[]) AS r(role);

-- ----------------------------------------------------- views' own options
SELECT is((SELECT c.reloptions FROM pg_catalog.pg_class c WHERE c.oid = 'pgvpn.inbox'::regclass),
          '{security_barrier=true}', 'pgvpn.inbox is a security_barrier view');
SELECT is((SELECT c.reloptions FROM pg_catalog.pg_class c
           WHERE c.oid = 'pgvpn.packet_headers'::regclass),
          '{security_invoker=true}', 'pgvpn.packet_headers is a security_invoker view');

-- ---------------------------------------------------- row-level security
SELECT set_eq(
    $$SELECT c.relname::text FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relrowsecurity$$,
    ARRAY['cursors', 'peers', 'blog_v1_packets', 'blog_v2_packets'],
    'row-level security is enabled on exactly cursors, peers, blog_v1_packets, blog_v2_packets');
SELECT policies_are('pgvpn', 'cursors', '{own_cursors,reader_sees_all}',
                    'pgvpn.cursors has exactly the policies own_cursors, reader_sees_all');
SELECT policies_are('pgvpn', 'peers', '{own_row,reader_sees_all}',
                    'pgvpn.peers has exactly the policies own_row, reader_sees_all');
SELECT policies_are('pgvpn', 'blog_v1_packets', '{send_as_self,read_own,flag_own,reader_sees_all}',
                    'pgvpn.blog_v1_packets has exactly send_as_self, read_own, flag_own, reader_sees_all');
SELECT policies_are('pgvpn', 'blog_v2_packets', '{send_as_self,read_own,reader_sees_all}',
                    'pgvpn.blog_v2_packets has exactly send_as_self, read_own, reader_sees_all');

CREATE TEMPORARY TABLE intended_policies (
    relation name, policy name, role name, cmd text, qual text, with_check text
) ON COMMIT DROP;
INSERT INTO intended_policies VALUES
    ('cursors', 'own_cursors', 'pgvpn_agent', 'ALL',
     '(receiver = pgvpn.current_peer())', '(receiver = pgvpn.current_peer())'),
    ('cursors', 'reader_sees_all', 'pgvpn_reader', 'SELECT', 'true', NULL),
    ('peers', 'own_row', 'pgvpn_agent', 'ALL',
     '(name = pgvpn.current_peer())', '(name = pgvpn.current_peer())'),
    ('peers', 'reader_sees_all', 'pgvpn_reader', 'SELECT', 'true', NULL),
    ('blog_v1_packets', 'send_as_self', 'pgvpn_agent', 'INSERT',
     NULL, '(sender = pgvpn.current_peer())'),
    ('blog_v1_packets', 'read_own', 'pgvpn_agent', 'SELECT',
     '((receiver = pgvpn.current_peer()) OR (sender = pgvpn.current_peer()))', NULL),
    ('blog_v1_packets', 'flag_own', 'pgvpn_agent', 'UPDATE',
     '(receiver = pgvpn.current_peer())', NULL),
    ('blog_v1_packets', 'reader_sees_all', 'pgvpn_reader', 'SELECT', 'true', NULL),
    ('blog_v2_packets', 'send_as_self', 'pgvpn_agent', 'INSERT',
     NULL, '(sender = pgvpn.current_peer())'),
    ('blog_v2_packets', 'read_own', 'pgvpn_agent', 'SELECT',
     '((receiver = pgvpn.current_peer()) OR (sender = pgvpn.current_peer()))', NULL),
    ('blog_v2_packets', 'reader_sees_all', 'pgvpn_reader', 'SELECT', 'true', NULL);

SELECT policy_roles_are('pgvpn', p.relation, p.policy, ARRAY[p.role],
                        format('policy %s on pgvpn.%s applies to %s only', p.policy,
                               p.relation, p.role))
FROM intended_policies p ORDER BY p.relation, p.policy;
SELECT policy_cmd_is('pgvpn', p.relation, p.policy, p.cmd,
                     format('policy %s on pgvpn.%s is FOR %s', p.policy, p.relation, p.cmd))
FROM intended_policies p ORDER BY p.relation, p.policy;
SELECT set_eq(
    $$SELECT c.relname::text, p.polname::text, p.polpermissive,
             pg_catalog.pg_get_expr(p.polqual, p.polrelid) AS qual,
             pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) AS with_check
      FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
      WHERE c.relnamespace = 'pgvpn'::regnamespace$$,
    $$SELECT relation::text, policy::text, true, qual, with_check FROM intended_policies$$,
    'every policy in pgvpn is permissive with exactly its intended USING and WITH CHECK');

-- ---------------------------------------------------------------- database
SELECT database_privs_are(current_database(), r.role, r.privs,
                          format('%s on the database: %s', r.role,
                                 coalesce(nullif(array_to_string(r.privs, ', '), ''), 'nothing')))
FROM (VALUES ('public'::name, '{}'::name[]),
             ('pgvpn_agent', '{CONNECT}'), ('pgvpn_reader', '{CONNECT}'),
             ('pgvpn_peer_a', '{CONNECT}'), ('pgvpn_peer_b', '{CONNECT}'),
             ('pgvpn_peermaker', '{}'), ('pgvpn_owner', '{CREATE,CONNECT,TEMPORARY}')
     ) AS r(role, privs);
SELECT set_eq(
    $$SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
             a.privilege_type
      FROM pg_catalog.pg_database d
      CROSS JOIN LATERAL pg_catalog.aclexplode(
          coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
      WHERE d.datname = pg_catalog.current_database() AND a.grantee <> d.datdba$$,
    $$VALUES ('pgvpn_agent', 'CONNECT'), ('pgvpn_reader', 'CONNECT')$$,
    'the database grants CONNECT to pgvpn_agent and pgvpn_reader and nothing else to anyone');
SELECT is_empty(
    $$SELECT r.rolname::text FROM pg_catalog.pg_auth_members m
      JOIN pg_catalog.pg_roles r ON r.oid = m.member
      WHERE m.roleid = 'pgvpn_agent'::regrole
        AND (pg_catalog.has_database_privilege(r.oid, pg_catalog.current_database(), 'TEMPORARY')
             OR pg_catalog.has_database_privilege(r.oid, pg_catalog.current_database(), 'CREATE'))$$,
    'no peer role may create temporary objects or schemas in the database');

-- ----------------------------------------------------------------- schemas
SELECT schema_privs_are(s.schema, r.role,
                        CASE WHEN (s.schema, r.role) IN (('pgvpn', 'pgvpn_agent'),
                                  ('pgvpn', 'pgvpn_reader'), ('pgvpn', 'pgvpn_peer_a'),
                                  ('pgvpn_admin', 'pgvpn_owner'))
                                  OR s.schema = 'public'
                             THEN '{USAGE}'::name[] ELSE '{}'::name[] END,
                        format('%s on schema %s: %s', r.role, s.schema,
                               CASE WHEN (s.schema, r.role) IN (('pgvpn', 'pgvpn_agent'),
                                         ('pgvpn', 'pgvpn_reader'), ('pgvpn', 'pgvpn_peer_a'),
                                         ('pgvpn_admin', 'pgvpn_owner'))
                                         OR s.schema = 'public'
                                    THEN 'USAGE only' ELSE 'nothing' END))
FROM unnest('{pgvpn,pgvpn_admin,public}'::name[]) AS s(schema)
CROSS JOIN unnest('{public,pgvpn_agent,pgvpn_reader,pgvpn_peer_a,pgvpn_owner}'::name[]) AS r(role)
WHERE NOT (s.schema = 'pgvpn' AND r.role = 'pgvpn_owner')
  AND NOT (s.schema = 'public' AND r.role = 'pgvpn_owner');
SELECT is_empty(
    $$SELECT r.rolname || ' may create in schema ' || n.nspname
      FROM pg_catalog.pg_roles r CROSS JOIN pg_catalog.pg_namespace n
      WHERE (r.rolname IN ('pgvpn_agent', 'pgvpn_reader')
             OR pg_catalog.pg_has_role(r.oid, 'pgvpn_agent', 'MEMBER')
             OR pg_catalog.pg_has_role(r.oid, 'pgvpn_reader', 'MEMBER'))
        AND NOT r.rolsuper
        AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast\_temp\_%'
        AND pg_catalog.has_schema_privilege(r.oid, n.oid, 'CREATE')$$,
    'no peer or reader may CREATE in any schema');

SELECT * FROM finish();
ROLLBACK;
