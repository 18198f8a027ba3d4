-- 003: the packet log as a product: partition settings, retention, and a view
-- that decodes packet headers at query time (nothing is added at insert time).
--
-- Retention drops whole partitions, never DELETEs rows.  Two ways in:
-- * `pgvpn prune` (the owner, from a client): DETACH PARTITION ... CONCURRENTLY,
--   then DROP TABLE, so traffic is never blocked (that cannot run in a function);
-- * pgvpn.apply_retention() (every agent, hourly, with the owner's policy from
--   pgvpn.log_settings): a DROP TABLE under a short lock_timeout, so a busy
--   table costs the tunnel at most a few 100 ms pauses, and the drop is simply
--   tried again at the next maintenance.

-- One row: the owner's policy for the log.  Agents read it, only the owner sets it.
CREATE TABLE pgvpn.log_settings (
    singleton        boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    -- How much time one partition covers: '1 day' (the default) or finer, e.g.
    -- '1 hour' for short retention; fixed lengths only (date_bin has no months).
    partition_step   interval NOT NULL DEFAULT '1 day'
        CHECK (partition_step >= '1 minute' AND partition_step <= '31 days'
               AND extract(month FROM partition_step) = 0
               AND extract(year FROM partition_step) = 0
               -- a divisor of a day or whole days, so partitions line up with days
               AND (86400 % extract(epoch FROM partition_step)::bigint = 0
                    OR extract(epoch FROM partition_step)::bigint % 86400 = 0)),
    -- How far ahead partitions exist.  Agents top them up hourly, so this must
    -- comfortably exceed an hour or inserts could meet a missing partition.
    partitions_ahead interval NOT NULL DEFAULT '3 days'
        CHECK (partitions_ahead >= '2 hours'),
    -- Keep this much of the log; NULL keeps everything.
    retention        interval
        CHECK (retention IS NULL OR retention >= '1 minute'),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (partitions_ahead >= partition_step)
);
INSERT INTO pgvpn.log_settings DEFAULT VALUES;

