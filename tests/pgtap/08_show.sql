-- What `pgvpn show` reads (sql/010_show.sql): each agent reports its own tunnel in
-- its peers row. A peer writes its own report only, never a negative count, and no
-- other column than the agent's; a reader sees every report.
\ir begin.inc
SELECT plan(9);

SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_query('own report',
    $$WITH r AS (UPDATE pgvpn.peers SET sent_packets = 7, sent_bytes = 588,
                 received_packets = 3, received_bytes = 252, agent_started = now(),
                 tunnel_addr6 = 'fd00:230::1' RETURNING 1)
      SELECT pg_catalog.count(*) FROM r$$);
SELECT pg_temp.try_query('another peer''s report',
    $$WITH r AS (UPDATE pgvpn.peers SET sent_packets = 0 WHERE name = 'peer-b' RETURNING 1)
      SELECT pg_catalog.count(*) FROM r$$);
SELECT pg_temp.try_command('a negative count',
    $$UPDATE pgvpn.peers SET received_bytes = -1$$);
SELECT pg_temp.try_command('its name',
    $$UPDATE pgvpn.peers SET name = 'peer-z'$$);
SELECT pg_temp.try_query('reports visible',
    $$SELECT pg_catalog.string_agg(p.name, ',') FROM pgvpn.peers p$$);
RESET SESSION AUTHORIZATION;

SELECT is(pg_temp.result('own report'), '1', 'a peer writes its own report');
SELECT results_eq(
    $$SELECT sent_packets, sent_bytes, received_packets, received_bytes, tunnel_addr6
      FROM pgvpn.peers WHERE name = 'peer-a'$$,
    $$VALUES (7::bigint, 588::bigint, 3::bigint, 252::bigint, 'fd00:230::1'::inet)$$,
    'its report is what it wrote');
SELECT is(pg_temp.result('another peer''s report'), '0',
          'a peer cannot touch another peer''s report (RLS: no row)');
SELECT is(pg_temp.outcome('a negative count'), '23514', 'a negative count is refused (CHECK)');
SELECT is(pg_temp.outcome('its name'), '42501', 'a peer cannot rename its row');
SELECT is(pg_temp.result('reports visible'), 'peer-a', 'a peer sees only its own report');

SET SESSION AUTHORIZATION pgvpn_reader;
SELECT pg_temp.try_query('reader sees',
    $$SELECT pg_catalog.string_agg(p.name, ',' ORDER BY p.name) FROM pgvpn.peers p
      WHERE p.name IN ('peer-a', 'peer-b')$$);
SELECT pg_temp.try_command('reader writes',
    $$UPDATE pgvpn.peers SET sent_packets = 0$$);
RESET SESSION AUTHORIZATION;
SELECT is(pg_temp.result('reader sees'), 'peer-a,peer-b', 'a reader sees every report');
SELECT is(pg_temp.outcome('reader writes'), '42501', 'a reader writes no report');
SELECT col_has_check('pgvpn', 'peers', 'sent_packets', 'sent_packets has its CHECK');

SELECT * FROM finish();
ROLLBACK;
