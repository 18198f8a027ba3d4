"""The batched profiles: pgvpn's own links (pgvpn.transports.batched) at the MTU the
lab chooses, or at a jumbo MTU; with routing 'table', the downlink reads from every
sender (pgvpn.transports.fleet)."""

from __future__ import annotations

from pgvpn.transports.base import Downlink, Profile, Session, Uplink
from pgvpn.transports.batched import BatchedDownlink, BatchedUplink
from pgvpn.transports.fleet import FleetDownlink


class BatchedProfile(Profile):
    name = "batched"
    logged = True
    carries_offload = True
    routes_by_table = True
    summary = "batched binary COPY, binary SELECT, one payload-free NOTIFY per batch"
    log_table = "pgvpn.packets"
    log_wire_packets = ("CASE WHEN offload IS NULL THEN 1 ELSE pgvpn.wire_packets(length, "
                        "substring(data FROM 1 FOR 256), offload) END")
    tables = ("pgvpn.packets", "pgvpn.cursors")

    def open_uplink(self, session: Session) -> Uplink:
        return BatchedUplink(session)

    def open_downlink(self, session: Session) -> Downlink:
        max_packet = self.default_mtu(session.config.mtu)
        if session.config.routing == "table":  # from every peer that addresses it
            return FleetDownlink(session, max_packet=max_packet)
        return BatchedDownlink(session, max_packet=max_packet)


class BatchedJumboProfile(BatchedProfile):
    name = "batched-jumbo"
    summary = "batched, with a 65000-byte TUN MTU so TCP sends fewer, larger packets"

    def default_mtu(self, requested: int) -> int:
        return 65000
