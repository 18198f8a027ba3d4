-- 002: the tables of the blog's designs, reproduced as transport profiles
-- (services/pgvpn/transports/blog_v1.py, blog_v2.py) so that the lab can measure
-- them beside pgvpn's own.  One row per packet, as in the posts.

-- blog-v1: the first post; an AFTER INSERT trigger wakes the receiver per row,
-- which reads unreceived rows and sets `received` packet by packet.  Delivery
-- rests on that flag, not on a cursor, so a row that commits late is picked up
-- by a later read rather than skipped.  The partial index is ours (the post had
-- none): without it every read scans the whole log, which would measure the
-- table's size instead of the design.
CREATE TABLE pgvpn.blog_v1_packets (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sent_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    sender   text        NOT NULL,
    receiver text        NOT NULL,
    payload  bytea       NOT NULL,
    received boolean     NOT NULL DEFAULT false
);
ALTER TABLE pgvpn.blog_v1_packets ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX blog_v1_unreceived_idx ON pgvpn.blog_v1_packets (receiver, sender, id)
    WHERE NOT received;

-- The channel name is the one BlogV1Downlink listens on: pgvpn.v1.<receiver>.
CREATE FUNCTION pgvpn.blog_v1_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM pg_notify('pgvpn.v1.' || NEW.receiver, NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER blog_v1_notify AFTER INSERT ON pgvpn.blog_v1_packets
    FOR EACH ROW EXECUTE FUNCTION pgvpn.blog_v1_notify();

-- blog-v2: the follow-up; no trigger: the sender NOTIFYs the row's id after its
-- INSERT, and the receiver reads that one row by id.  Its reader never flagged
-- rows, so this table has no `received` column.
CREATE TABLE pgvpn.blog_v2_packets (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sent_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    sender   text        NOT NULL,
    receiver text        NOT NULL,
    payload  bytea       NOT NULL
);
ALTER TABLE pgvpn.blog_v2_packets ALTER COLUMN payload SET STORAGE EXTERNAL;

-- Agents insert rows and read them; blog-v1's reader may also flip `received`.
-- No DELETE, no TRUNCATE, no UPDATE of a packet.  Identity columns need no
-- sequence grant.
REVOKE ALL ON FUNCTION pgvpn.blog_v1_notify() FROM PUBLIC;
GRANT INSERT, SELECT ON pgvpn.blog_v1_packets, pgvpn.blog_v2_packets TO pgvpn_agent;
GRANT UPDATE (received) ON pgvpn.blog_v1_packets TO pgvpn_agent;
