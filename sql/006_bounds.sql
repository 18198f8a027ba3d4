-- 006: bounds on what a peer may log, so that no row can break an agent.
--
-- * `seq` is the sender's own numbering (001): its uplink resumes at
--   pgvpn.last_sent_seq() + 1.  A peer may write `seq` itself, and a row near the
--   bigint maximum left its own agent unable to number the next packet, on every
--   restart.  1 .. 2^62-1 leaves 2^62 of headroom above any logged value, and
--   2^62 packets are some 146 000 years at a million packets a second.  The
--   agent checks the same bound (pgvpn.transports.batched.MAX_SEQ).
-- * `length` (= octet_length(data), 001) is an IP packet's: an IPv4 or IPv6
--   packet has at most 65535 bytes (no jumbograms on a TUN device), so a row is
--   never larger than the largest MTU an agent accepts.
-- * The blog profiles' tables (002) carry packets too: the same size bound.
--
-- NOT VALID: PostgreSQL 15 accepts it for a CHECK on a partitioned table.  Adding
-- the constraints then scans nothing (the log may hold billions of rows) and
-- holds its lock for a moment; every row written from now on is checked, in
-- today's partitions and in those created later (which get the constraint as
-- validated).  Rows logged before this migration stay as they were: the agents
-- cope with them (the downlink never fetches a row larger than its MTU; the
-- uplink refuses to run past the bound and says so).  An operator may check the
-- old rows later without blocking traffic (SHARE UPDATE EXCLUSIVE):
--   ALTER TABLE pgvpn.packets VALIDATE CONSTRAINT packets_seq_in_range;
--   ALTER TABLE pgvpn.packets VALIDATE CONSTRAINT packets_length_of_a_packet;
--
-- Operators are schema-qualified as in 005: an expression is bound when the
-- constraint is made, and nothing on the migrator's search_path may stand in.

ALTER TABLE pgvpn.packets ADD CONSTRAINT packets_seq_in_range
    CHECK (seq OPERATOR(pg_catalog.>=) 1
           AND seq OPERATOR(pg_catalog.<=) 4611686018427387903) NOT VALID;

ALTER TABLE pgvpn.packets ADD CONSTRAINT packets_length_of_a_packet
    CHECK (length OPERATOR(pg_catalog.>=) 1
           AND length OPERATOR(pg_catalog.<=) 65535) NOT VALID;

ALTER TABLE pgvpn.blog_v1_packets ADD CONSTRAINT blog_v1_packets_payload_of_a_packet
    CHECK (pg_catalog.octet_length(payload) OPERATOR(pg_catalog.>=) 1
           AND pg_catalog.octet_length(payload) OPERATOR(pg_catalog.<=) 65535) NOT VALID;

ALTER TABLE pgvpn.blog_v2_packets ADD CONSTRAINT blog_v2_packets_payload_of_a_packet
    CHECK (pg_catalog.octet_length(payload) OPERATOR(pg_catalog.>=) 1
           AND pg_catalog.octet_length(payload) OPERATOR(pg_catalog.<=) 65535) NOT VALID;
