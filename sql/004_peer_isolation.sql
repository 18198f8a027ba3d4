-- 004: per-peer isolation inside the database.
--
-- A peer is its login role: peer `peer-a` connects as `pgvpn_peer-a` with '-'
-- replaced by '_', i.e. `pgvpn_peer_a` (pgvpn.admin.role_name).  Peer names have
-- no '_' (see the CHECK below), so the role maps back to exactly one peer.
--
-- What a peer may do, enforced here and not by the agent:
-- * write packets only as itself: `sender` defaults to the peer of the session and
--   agents may INSERT only the other columns (column privileges apply to COPY's
--   column list too).  Row-level security would do the same, but PostgreSQL
--   refuses COPY FROM into a table with RLS enabled, and COPY is the fast path;
-- * read only packets addressed to it: no SELECT on pgvpn.packets, only on the
--   view pgvpn.inbox, and its own last `seq` through a SECURITY DEFINER function;
-- * see and move only its own cursors and its own peers row (RLS: no COPY there);
-- * no UPDATE, DELETE, TRUNCATE or DDL on anything (never granted).
-- The owner (who runs `pgvpn db migrate`) bypasses all of it, as it should: the log
-- is the operator's.  pgvpn_reader (003) keeps reading everything it was granted.
-- The blog profiles' tables (002) take INSERTs, not COPY, so RLS protects them.

-- The peer this session belongs to, or NULL for any other role.  session_user,
-- not current_user: SET ROLE pgvpn_agent (every peer is a member) or a SECURITY
-- DEFINER function must not change who the caller is, and only a superuser can
-- change session_user.  A plain SQL expression with no SET clause, so that the
-- planner inlines it into the column default and the policies: no function call
-- per row.
CREATE FUNCTION pgvpn.current_peer() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN left(session_user::text, 6) = 'pgvpn_'
                     AND session_user::text NOT IN ('pgvpn_agent', 'pgvpn_reader')
                THEN replace(substr(session_user::text, 7), '_', '-') END
$$;

-- New peer names must map to a role and back: no '_', and 'pgvpn_' plus the name
-- must fit PostgreSQL's 63-byte identifiers.  NOT VALID: rows made before this
-- migration are kept as they are (a peer with a '_' in its name must be renamed).
ALTER TABLE pgvpn.peers ADD CONSTRAINT peers_name_maps_to_a_role
    CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,56}$' AND name NOT IN ('agent', 'reader')) NOT VALID;

-- Every existing peer role gets its peers row now; `pgvpn db add-peer` makes it
-- for new ones.  Agents may no longer register another peer (RLS below), and a
-- cursor (receiver, sender) needs both rows.
INSERT INTO pgvpn.peers (name)
SELECT replace(substr(r.rolname, 7), '_', '-')
FROM pg_roles r
WHERE r.rolcanlogin AND r.rolname ~ '^pgvpn_[a-z0-9][a-z0-9_]{0,56}$'
  AND r.rolname NOT IN ('pgvpn_agent', 'pgvpn_reader')
  AND pg_has_role(r.oid, 'pgvpn_agent', 'MEMBER')
ON CONFLICT DO NOTHING;

-- ---------------------------------------------------------------- the log
ALTER TABLE pgvpn.packets ALTER COLUMN sender SET DEFAULT pgvpn.current_peer();
REVOKE ALL ON pgvpn.packets FROM pgvpn_agent;
GRANT INSERT (seq, receiver, length, data) ON pgvpn.packets TO pgvpn_agent;

-- What a peer reads: packets addressed to it.  security_barrier: the view's own
-- condition is applied before any function of the caller's query, so a leaky
-- function (e.g. one a peer creates in pg_temp) never sees another peer's row.
-- Leakproof operators (=, > on text and integers) still reach the index.
CREATE VIEW pgvpn.inbox WITH (security_barrier = true) AS
SELECT id, logged_at, sender, seq, receiver, length, data
FROM pgvpn.packets
WHERE receiver = pgvpn.current_peer();

GRANT SELECT ON pgvpn.inbox TO pgvpn_agent;

-- The highest `seq` this peer has logged: where its uplink resumes numbering.
CREATE FUNCTION pgvpn.last_sent_seq() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgvpn
AS $$
    SELECT coalesce(max(seq), 0) FROM pgvpn.packets WHERE sender = pgvpn.current_peer()
$$;

REVOKE ALL ON FUNCTION pgvpn.last_sent_seq() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.last_sent_seq() TO pgvpn_agent;

-- ------------------------------------------------------ cursors and peers
ALTER TABLE pgvpn.cursors ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_cursors ON pgvpn.cursors TO pgvpn_agent
    USING (receiver = pgvpn.current_peer()) WITH CHECK (receiver = pgvpn.current_peer());
CREATE POLICY reader_sees_all ON pgvpn.cursors FOR SELECT TO pgvpn_reader USING (true);

ALTER TABLE pgvpn.peers ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_row ON pgvpn.peers TO pgvpn_agent
    USING (name = pgvpn.current_peer()) WITH CHECK (name = pgvpn.current_peer());
CREATE POLICY reader_sees_all ON pgvpn.peers FOR SELECT TO pgvpn_reader USING (true);

-- ------------------------------------------- the blog profiles' tables (002)
-- Per-packet INSERTs, so RLS: a peer sends only as itself, reads what is addressed
-- to it (and what it sent: INSERT ... RETURNING must see the new row), and flags
-- as received only its own inbound rows.
ALTER TABLE pgvpn.blog_v1_packets ENABLE ROW LEVEL SECURITY;
CREATE POLICY send_as_self ON pgvpn.blog_v1_packets FOR INSERT TO pgvpn_agent
    WITH CHECK (sender = pgvpn.current_peer());
CREATE POLICY read_own ON pgvpn.blog_v1_packets FOR SELECT TO pgvpn_agent
    USING (receiver = pgvpn.current_peer() OR sender = pgvpn.current_peer());
CREATE POLICY flag_own ON pgvpn.blog_v1_packets FOR UPDATE TO pgvpn_agent
    USING (receiver = pgvpn.current_peer());
CREATE POLICY reader_sees_all ON pgvpn.blog_v1_packets FOR SELECT TO pgvpn_reader
    USING (true);

ALTER TABLE pgvpn.blog_v2_packets ENABLE ROW LEVEL SECURITY;
CREATE POLICY send_as_self ON pgvpn.blog_v2_packets FOR INSERT TO pgvpn_agent
    WITH CHECK (sender = pgvpn.current_peer());
CREATE POLICY read_own ON pgvpn.blog_v2_packets FOR SELECT TO pgvpn_agent
    USING (receiver = pgvpn.current_peer() OR sender = pgvpn.current_peer());
CREATE POLICY reader_sees_all ON pgvpn.blog_v2_packets FOR SELECT TO pgvpn_reader
    USING (true);
