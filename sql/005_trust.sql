-- 005: no function of pgvpn can be turned against the role that owns it.
--
-- The hole this closes: SECURITY DEFINER functions ran with
-- `search_path = pg_catalog, pgvpn`.  PostgreSQL searches the caller's temporary
-- schema first for relations and types unless pg_temp is named explicitly, so a
-- peer could put a view called pg_inherits into pg_temp, call
-- pgvpn.ensure_partitions(), and have its own function run with the owner's
-- rights (e.g. ALTER ROLE ... SUPERUSER when the owner was a superuser).
--
-- The rules from here on, for every function in the schema:
-- * `SET search_path = pg_catalog, pg_temp`: catalog first, the caller's
--   temporary schema last, nothing else; every pgvpn object is schema-qualified,
--   so nothing a caller creates can be found in its place (functions and
--   operators are never looked up in pg_temp; relations and types come from
--   pg_catalog before pg_temp);
-- * pgvpn.current_peer(), which defaults and policies inline and which therefore
--   cannot carry a SET clause, has a SQL-standard body (BEGIN ATOMIC): it is
--   parsed once, here, so a caller's search_path never decides what it calls;
-- * EXECUTE is granted to the roles that need it, never to PUBLIC;
-- * peers get no TEMPORARY on the database: none of them needs a temporary
--   table, and without one there is nothing to shadow anything with.
-- The owner of this schema should not be a superuser either (`pgvpn db init`).

-- The peer of this session, or NULL for the owner, readers and any other role.
-- Reserved names (agent, reader, owner, peermaker) are the group and admin roles.
CREATE OR REPLACE FUNCTION pgvpn.current_peer() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT CASE WHEN pg_catalog.left(session_user::pg_catalog.text, 6) = 'pgvpn_'
                     AND session_user::pg_catalog.text NOT IN (
                         'pgvpn_agent', 'pgvpn_reader', 'pgvpn_owner', 'pgvpn_peermaker')
                THEN pg_catalog.replace(pg_catalog.substr(session_user::pg_catalog.text, 7),
                                        '_', '-')
           END;
END;

CREATE OR REPLACE FUNCTION pgvpn.last_sent_seq() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(max(p.seq), 0) FROM pgvpn.packets p
    WHERE p.sender OPERATOR(pg_catalog.=) pgvpn.current_peer()
$$;

