"""PostgreSQL binary COPY encoding of packet rows, built in one pass.

Text-format COPY would hex-encode every bytea and double the bytes on the wire;
building the binary stream by hand lets one `Copy.write()` carry a whole batch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pgvpn.offload import VNET_HDR_LEN

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)  # no OIDs, no extension
TRAILER = struct.pack("!h", -1)
# The column list that `encode_packet_rows` fills, in order.  No `sender`: the
# database fills it in from the session's role (sql/004_peer_isolation.sql), and a
# peer may not write it, so that no peer can log packets in another's name.
PACKET_COLUMNS = "seq, receiver, length, data, offload"

_INT8 = struct.Struct("!q")
_LENGTH_AND_DATA = struct.Struct("!iii")  # length column: 4-byte value; then data's size
_NULL = struct.pack("!i", -1)
_HEADER_FIELD = struct.pack("!i", VNET_HDR_LEN)


def encode_packet_rows(receiver: str, first_seq: int, packets: Sequence[bytes | memoryview],
                       headers: Sequence[bytes | None] | None = None) -> bytes:
    """Encode rows (first_seq + i, receiver, len, packet, header) for COPY ... (FORMAT
    BINARY). `headers`: each packet's 10-byte virtio_net_hdr or None (NULL), or None
    for a batch without any (pgvpn.offload)."""
    receiver_b = receiver.encode()
    before_seq = struct.pack("!hi", 5, 8)
    after_seq = struct.pack("!i", len(receiver_b)) + receiver_b
    parts: list[bytes | memoryview] = [SIGNATURE]
    append = parts.append
    for offset, packet in enumerate(packets):
        size = len(packet)
        append(before_seq)
        append(_INT8.pack(first_seq + offset))
        append(after_seq)
        append(_LENGTH_AND_DATA.pack(4, size, size))
        append(packet)
        header = headers[offset] if headers is not None else None
        if header is None:
            append(_NULL)
        else:
            append(_HEADER_FIELD)
            append(header)
    append(TRAILER)
    return b"".join(parts)
