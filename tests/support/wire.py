"""Protobuf wire bytes written by hand: the encodings protobuf accepts but never writes itself."""

from __future__ import annotations

U64 = 2**64


def varint(value: int, extra: int = 0) -> bytes:
    """`value` (taken mod 2**64) as a varint, `extra` bytes longer than needed (0x80 ... 0x00 padding)."""
    value %= U64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    if extra:
        out[-1] |= 0x80
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def field_varint(number: int, value: int, extra: int = 0) -> bytes:
    return tag(number, 0) + varint(value, extra)


def field_bytes(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def decodes(message_type: type, raw: bytes) -> bool:
    """Whether `raw` parses as `message_type` (the server refuses what does not: INVALID_ARGUMENT)."""
    try:
        message_type.FromString(raw)
    except Exception:  # noqa: BLE001 - any parse failure
        return False
    return True