CREATE OR REPLACE FUNCTION pgvpn.partition_ranges()
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               detach_pending boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
    SELECT i.inhrelid::pg_catalog.regclass,
           CASE WHEN b[1] = 'MINVALUE' THEN '-infinity'
                ELSE pg_catalog.btrim(b[1], '''') END::pg_catalog.timestamptz,
           CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity'
                ELSE pg_catalog.btrim(b[2], '''') END::pg_catalog.timestamptz,
           i.inhdetachpending
    FROM pg_catalog.pg_inherits i
    JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL pg_catalog.regexp_match(
        pg_catalog.pg_get_expr(c.relpartbound, c.oid),
        '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS b
    WHERE i.inhparent = 'pgvpn.packets'::pg_catalog.regclass
$$;

CREATE OR REPLACE FUNCTION pgvpn.partition_name(range_from timestamptz, range_to timestamptz)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'packets_' || CASE
        WHEN range_to - range_from = interval '1 day'
             AND (range_from AT TIME ZONE 'UTC')::pg_catalog.time = '00:00'
            THEN pg_catalog.to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD')
        WHEN extract(minute FROM range_from AT TIME ZONE 'UTC') = 0
            THEN pg_catalog.to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24')
        ELSE pg_catalog.to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MI')
    END
$$;

-- As in 003, with two changes: qualified names under a safe search_path, and
-- `days_ahead` (beyond the stored partitions_ahead) only for the owner, so that a
-- peer cannot make hundreds of far-future partitions that every query then opens.
CREATE OR REPLACE FUNCTION pgvpn.ensure_partitions(days_ahead integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- The bounds are written into DDL as text (%L): in the caller's TimeZone and
-- DateStyle they could read back as another instant, and leave a gap.
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
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
    IF days_ahead IS NOT NULL AND NOT pg_catalog.pg_has_role(
            session_user, (SELECT n.nspowner FROM pg_catalog.pg_namespace n
                           WHERE n.nspname = 'pgvpn'), 'MEMBER') THEN
        RAISE EXCEPTION 'only the owner of the pgvpn schema may choose days_ahead'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'call pgvpn.ensure_partitions() without arguments; the owner '
                         'sets how far ahead with pgvpn retention --ahead';
    END IF;
    SELECT * INTO STRICT settings FROM pgvpn.log_settings;
    horizon := pg_catalog.now() + coalesce(
        pg_catalog.make_interval(days => days_ahead), settings.partitions_ahead);
    -- One maker at a time: two agents must not race for the same range.
    PERFORM pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtextextended('pgvpn.ensure_partitions', 0));
    slot := pg_catalog.date_bin(settings.partition_step, pg_catalog.now(), origin);
    WHILE slot < horizon LOOP
        SELECT r.range_to INTO covered_to FROM pgvpn.partition_ranges() r
        WHERE r.range_from <= slot AND slot < r.range_to;
        IF FOUND THEN
            slot := covered_to;
            CONTINUE;
        END IF;
        SELECT pg_catalog.min(r.range_from) INTO next_from FROM pgvpn.partition_ranges() r
        WHERE r.range_from > slot;
        slot_end := least(
            pg_catalog.date_bin(settings.partition_step, slot, origin)
            + settings.partition_step, next_from);
        part := pgvpn.partition_name(slot, slot_end);
        EXECUTE pg_catalog.format(
            'CREATE TABLE pgvpn.%I (LIKE pgvpn.packets INCLUDING DEFAULTS '
            'INCLUDING CONSTRAINTS INCLUDING STORAGE)', part);
        -- The range as a CHECK lets ATTACH skip its validation scan (the table is
        -- empty anyway); the constraint is redundant afterwards and dropped.
        EXECUTE pg_catalog.format('ALTER TABLE pgvpn.%I ADD CONSTRAINT %I CHECK '
                                  '(logged_at >= %L AND logged_at < %L)',
                                  part, part || '_range', slot, slot_end);
        EXECUTE pg_catalog.format('ALTER TABLE pgvpn.packets ATTACH PARTITION pgvpn.%I '
                                  'FOR VALUES FROM (%L) TO (%L)', part, slot, slot_end);
        EXECUTE pg_catalog.format('ALTER TABLE pgvpn.%I DROP CONSTRAINT %I',
                                  part, part || '_range');
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

CREATE OR REPLACE FUNCTION pgvpn.expired_partitions(cutoff timestamptz)
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               keep_reason text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH newest AS (
        SELECT p.name, (SELECT k.logged_at FROM pgvpn.packets k WHERE k.sender = p.name
                        ORDER BY k.seq DESC LIMIT 1) AS logged_at
        FROM pgvpn.peers p
    )
    SELECT r.partition, r.range_from, r.range_to,
           (SELECT 'holds the newest packet of '
                   || pg_catalog.string_agg(n.name, ', ' ORDER BY n.name)
            FROM newest n WHERE n.logged_at >= r.range_from AND n.logged_at < r.range_to)
    FROM pgvpn.partition_ranges() r
    WHERE r.range_to <= cutoff AND r.range_to <= pg_catalog.now()
    ORDER BY r.range_from
$$;

-- As in 003.  The partition is dropped by its qualified name: with pgvpn out of
-- the search_path, regclass's text is always schema-qualified.
CREATE OR REPLACE FUNCTION pgvpn.apply_retention()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
SET lock_timeout = '200ms'
AS $$
DECLARE
    keep interval;
    expired record;
    dropped integer := 0;
BEGIN
    SELECT s.retention INTO keep FROM pgvpn.log_settings s;
    IF keep IS NULL THEN
        RETURN 0;
    END IF;
    -- Both agents run their maintenance at about the same time, and `pgvpn prune`
    -- may be at work: whoever holds the lock does the job, the others skip it.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtextextended('pgvpn.prune', 0))
    THEN
        RETURN 0;
    END IF;
    FOR expired IN SELECT e.partition FROM pgvpn.expired_partitions(pg_catalog.now() - keep) e
                   WHERE e.keep_reason IS NULL LOOP
        FOR attempt IN 1 .. 5 LOOP
            BEGIN
                EXECUTE pg_catalog.format('DROP TABLE IF EXISTS %s', expired.partition);
                dropped := dropped + 1;
                EXIT;
            EXCEPTION WHEN lock_not_available THEN
                PERFORM pg_catalog.pg_sleep(0.05 * attempt);
            END;
        END LOOP;
    END LOOP;
    RETURN dropped;
END
$$;

CREATE OR REPLACE FUNCTION pgvpn.blog_v1_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pgvpn.v1.' || NEW.receiver, NEW.id::pg_catalog.text);
    RETURN NULL;
END
$$;

-- decode_headers (003) names no relation and only built-in types, but it runs in
-- every reader's query through pgvpn.packet_headers: pg_temp last all the same.
ALTER FUNCTION pgvpn.decode_headers(bytea) SET search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------------- EXECUTE
-- Nothing in the schema for PUBLIC; each role gets what its queries call.  Views
-- check EXECUTE as their user: pgvpn.inbox, the sender default and the policies
-- call current_peer(); log_partitions and packet_headers the log tools' helpers.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgvpn FROM PUBLIC;
-- Functions the migrator (the owner) makes later: not PUBLIC's either.  Global, not
-- IN SCHEMA: a per-schema entry can only add to the built-in default, never remove.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.current_peer() TO pgvpn_agent, pgvpn_reader;
GRANT EXECUTE ON FUNCTION pgvpn.last_sent_seq(), pgvpn.ensure_partitions(integer),
    pgvpn.apply_retention() TO pgvpn_agent;
GRANT EXECUTE ON FUNCTION pgvpn.partition_ranges(), pgvpn.decode_headers(bytea)
    TO pgvpn_reader;

-- ----------------------------------------------------------------- readers
-- pgvpn_reader reads everything (its policies on these tables were written in
-- 004 and never reached, for want of the table privilege).
GRANT SELECT ON pgvpn.cursors, pgvpn.blog_v1_packets, pgvpn.blog_v2_packets
    TO pgvpn_reader;

-- ------------------------------------------------------------------- peers
-- Names of pgvpn's own roles are no peer names (004 reserved agent and reader).
-- NOT VALID, as in 004: rows made before are kept as they are.
ALTER TABLE pgvpn.peers DROP CONSTRAINT peers_name_maps_to_a_role;
ALTER TABLE pgvpn.peers ADD CONSTRAINT peers_name_maps_to_a_role
    CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,56}$'
           AND name NOT IN ('agent', 'reader', 'owner', 'peermaker')) NOT VALID;

-- ---------------------------------------------------------- the database
-- No temporary objects for anyone but the owner (and superusers): peers and
-- readers never need one.  CONNECT stays as the database had it (`pgvpn db init`
-- restricts it to pgvpn's roles).  A migrator that does not own the database
-- cannot revoke it: then the migration fails and says who can.
DO $$
BEGIN
    EXECUTE pg_catalog.format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC',
                              pg_catalog.current_database());
    IF pg_catalog.has_database_privilege('pgvpn_agent', pg_catalog.current_database(),
                                         'TEMPORARY') THEN
        RAISE EXCEPTION 'peers still have TEMPORARY on database %',
                        pg_catalog.current_database()
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a superuser runs ''pgvpn db init'' first: it gives the database '
                         'to the owner, who migrates';
    END IF;
END
$$;
