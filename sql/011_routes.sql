-- 011: the prefixes each peer routes, as WireGuard's AllowedIPs: its own tunnel
-- addresses (each as a host route, with the address itself kept for its interface)
-- and any subnets behind it. The owner manages them (`pgvpn db add-peer --address
-- --route`, `pgvpn db set-routes`); no peer writes here. Every peer and reader may
-- read the whole table: a peer routes by it (longest-prefix match of a packet's
-- destination) and installs its kernel routes from it, so the fleet's prefixes and
-- names are no secret among its peers (SECURITY.md).
--
-- No two routes overlap, whoever's they are (an exclusion constraint, inet_ops: GiST
-- in core, no extension): a destination has at most one peer, so the longest-prefix
-- match never has to break a tie, and no peer can take traffic meant for another by
-- a longer prefix of its own.
CREATE TABLE pgvpn.routes (
    peer     text        NOT NULL REFERENCES pgvpn.peers ON UPDATE CASCADE ON DELETE CASCADE,
    prefix   cidr        NOT NULL,
    -- the peer's tunnel address with its subnet's mask (10.230.0.3/24) when this
    -- route is that address's host route (10.230.0.3/32); NULL for a routed subnet
    address  inet,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (peer, prefix),
    CONSTRAINT routes_address_is_its_host_route CHECK (
        address IS NULL
        OR prefix = pg_catalog.set_masklen(address, CASE pg_catalog.family(address)
                                                    WHEN 4 THEN 32 ELSE 128 END)::cidr),
    CONSTRAINT routes_do_not_overlap EXCLUDE USING gist (prefix inet_ops WITH &&)
);
-- One tunnel address per family and peer: the interface has one of each.
CREATE UNIQUE INDEX routes_one_address_per_family
    ON pgvpn.routes (peer, pg_catalog.family(prefix)) WHERE address IS NOT NULL;

GRANT SELECT ON pgvpn.routes TO pgvpn_agent, pgvpn_reader;

-- Agents LISTEN on pgvpn_routes and reread the table when it changes: a peer added,
-- a route added or removed reaches every running agent without a restart or a poll.
-- ('pgvpn_' with an underscore: no peer's downlink channel, 'pgvpn.NAME', is it.)
-- Not SECURITY DEFINER: it runs as whoever changed the routes, the owner.
CREATE FUNCTION pgvpn.routes_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pgvpn_routes', '');
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgvpn.routes_changed() FROM PUBLIC;
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgvpn.routes
    FOR EACH STATEMENT EXECUTE FUNCTION pgvpn.routes_changed();
