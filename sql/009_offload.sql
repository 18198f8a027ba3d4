-- 009: rows that hold TCP super-packets (TUN offload).
--
-- An agent whose TUN device runs with IFF_VNET_HDR and TSO (pgvpn.tun,
-- PGVPN_OFFLOAD) reads up to 64 KB of a TCP stream as one packet, preceded by the
-- kernel's struct virtio_net_hdr (10 bytes: flags, gso_type, hdr_len, gso_size,
-- csum_start, csum_offset, little-endian).  The row keeps that header verbatim in
-- `offload`, so that the packets which would have crossed a wire can be rebuilt
-- exactly (pgvpn.offload.wire_packets: segments at gso_size, with their lengths,
-- IPv4 ids and checksums) and the receiver can hand the super-packet back to its
-- own kernel as it came.  NULL: a packet the kernel marked nothing on, one packet
-- on the wire with its checksums complete (every row written before this
-- migration, and every row of an agent without offload).
--
-- With a header, `data` may carry a partial checksum (flags NEEDS_CSUM: the
-- pseudo-header's sum, as on an offloading NIC before it transmits), and `length`
-- may exceed the receiver's MTU: `pgvpn.wire_packets(length, data, offload)` says how
-- many packets the row stands for on the wire.
--
-- A peer may write any 10 bytes here, as it may write any packet: the receiving
-- agent checks the header against its packet and its MTU before its kernel sees
-- it (pgvpn.offload.header_problem), and skips and counts a row that fails.
ALTER TABLE pgvpn.packets ADD COLUMN offload bytea;
ALTER TABLE pgvpn.packets ADD CONSTRAINT packets_offload_is_a_virtio_net_hdr
    CHECK (offload IS NULL OR pg_catalog.octet_length(offload) OPERATOR(pg_catalog.=) 10)
    NOT VALID;
GRANT INSERT (offload) ON pgvpn.packets TO pgvpn_agent;

-- Packets on the wire for one row of `length` bytes whose packet starts with
-- `head` (its first bytes, enough to reach the TCP header: the log tools pass 256,
-- so that a large row is not read whole): 1 without a segmentation header, else
-- the TCP payload divided into gso_size pieces.  Never fails on a row that is not
-- a valid super-packet (a hostile peer may write one): such a row counts as 1.
CREATE FUNCTION pgvpn.wire_packets(length integer, head bytea, offload bytea)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT CASE
        WHEN offload IS NULL OR head IS NULL OR octet_length(offload) <> 10 THEN 1
        WHEN (get_byte(offload, 1) & 127) NOT IN (1, 4) THEN 1  -- GSO TCPV4 or TCPV6
        WHEN get_byte(offload, 4) + 256 * get_byte(offload, 5) = 0 THEN 1
        WHEN get_byte(offload, 6) + 256 * get_byte(offload, 7) + 12 >= octet_length(head)
            THEN 1
        ELSE greatest(1, ceil(
            (length - get_byte(offload, 6) - 256 * get_byte(offload, 7)
             - (get_byte(head, get_byte(offload, 6) + 256 * get_byte(offload, 7) + 12) >> 4)
               * 4)::numeric
            / (get_byte(offload, 4) + 256 * get_byte(offload, 5))))::integer
    END;
END;
REVOKE ALL ON FUNCTION pgvpn.wire_packets(integer, bytea, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.wire_packets(integer, bytea, bytea) TO pgvpn_reader;

-- The receiver reads the header with its packet (columns are appended: a view
-- may only grow at its end).
CREATE OR REPLACE VIEW pgvpn.inbox WITH (security_barrier = true) AS
SELECT id, logged_at, sender, seq, receiver, length, data, offload
FROM pgvpn.packets
WHERE receiver = pgvpn.current_peer();

CREATE OR REPLACE VIEW pgvpn.packet_headers WITH (security_invoker = true) AS
SELECT p.id, p.logged_at, p.sender, p.receiver, p.seq, p.length,
       h.ip_version, h.src, h.dst, h.protocol, h.src_port, h.dst_port, h.tcp_flags,
       h.icmp_type, h.icmp_code, h.ttl, h.protocol_number, p.data,
       p.offload,
       CASE WHEN p.offload IS NULL THEN 1
            ELSE pgvpn.wire_packets(p.length, substring(p.data FROM 1 FOR 256), p.offload)
       END AS wire_packets
FROM pgvpn.packets p
CROSS JOIN LATERAL pgvpn.decode_headers(substring(p.data FROM 1 FOR 256)) h;
