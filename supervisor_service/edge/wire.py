"""HeartbeatRequest read straight from its wire bytes, for the common case only.

A datanode stamps every heartbeat: from one message of a stream to the next only
`timestamp_millis` changes. `restamped` recognizes exactly that (the bytes before the timestamp
field and after it the same as the last message's, and in between one well-formed timestamp
field) and decodes the one varint, so that the stream's last parse (its region array, its
validated address) holds for the new message without a parse of its own.

`scan_heartbeat` walks a message's fields to find where its timestamp is, and accepts only the
common encoding: every field at most once, each with the wire type the schema gives it,
region_ids packed. Anything else (an unknown field, a field repeated, region_ids unpacked, a
truncated varint or one beyond 64 bits, a tag of more than one byte) is None, and such messages
are always parsed by protobuf, which gives its own answer (last one wins, packed and unpacked
merged, or DecodeError). Field order does not matter: with every field at most once, a message
means the same in any order.
"""

from __future__ import annotations

# HeartbeatRequest's fields (protos/supervisor/v1/supervisor.proto): number -> wire type.
_DATANODE_ID, _TIMESTAMP_MILLIS, _REGION_IDS, _PEER_ADDR, _NODE_EPOCH = 1, 2, 3, 4, 5
_VARINT, _LEN = 0, 2
_TAGS = {
    (_DATANODE_ID << 3) | _VARINT: _DATANODE_ID,
    (_TIMESTAMP_MILLIS << 3) | _VARINT: _TIMESTAMP_MILLIS,
    (_REGION_IDS << 3) | _LEN: _REGION_IDS,
    (_PEER_ADDR << 3) | _LEN: _PEER_ADDR,
    (_NODE_EPOCH << 3) | _VARINT: _NODE_EPOCH,
}
_UINT64 = 1 << 64
_INT64_MAX = (1 << 63) - 1


class Scan:
    """The fields of one HeartbeatRequest as its wire bytes give them: the scalars decoded, the
    packed region ids and the peer address as [start, end) spans of those bytes (empty when
    absent), and `stamp` the span of the whole timestamp field, tag included (None when absent)."""

    __slots__ = ("datanode_id", "timestamp_millis", "node_epoch", "regions", "addr", "stamp")

    def __init__(self, datanode_id: int, timestamp_millis: int, node_epoch: int, regions: tuple[int, int],
                 addr: tuple[int, int], stamp: tuple[int, int] | None) -> None:
        self.datanode_id = datanode_id
        self.timestamp_millis = timestamp_millis
        self.node_epoch = node_epoch
        self.regions = regions
        self.addr = addr
        self.stamp = stamp


def scan_heartbeat(raw: bytes) -> Scan | None:
    """The fields of `raw`, a serialized HeartbeatRequest, or None when it is anything but the
    common encoding (then protobuf's parse decides, errors included). What the spans hold (packed
    varints, UTF-8) is not checked: this is for bytes that protobuf parsed."""
    n = len(raw)
    i = 0
    seen = 0
    datanode_id = timestamp = epoch = 0
    regions = addr = (0, 0)
    stamp = None
    tags = _TAGS
    try:
        while i < n:
            tag_at = i
            field = tags.get(raw[i])  # a tag of two bytes or more has its first byte >= 0x80: not here
            if field is None:
                return None
            bit = 1 << field
            if seen & bit:
                return None  # repeated: protobuf's last-one-wins (or a packed merge) is protobuf's to apply
            seen |= bit
            i += 1
            # The varint, inline: most are one byte (lengths, small ids) and this runs per message.
            value = raw[i]
            i += 1
            if value >= 0x80:
                value &= 0x7F
                shift = 7
                while True:
                    byte = raw[i]
                    i += 1
                    if shift == 63:
                        if byte > 1:
                            return None  # beyond 64 bits, or an 11th byte: not ours to judge
                        value |= byte << 63
                        break
                    value |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        break
                    shift += 7
            if field == _REGION_IDS or field == _PEER_ADDR:
                end = i + value
                if end > n:
                    return None
                if field == _REGION_IDS:
                    regions = (i, end)
                else:
                    addr = (i, end)
                i = end
            elif field == _DATANODE_ID:
                datanode_id = value
            elif field == _TIMESTAMP_MILLIS:
                timestamp = value - _UINT64 if value > _INT64_MAX else value
                stamp = (tag_at, i)
            else:
                epoch = value
    except IndexError:  # a varint cut off by the end of the message
        return None
    return Scan(datanode_id, timestamp, epoch, regions, addr, stamp)


_STAMP_TAG = (_TIMESTAMP_MILLIS << 3) | _VARINT


def restamped(raw: bytes, last: bytes, stamp: tuple[int, int]) -> tuple[int, int] | None:
    """When `raw` is `last` (a message `scan_heartbeat` accepted, its timestamp field at `stamp`)
    with another timestamp field in its place: (its timestamp_millis, the end of its timestamp
    field). Otherwise None.

    Exact, not a guess: the bytes before and after the field are the last message's, so they are
    the same whole fields, each once, and what is between them is one timestamp field and nothing
    else; so `raw` parses to the last message with this timestamp_millis."""
    start, end = stamp
    stop = len(raw) - (len(last) - end)  # where the new timestamp field must end
    i = start + 1
    if stop <= i or raw[start] != _STAMP_TAG or not raw.startswith(last[:start]) or not raw.endswith(last[end:]):
        return None
    value = 0
    shift = 0
    while i < stop:
        byte = raw[i]
        i += 1
        if shift == 63:
            if byte > 1 or i != stop:
                return None
            value |= byte << 63
            break
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if i != stop:
                return None  # a varint that ends early: more bytes than the one field
            break
        shift += 7
    else:
        return None  # the varint runs on into the tail
    return (value - _UINT64 if value > _INT64_MAX else value), stop
