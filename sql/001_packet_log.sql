-- 001: the packet log, the peers and the per-receiver cursors.
--
-- Ordering: every sender has exactly one writer (the agent holds an advisory
-- lock on its name), which numbers its packets with its own gap-free `seq`
-- and commits batches one after another.  A receiver's cursor is therefore a
-- (receiver, sender, last_seq) triple: rows of one sender become visible in
-- seq order, so `seq > last_seq` can never pass over a row that commits later.
-- The global `id` is for humans and tools; nothing relies on its order.

CREATE SCHEMA IF NOT EXISTS pgvpn;

-- Which migrations are in place; `pgvpn db migrate` adds one row per file.
CREATE TABLE pgvpn.schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgvpn.peers (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    tunnel_addr inet,
    last_seen   timestamptz
);

CREATE SEQUENCE pgvpn.packets_id_seq AS bigint;

-- One row per packet exactly as read from the TUN device.  Range-partitioned
-- by the time it was logged so that retention drops whole partitions.
CREATE TABLE pgvpn.packets (
    id        bigint      NOT NULL DEFAULT nextval('pgvpn.packets_id_seq'),
    logged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    sender    text        NOT NULL,
    seq       bigint      NOT NULL,
    receiver  text        NOT NULL,
    length    integer     NOT NULL CHECK (length = octet_length(data)),
    data      bytea       NOT NULL
) PARTITION BY RANGE (logged_at);

ALTER SEQUENCE pgvpn.packets_id_seq OWNED BY pgvpn.packets.id;
-- Packets are already dense or encrypted: do not try to compress them.
ALTER TABLE pgvpn.packets ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE INDEX packets_delivery_idx ON pgvpn.packets (receiver, sender, seq);
CREATE INDEX packets_sender_seq_idx ON pgvpn.packets (sender, seq);
CREATE INDEX packets_logged_at_idx ON pgvpn.packets USING brin (logged_at);

CREATE TABLE pgvpn.cursors (
    receiver   text        NOT NULL REFERENCES pgvpn.peers ON DELETE CASCADE,
    sender     text        NOT NULL REFERENCES pgvpn.peers ON DELETE CASCADE,
    last_seq   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (receiver, sender)
);

-- Daily partitions, created ahead of time so inserts never meet a boundary.
-- SECURITY DEFINER: agents may call it without any DDL right of their own.
CREATE FUNCTION pgvpn.ensure_partitions(days_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgvpn
AS $$
DECLARE
    day date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. days_ahead LOOP
        day := (now() AT TIME ZONE 'UTC')::date + i;
        part := format('packets_%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(format('pgvpn.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE pgvpn.%I PARTITION OF pgvpn.packets FOR VALUES FROM (%L) TO (%L)',
                part, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

SELECT pgvpn.ensure_partitions();

-- The least-privileged group role that every agent's login role is a member of.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_agent') THEN
        CREATE ROLE pgvpn_agent NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA pgvpn TO pgvpn_agent;
GRANT SELECT ON pgvpn.schema_migrations TO pgvpn_agent;
GRANT INSERT, SELECT ON pgvpn.packets TO pgvpn_agent;
GRANT USAGE ON SEQUENCE pgvpn.packets_id_seq TO pgvpn_agent;
GRANT SELECT, INSERT, UPDATE ON pgvpn.peers TO pgvpn_agent;
GRANT SELECT, INSERT, UPDATE ON pgvpn.cursors TO pgvpn_agent;
REVOKE ALL ON FUNCTION pgvpn.ensure_partitions(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.ensure_partitions(integer) TO pgvpn_agent;
