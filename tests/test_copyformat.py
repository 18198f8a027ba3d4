"""Unit tests: the binary COPY stream the uplink sends, decoded field by field."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pgvpn.copyformat import SIGNATURE, TRAILER, encode_packet_rows


def decode(stream: bytes) -> list[tuple[int, str, int, bytes, bytes | None]]:
    """A minimal reader of PostgreSQL's binary COPY format for the packet columns."""
    assert stream.startswith(SIGNATURE) and stream.endswith(TRAILER)
    rows, offset = [], len(SIGNATURE)
    while offset < len(stream) - len(TRAILER):
        (fields,) = struct.unpack_from("!h", stream, offset)
        assert fields == 5  # seq, receiver, length, data, offload: the database adds sender
        offset += 2
        values = []
        for _ in range(fields):
            (size,) = struct.unpack_from("!i", stream, offset)
            offset += 4
            if size == -1:
                values.append(None)
                continue
            values.append(stream[offset:offset + size])
            offset += size
        seq, receiver, length, data, offload = values
        assert seq is not None and receiver is not None and length is not None
        assert data is not None
        rows.append((struct.unpack("!q", seq)[0], receiver.decode(),
                     struct.unpack("!i", length)[0], data, offload))
    assert offset == len(stream) - len(TRAILER)
    return rows


def test_an_empty_batch_is_just_header_and_trailer() -> None:
    assert encode_packet_rows("peer-b", 1, []) == SIGNATURE + TRAILER


def test_rows_carry_consecutive_sequence_numbers() -> None:
    rows = decode(encode_packet_rows("peer-b", 41, [b"\x45one", b"\x60two!"]))
    assert rows == [(41, "peer-b", 4, b"\x45one", None), (42, "peer-b", 5, b"\x60two!", None)]


def test_offload_headers_go_with_their_rows_and_none_is_null() -> None:
    header = bytes(range(1, 11))
    rows = decode(encode_packet_rows("peer-b", 7, [memoryview(b"\x45one"), b"\x60two!"],
                                     [header, None]))
    assert rows == [(7, "peer-b", 4, b"\x45one", header), (8, "peer-b", 5, b"\x60two!", None)]


@given(st.lists(st.binary(max_size=1600), max_size=40), st.integers(0, 2**62))
def test_any_batch_round_trips(packets: list[bytes], first_seq: int) -> None:
    rows = decode(encode_packet_rows("peer-b", first_seq, packets))
    assert [r[3] for r in rows] == packets
    assert [r[0] for r in rows] == list(range(first_seq, first_seq + len(packets)))
    assert all(r[2] == len(r[3]) and r[1] == "peer-b" for r in rows)
