-- The routing table (sql/011_routes.sql): no two routes overlap, whoever's they are;
-- an address row is its own host route; one address per family and peer; every
-- peer and reader reads all routes, nobody but the owner writes any; a change
-- notifies the agents (channel pgvpn_routes).
\ir begin.inc
SELECT plan(15);

INSERT INTO pgvpn.peers (name) VALUES ('tap-c'), ('tap-d') ON CONFLICT DO NOTHING;
DELETE FROM pgvpn.routes WHERE peer IN ('tap-c', 'tap-d');
INSERT INTO pgvpn.routes (peer, prefix, address) VALUES
    ('tap-c', '10.99.0.3/32', '10.99.0.3/24'),
    ('tap-c', '192.168.250.0/24', NULL),
    ('tap-c', 'fd00:99::3/128', 'fd00:99::3/64');

SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-d', '192.168.0.0/16')$$,
                 '23P01', NULL, 'a shorter prefix over another peer''s route is refused');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-d', '192.168.250.128/25')$$,
                 '23P01', NULL, 'a longer prefix inside another peer''s route is refused');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix, address)
                   VALUES ('tap-d', '10.99.0.3/32', '10.99.0.3/24')$$,
                 '23P01', NULL, 'another peer''s address is refused');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-d', '0.0.0.0/0')$$,
                 '23P01', NULL, 'a default route over the others is refused');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-c', '192.168.250.7/32')$$,
                 '23P01', NULL, 'a peer''s own routes do not overlap either');
SELECT lives_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-d', '192.168.251.0/24')$$,
                'a disjoint route of another peer is taken');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix, address)
                   VALUES ('tap-d', '10.99.0.4/32', '10.99.0.5/24')$$,
                 '23514', NULL, 'an address row must be its own host route');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix, address)
                   VALUES ('tap-c', '10.99.0.9/32', '10.99.0.9/24')$$,
                 '23505', NULL, 'one IPv4 address per peer');
SELECT throws_ok($$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('tap-x', '10.98.0.0/24')$$,
                 '23503', NULL, 'a route of no peer is refused');

-- Who reads and writes.
SET SESSION AUTHORIZATION pgvpn_peer_a;
SELECT pg_temp.try_query('peer reads all',
    $$SELECT pg_catalog.count(*) FROM pgvpn.routes WHERE peer IN ('tap-c', 'tap-d')$$);
SELECT pg_temp.try_command('peer adds a route',
    $$INSERT INTO pgvpn.routes (peer, prefix) VALUES ('peer-a', '10.97.0.0/24')$$);
SELECT pg_temp.try_command('peer moves a route',
    $$UPDATE pgvpn.routes SET peer = 'peer-a' WHERE peer = 'tap-c'$$);
SELECT pg_temp.try_command('peer removes a route',
    $$DELETE FROM pgvpn.routes WHERE peer = 'tap-c'$$);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pgvpn_reader;
SELECT pg_temp.try_query('reader reads all',
    $$SELECT pg_catalog.count(*) FROM pgvpn.routes WHERE peer IN ('tap-c', 'tap-d')$$);
RESET SESSION AUTHORIZATION;

SELECT is(pg_temp.result('peer reads all'), '4', 'a peer reads every peer''s routes');
SELECT is(pg_temp.outcome('peer adds a route'), '42501', 'a peer adds no route');
SELECT is(pg_temp.outcome('peer moves a route'), '42501',
          'a peer cannot take another peer''s route');
SELECT is(pg_temp.outcome('peer removes a route'), '42501', 'a peer removes no route');
SELECT is(pg_temp.result('reader reads all'), '4', 'a reader reads every route');

-- A change notifies: the trigger's own queue entry is visible to pg_notification_queue_usage
-- only after commit, so the trigger is checked to fire for every kind of statement.
SELECT trigger_is('pgvpn', 'routes', 'routes_changed', 'pgvpn', 'routes_changed',
                  'a change of the routes runs routes_changed() (NOTIFY pgvpn_routes)');

SELECT * FROM finish();
ROLLBACK;
