-- 010: what each agent reports about its own tunnel, read by `pgvpn show` (the
-- `wg show` of pgvpn): when the agent started (NULL again once it stopped cleanly), its
-- IPv6 tunnel address, and the packets and bytes it sent and received since it
-- started. The agent writes them with its heartbeat (every 5 s), to its own row only
-- (policy own_row, sql/004) and only these columns (no table-level UPDATE: sql/008).
-- A peer that lies here lies about itself only; the log (`pgvpn stats`) stays the
-- authority on what crossed.
ALTER TABLE pgvpn.peers
    ADD COLUMN tunnel_addr6 inet,
    ADD COLUMN agent_started timestamptz,
    ADD COLUMN sent_packets bigint NOT NULL DEFAULT 0
        CONSTRAINT peers_sent_packets_not_negative CHECK (sent_packets >= 0),
    ADD COLUMN sent_bytes bigint NOT NULL DEFAULT 0
        CONSTRAINT peers_sent_bytes_not_negative CHECK (sent_bytes >= 0),
    ADD COLUMN received_packets bigint NOT NULL DEFAULT 0
        CONSTRAINT peers_received_packets_not_negative CHECK (received_packets >= 0),
    ADD COLUMN received_bytes bigint NOT NULL DEFAULT 0
        CONSTRAINT peers_received_bytes_not_negative CHECK (received_bytes >= 0);

GRANT UPDATE (tunnel_addr6, agent_started, sent_packets, sent_bytes, received_packets,
              received_bytes) ON pgvpn.peers TO pgvpn_agent;
