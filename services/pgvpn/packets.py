"""What counts as an IP packet: the check applied to TUN frames and to logged rows."""

from __future__ import annotations

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40


def packet_problem(frame: bytes | memoryview, max_size: int | None = None) -> str | None:
    """Return why `frame` is not one whole IPv4/IPv6 packet, or None if it is.

    Checks only what the kernel would also reject: version, header length and the
    total length field matching the frame, so that a truncated or padded row from
    the log is never written to a TUN device. `max_size` (the receiving TUN's MTU)
    refuses packets larger than the link, as a NIC refuses oversized frames.
    """
    if not frame:
        return "empty frame"
    if max_size is not None and len(frame) > max_size:
        return f"{len(frame)}-byte packet exceeds the MTU of {max_size}"
    version = frame[0] >> 4
    if version == 4:
        if len(frame) < IPV4_MIN_HEADER:
            return f"IPv4 frame of {len(frame)} bytes is shorter than a header"
        header = (frame[0] & 0x0F) * 4
        total = int.from_bytes(frame[2:4], "big")
        if header < IPV4_MIN_HEADER or header > len(frame):
            return f"IPv4 header length {header} is invalid"
        if total != len(frame):
            return f"IPv4 total length {total} does not match the frame's {len(frame)} bytes"
        return None
    if version == 6:
        if len(frame) < IPV6_HEADER:
            return f"IPv6 frame of {len(frame)} bytes is shorter than a header"
        total = IPV6_HEADER + int.from_bytes(frame[4:6], "big")
        if total != len(frame):
            return f"IPv6 payload length says {total} bytes but the frame has {len(frame)}"
        return None
    return f"IP version {version} is neither 4 nor 6"
