"""Unit tests: the binary COPY stream the uplink sends, decoded field by field."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pgvpn.copyformat import SIGNATURE, TRAILER, encode_packet_rows


def decode(stream: bytes) -> list[tuple[int, str, int, bytes]]:
    """A minimal reader of PostgreSQL's binary COPY format for the packet columns."""
    assert stream.startswith(SIGNATURE) and stream.endswith(TRAILER)
    rows, offset = [], len(SIGNATURE)
    while offset < len(stream) - len(TRAILER):
        (fields,) = struct.unpack_from("!h", stream, offset)
        assert fields == 4  # seq, receiver, length, data: the database adds sender
        offset += 2
        values = []
        for _ in range(fields):
            (size,) = struct.unpack_from("!i", stream, offset)
            offset += 4
            values.append(stream[offset:offset + size])
            offset += size
        seq, receiver, length, data = values
        rows.append((struct.unpack("!q", seq)[0], receiver.decode(),
                     struct.unpack("!i", length)[0], data))
    assert offset == len(stream) - len(TRAILER)
    return rows


def test_an_empty_batch_is_just_header_and_trailer() -> None:
    assert encode_packet_rows("peer-b", 1, []) == SIGNATURE + TRAILER


def test_rows_carry_consecutive_sequence_numbers() -> None:
    rows = decode(encode_packet_rows("peer-b", 41, [b"\x45one", b"\x60two!"]))
    assert rows == [(41, "peer-b", 4, b"\x45one"), (42, "peer-b", 5, b"\x60two!")]


@given(st.lists(st.binary(max_size=1600), max_size=40), st.integers(0, 2**62))
def test_any_batch_round_trips(packets: list[bytes], first_seq: int) -> None:
    rows = decode(encode_packet_rows("peer-b", first_seq, packets))
    assert [r[3] for r in rows] == packets
    assert [r[0] for r in rows] == list(range(first_seq, first_seq + len(packets)))
    assert all(r[2] == len(r[3]) and r[1] == "peer-b" for r in rows)