-- The partitions of pgvpn.packets with their time range, parsed from the catalog.
-- TimeZone and DateStyle are fixed so that pg_get_expr's literals read back exactly.
CREATE FUNCTION pgvpn.partition_ranges()
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               detach_pending boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
    SELECT i.inhrelid::regclass,
           CASE WHEN b[1] = 'MINVALUE' THEN '-infinity'
                ELSE trim(both '''' FROM b[1]) END::timestamptz,
           CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity'
                ELSE trim(both '''' FROM b[2]) END::timestamptz,
           i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS b
    WHERE i.inhparent = 'pgvpn.packets'::regclass
$$;

-- What `lab status`, `pgvpn prune` and psql users see of the partitions.
CREATE VIEW pgvpn.log_partitions AS
SELECT r.partition, r.range_from, r.range_to, r.detach_pending,
       nullif(c.reltuples, -1)::bigint AS estimated_rows,
       pg_total_relation_size(r.partition) AS bytes
FROM pgvpn.partition_ranges() r
JOIN pg_class c ON c.oid = r.partition
ORDER BY r.range_from;

-- The name of a partition: packets_YYYYMMDD for a whole UTC day, else with the hour
-- (and minutes when they are not zero).
CREATE FUNCTION pgvpn.partition_name(range_from timestamptz, range_to timestamptz)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog
AS $$
    SELECT 'packets_' || CASE
        WHEN range_to - range_from = interval '1 day'
             AND (range_from AT TIME ZONE 'UTC')::time = '00:00'
            THEN to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD')
        WHEN extract(minute FROM range_from AT TIME ZONE 'UTC') = 0
            THEN to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24')
        ELSE to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MI')
    END
$$;

-- Partitions from the one holding now() to now() + partitions_ahead, in steps of
-- partition_step aligned to UTC midnight.  Ranges that existing partitions already
-- cover (e.g. daily ones made before the step became hourly) are left alone and
-- only the gaps are filled, so changing the step never meets an overlap.
--
-- Each partition is made as a plain table and then ATTACHed: ATTACH takes only a
-- SHARE UPDATE EXCLUSIVE lock on pgvpn.packets, which does not block the agents'
-- inserts and reads, where CREATE TABLE ... PARTITION OF takes ACCESS EXCLUSIVE.
--
-- The signature is 001's, so agents call it as before; `days_ahead`, when given,
-- overrides partitions_ahead.
CREATE OR REPLACE FUNCTION pgvpn.ensure_partitions(days_ahead integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgvpn
AS $$
DECLARE
    settings pgvpn.log_settings;
    origin constant timestamptz := '2000-01-01 00:00:00+00';
    horizon timestamptz;
    slot timestamptz;
    slot_end timestamptz;
    covered_to timestamptz;
    next_from timestamptz;
    part text;
    created integer := 0;
BEGIN
    SELECT * INTO STRICT settings FROM pgvpn.log_settings;
    horizon := now() + coalesce(make_interval(days => days_ahead), settings.partitions_ahead);
    -- One maker at a time: two agents must not race for the same range.
    PERFORM pg_advisory_xact_lock(hashtextextended('pgvpn.ensure_partitions', 0));
    slot := date_bin(settings.partition_step, now(), origin);
    WHILE slot < horizon LOOP
        SELECT r.range_to INTO covered_to FROM pgvpn.partition_ranges() r
        WHERE r.range_from <= slot AND slot < r.range_to;
        IF FOUND THEN
            slot := covered_to;
            CONTINUE;
        END IF;
        SELECT min(r.range_from) INTO next_from FROM pgvpn.partition_ranges() r
        WHERE r.range_from > slot;
        slot_end := least(date_bin(settings.partition_step, slot, origin)
                          + settings.partition_step, next_from);
        part := pgvpn.partition_name(slot, slot_end);
        EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.packets INCLUDING DEFAULTS '
                       'INCLUDING CONSTRAINTS INCLUDING STORAGE)', part);
        -- The range as a CHECK lets ATTACH skip its validation scan (the table is
        -- empty anyway); the constraint is redundant afterwards and dropped.
        EXECUTE format('ALTER TABLE pgvpn.%I ADD CONSTRAINT %I CHECK '
                       '(logged_at >= %L AND logged_at < %L)',
                       part, part || '_range', slot, slot_end);
        EXECUTE format('ALTER TABLE pgvpn.packets ATTACH PARTITION pgvpn.%I '
                       'FOR VALUES FROM (%L) TO (%L)', part, slot, slot_end);
        EXECUTE format('ALTER TABLE pgvpn.%I DROP CONSTRAINT %I', part, part || '_range');
        created := created + 1;
        IF created > 1000 THEN
            RAISE EXCEPTION 'more than 1000 partitions to create: partitions_ahead is too '
                            'long for partition_step';
        END IF;
        slot := slot_end;
    END LOOP;
    RETURN created;
END
$$;

-- Partitions that lie wholly before `cutoff`, oldest first, each with a reason to
-- keep it or NULL when it may be dropped.  A partition that holds a registered
-- peer's newest packet is kept: an agent numbers its packets from the highest
-- `seq` still in the log, so dropping it would restart the numbering below the
-- receiver's cursor, which would then ignore that peer's packets.
CREATE FUNCTION pgvpn.expired_partitions(cutoff timestamptz)
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               keep_reason text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn
AS $$
    WITH newest AS (
        SELECT p.name, (SELECT k.logged_at FROM pgvpn.packets k WHERE k.sender = p.name
                        ORDER BY k.seq DESC LIMIT 1) AS logged_at
        FROM pgvpn.peers p
    )
    SELECT r.partition, r.range_from, r.range_to,
           (SELECT 'holds the newest packet of ' || string_agg(n.name, ', ' ORDER BY n.name)
            FROM newest n WHERE n.logged_at >= r.range_from AND n.logged_at < r.range_to)
    FROM pgvpn.partition_ranges() r
    WHERE r.range_to <= cutoff AND r.range_to <= now()
    ORDER BY r.range_from
$$;

-- The owner's retention policy, applied by whoever calls it (every agent, hourly).
-- Returns how many partitions were dropped.  Each DROP needs a moment of ACCESS
-- EXCLUSIVE on pgvpn.packets: it waits at most 200 ms for it, a few times, so
-- the tunnel never stalls behind a long query; what it could not drop now is
-- dropped next time (or by `pgvpn prune`, which needs no such lock).
CREATE FUNCTION pgvpn.apply_retention()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgvpn
SET lock_timeout = '200ms'
AS $$
DECLARE
    keep interval;
    expired record;
    dropped integer := 0;
BEGIN
    SELECT retention INTO keep FROM pgvpn.log_settings;
    IF keep IS NULL THEN
        RETURN 0;
    END IF;
    -- Both agents run their maintenance at about the same time, and `pgvpn prune`
    -- may be at work: whoever holds the lock does the job, the others skip it.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pgvpn.prune', 0)) THEN
        RETURN 0;
    END IF;
    FOR expired IN SELECT * FROM pgvpn.expired_partitions(now() - keep)
                   WHERE keep_reason IS NULL LOOP
        FOR attempt IN 1 .. 5 LOOP
            BEGIN
                EXECUTE format('DROP TABLE IF EXISTS %s', expired.partition);
                dropped := dropped + 1;
                EXIT;
            EXCEPTION WHEN lock_not_available THEN
                PERFORM pg_sleep(0.05 * attempt);
            END;
        END LOOP;
    END LOOP;
    RETURN dropped;
END
$$;

-- Header fields of one IP packet (give it the first bytes; 256 cover any usual
-- header chain).  Ports only for the first fragment of TCP, UDP, UDP-Lite, SCTP.
-- IPv6 extension headers (hop-by-hop, routing, fragment, destination options,
-- AH) are walked to reach the transport header.
CREATE FUNCTION pgvpn.decode_headers(
    head bytea,
    OUT ip_version smallint, OUT src inet, OUT dst inet, OUT ttl smallint,
    OUT protocol text, OUT protocol_number smallint,
    OUT src_port integer, OUT dst_port integer, OUT tcp_flags text[],
    OUT icmp_type smallint, OUT icmp_code smallint)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog
AS $$
DECLARE
    n integer := length(head);
    off integer;
    next_header integer;
    first_fragment boolean := true;
    hops integer := 0;
    flags integer;
BEGIN
    IF n < 1 THEN
        RETURN;
    END IF;
    ip_version := get_byte(head, 0) >> 4;
    IF ip_version = 4 AND n >= 20 THEN
        off := (get_byte(head, 0) & 15) * 4;
        ttl := get_byte(head, 8);
        next_header := get_byte(head, 9);
        src := (get_byte(head, 12) || '.' || get_byte(head, 13) || '.' ||
                get_byte(head, 14) || '.' || get_byte(head, 15))::inet;
        dst := (get_byte(head, 16) || '.' || get_byte(head, 17) || '.' ||
                get_byte(head, 18) || '.' || get_byte(head, 19))::inet;
        first_fragment := ((get_byte(head, 6) & 31) << 8 | get_byte(head, 7)) = 0;
    ELSIF ip_version = 6 AND n >= 40 THEN
        off := 40;
        ttl := get_byte(head, 7);
        next_header := get_byte(head, 6);
        src := regexp_replace(encode(substring(head FROM 9 FOR 16), 'hex'),
                              '(....)(?!$)', '\1:', 'g')::inet;
        dst := regexp_replace(encode(substring(head FROM 25 FOR 16), 'hex'),
                              '(....)(?!$)', '\1:', 'g')::inet;
        WHILE next_header IN (0, 43, 44, 51, 60) AND off + 8 <= n AND hops < 8 LOOP
            hops := hops + 1;
            IF next_header = 44 THEN
                first_fragment := ((get_byte(head, off + 2) << 8 | get_byte(head, off + 3))
                                   >> 3) = 0;
                next_header := get_byte(head, off);
                off := off + 8;
            ELSIF next_header = 51 THEN
                next_header := get_byte(head, off);
                off := off + (get_byte(head, off + 1) + 2) * 4;
            ELSE
                next_header := get_byte(head, off);
                off := off + (get_byte(head, off + 1) + 1) * 8;
            END IF;
        END LOOP;
    ELSE
        RETURN;
    END IF;
    protocol_number := next_header;
    protocol := CASE next_header
        WHEN 1 THEN 'icmp' WHEN 2 THEN 'igmp' WHEN 6 THEN 'tcp' WHEN 17 THEN 'udp'
        WHEN 41 THEN 'ipv6' WHEN 47 THEN 'gre' WHEN 50 THEN 'esp' WHEN 51 THEN 'ah'
        WHEN 58 THEN 'icmpv6' WHEN 132 THEN 'sctp' WHEN 136 THEN 'udplite'
        ELSE next_header::text END;
    IF NOT first_fragment THEN
        RETURN;
    END IF;
    IF next_header IN (6, 17, 132, 136) AND off + 4 <= n THEN
        src_port := get_byte(head, off) << 8 | get_byte(head, off + 1);
        dst_port := get_byte(head, off + 2) << 8 | get_byte(head, off + 3);
    END IF;
    IF next_header = 6 AND off + 14 <= n THEN
        flags := get_byte(head, off + 13);
        tcp_flags := array_remove(ARRAY[
            CASE WHEN flags & 2 > 0 THEN 'SYN' END, CASE WHEN flags & 16 > 0 THEN 'ACK' END,
            CASE WHEN flags & 8 > 0 THEN 'PSH' END, CASE WHEN flags & 1 > 0 THEN 'FIN' END,
            CASE WHEN flags & 4 > 0 THEN 'RST' END, CASE WHEN flags & 32 > 0 THEN 'URG' END,
            CASE WHEN flags & 64 > 0 THEN 'ECE' END, CASE WHEN flags & 128 > 0 THEN 'CWR' END
        ], NULL);
    END IF;
    IF next_header IN (1, 58) AND off + 2 <= n THEN
        icmp_type := get_byte(head, off);
        icmp_code := get_byte(head, off + 1);
    END IF;
END
$$;

-- The log with its headers decoded, for psql users and `pgvpn log/stats/export`.
-- security_invoker: it shows exactly what the caller may read of pgvpn.packets.
-- Only the first 256 bytes are decoded; with STORAGE EXTERNAL a large packet is
-- fetched only that far.
CREATE VIEW pgvpn.packet_headers WITH (security_invoker = true) AS
SELECT p.id, p.logged_at, p.sender, p.receiver, p.seq, p.length,
       h.ip_version, h.src, h.dst, h.protocol, h.src_port, h.dst_port, h.tcp_flags,
       h.icmp_type, h.icmp_code, h.ttl, h.protocol_number, p.data
FROM pgvpn.packets p
CROSS JOIN LATERAL pgvpn.decode_headers(substring(p.data FROM 1 FOR 256)) h;

-- A read-only group role for people and tools that look at the log.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_reader') THEN
        CREATE ROLE pgvpn_reader NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA pgvpn TO pgvpn_reader;
GRANT SELECT ON pgvpn.packets, pgvpn.packet_headers, pgvpn.peers, pgvpn.log_settings,
    pgvpn.log_partitions, pgvpn.schema_migrations TO pgvpn_reader;
GRANT SELECT ON pgvpn.log_settings TO pgvpn_agent;
REVOKE ALL ON FUNCTION pgvpn.apply_retention() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.apply_retention() TO pgvpn_agent;
