-- 008: no peer can take a lock that stops other peers' traffic.
--
-- A lock taken in a transaction is held until that transaction ends, and a peer
-- may keep its transaction open for as long as it likes.  Two ways let a hostile
-- peer hold a lock that every agent's COPY or read waits for, and so stop the
-- whole tunnel:
--
-- 1. pgvpn.apply_retention().  Every agent applied the owner's retention policy in
--    its hourly maintenance through this SECURITY DEFINER function; once a
--    partition had expired, its DROP took ACCESS EXCLUSIVE on pgvpn.packets.
--    Whatever an agent may call, a hostile peer may call too, so no peer keeps
--    the means: the function goes, and the policy in pgvpn.log_settings is applied
--    by `pgvpn prune` as the owner (on a schedule; without --older-than it uses
--    the policy), which detaches CONCURRENTLY and blocks no COPY or read.
--
-- 2. LOCK TABLE.  PostgreSQL lets a role with table-level UPDATE take any lock
--    mode on the table, ACCESS EXCLUSIVE included.  Peers had UPDATE on
--    pgvpn.cursors (every downlink moves its cursor in the statement that reads
--    a batch) and on pgvpn.peers.  They keep exactly the columns they update,
--    as column privileges, which allow no LOCK TABLE beyond what INSERT and
--    SELECT allow (ROW EXCLUSIVE, ACCESS SHARE: the modes the agents' own
--    statements take anyway).  Row-level security still limits them to their
--    own rows.
--
-- What a peer can still call or lock holds nothing a COPY or read waits for:
-- ensure_partitions() attaches (SHARE UPDATE EXCLUSIVE on pgvpn.packets), and
-- lock_own() and last_sent_seq() take no table lock beyond ACCESS SHARE.
DROP FUNCTION pgvpn.apply_retention();

REVOKE UPDATE ON pgvpn.cursors, pgvpn.peers FROM pgvpn_agent;
GRANT UPDATE (last_seq, updated_at) ON pgvpn.cursors TO pgvpn_agent;
GRANT UPDATE (tunnel_addr, last_seen) ON pgvpn.peers TO pgvpn_agent;
