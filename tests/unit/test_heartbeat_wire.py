"""A HeartbeatRequest read from its bytes (`supervisor_service.edge.wire`) is what protobuf's own
parse gives, or nothing (and then protobuf parses it): on messages protobuf wrote, on hostile
bytes (mutated, truncated, garbage) and on encodings protobuf accepts but never writes (fields
repeated or out of order, region_ids unpacked, unknown fields, overlong varints, varints at the
uint64 edge and beyond it)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor_service.edge import restamped, scan_heartbeat
from supervisor_service.proto import pb
from tests.support.wire import U64, field_bytes, field_varint, tag, varint

U64_MAX = U64 - 1
T0 = 1_764_633_600_000  # a wall-clock millisecond of the 2020s: six varint bytes, as a datanode's stamp

u64 = st.integers(0, U64_MAX)
i64 = st.integers(-(2**63), 2**63 - 1)
stamps = st.one_of(st.integers(T0 - 10**6, T0 + 10**6), i64)


def parsed(raw: bytes) -> tuple | None:
    """What protobuf makes of `raw`: its fields, or None when it does not parse."""
    try:
        m = pb.HeartbeatRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - DecodeError, or whatever else protobuf refuses with
        return None
    return m.datanode_id, m.timestamp_millis, list(m.region_ids), m.peer_addr, m.node_epoch


def scanned(raw: bytes) -> tuple | None:
    """The fields as the scan gives them, region ids and address decoded from their spans by protobuf."""
    scan = scan_heartbeat(raw)
    if scan is None:
        return None
    start, end = scan.regions
    regions = pb.HeartbeatRequest.FromString(field_bytes(3, raw[start:end])).region_ids
    start, end = scan.addr
    return scan.datanode_id, scan.timestamp_millis, list(regions), raw[start:end].decode(), scan.node_epoch


def check_scan(raw: bytes) -> None:
    """The scan gives protobuf's answer, or none; and where it says the stamp is, it is."""
    scan = scan_heartbeat(raw)
    if scan is None:
        return
    want = parsed(raw)
    assert want is not None, "the scan accepted bytes protobuf refuses"
    assert scanned(raw) == want
    if scan.stamp is not None:
        start, end = scan.stamp
        assert parsed(raw[:start] + raw[end:])[1] == 0  # the only timestamp field
        assert parsed(raw[start:end])[1] == want[1]


messages = st.builds(
    pb.HeartbeatRequest,
    datanode_id=u64,
    timestamp_millis=stamps,
    region_ids=st.lists(u64, max_size=40),
    peer_addr=st.text(max_size=40),
    node_epoch=u64,
)


@given(messages)
@example(pb.HeartbeatRequest(datanode_id=U64_MAX, timestamp_millis=-1, region_ids=[U64_MAX, 0], node_epoch=U64_MAX))
@example(pb.HeartbeatRequest())
def test_scan_of_what_protobuf_writes_is_protobufs_parse(message):
    raw = message.SerializeToString()
    scan = scan_heartbeat(raw)
    assert scan is not None  # the common encoding is never left to the slow path
    assert scanned(raw) == parsed(raw)
    assert (scan.stamp is None) == (message.timestamp_millis == 0)
    check_scan(raw)


# A field of any number and wire type, with its payload valid or not for that type: what the
# hostile messages are made of. Numbers 1..5 are HeartbeatRequest's; 6, 15, 16 and 2**29-1 are
# unknown (16 and up have tags of two bytes and more).
numbers = st.sampled_from([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 15, 16, 2**29 - 1])


@st.composite
def wire_fields(draw) -> bytes:
    number = draw(numbers)
    kind = draw(st.sampled_from(["varint", "bytes", "packed", "fixed64", "fixed32", "bad_wire_type"]))
    if kind == "varint":
        return field_varint(number, draw(st.one_of(u64, st.integers(U64, 2**70))), draw(st.integers(0, 4)))
    if kind == "bytes":
        return field_bytes(number, draw(st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode))))
    if kind == "packed":
        values = draw(st.lists(st.tuples(u64, st.integers(0, 3)), max_size=6))
        return field_bytes(number, b"".join(varint(v, extra) for v, extra in values))
    if kind == "fixed64":
        return tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
    return tag(number, draw(st.sampled_from([3, 4, 6, 7]))) + draw(st.binary(max_size=4))


hostile = st.one_of(
    st.lists(wire_fields(), max_size=8).map(b"".join),  # repeated, out of order, unknown, unpacked, overlong
    st.binary(max_size=64),  # garbage
    st.builds(lambda m, cut: m.SerializeToString()[:cut], messages, st.integers(0, 200)),  # truncated
)


@st.composite
def mutated(draw) -> bytes:
    """A message protobuf wrote, with bytes replaced, inserted or deleted."""
    raw = bytearray(draw(messages).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        what = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if what == "insert" or not raw:
            raw[at:at] = bytes([byte])
        elif what == "replace":
            raw[min(at, len(raw) - 1)] = byte
        else:
            del raw[min(at, len(raw) - 1)]
    return bytes(raw)


@settings(max_examples=1000)
@given(st.one_of(hostile, mutated()))
# the uint64 edge: 2**64-1 in ten bytes is accepted; beyond 64 bits (a tenth byte above 1) and an
# eleventh byte are protobuf's to judge
@example(field_varint(1, U64_MAX) + field_varint(5, U64_MAX))
@example(tag(1, 0) + b"\xff" * 9 + b"\x02")
@example(tag(1, 0) + b"\xff" * 9 + b"\x7f")
@example(tag(1, 0) + b"\x80" * 10 + b"\x00")
@example(field_varint(2, -1) + field_varint(2, 5))  # last one wins
@example(field_varint(2, 5) + field_bytes(3, varint(7)) + field_bytes(3, varint(8)))  # packed fields merge
@example(field_varint(3, 7) + field_varint(3, 8))  # unpacked region_ids
@example(field_bytes(4, b"\xff\xfe") + field_varint(2, 1))  # not UTF-8
@example(field_varint(5, 3) + field_varint(2, T0) + field_varint(1, 9))  # out of order
@example(field_varint(2, T0, extra=3))  # overlong
@example(field_bytes(3, b"\x80"))  # a packed varint cut off
@example(field_bytes(4, b"abc")[:-1])  # a string cut off
def test_scan_of_hostile_bytes_is_protobufs_parse_or_nothing(raw):
    scan = scan_heartbeat(raw)
    if scan is not None and parsed(raw) is None:
        # What the scan leaves to protobuf (it runs on bytes protobuf parsed): what the spans hold.
        start, end = scan.regions
        regions_ok = parsed(field_bytes(3, raw[start:end])) is not None
        start, end = scan.addr
        addr_ok = parsed(field_bytes(4, raw[start:end])) is not None
        assert not (regions_ok and addr_ok), "the scan accepted a structure protobuf refuses"
        return
    check_scan(raw)


# ---------------------------------------------------------------- restamped


@st.composite
def stamped_lasts(draw) -> bytes:
    """A last message with a stamp, as protobuf writes it or in an order and encoding of its own."""
    m = draw(messages.filter(lambda m: m.timestamp_millis != 0))
    if draw(st.booleans()):
        return m.SerializeToString()
    def overlong(value: int) -> int:  # extra bytes, up to the ten of a valid varint
        return draw(st.integers(0, 10 - len(varint(value))))

    parts = [field_varint(2, m.timestamp_millis, overlong(m.timestamp_millis))]
    if m.datanode_id or draw(st.booleans()):
        parts.append(field_varint(1, m.datanode_id, overlong(m.datanode_id)))
    if m.region_ids or draw(st.booleans()):
        parts.append(field_bytes(3, b"".join(varint(r) for r in m.region_ids)))
    if m.peer_addr or draw(st.booleans()):
        parts.append(field_bytes(4, m.peer_addr.encode()))
    if m.node_epoch or draw(st.booleans()):
        parts.append(field_varint(5, m.node_epoch))
    return b"".join(draw(st.permutations(parts)))


@st.composite
def next_messages(draw, last: bytes) -> bytes:
    """What may follow `last` on a stream: mostly it with another stamp (of any length, overlong,
    at the int64 edges, beyond 64 bits), else that mutated, cut, or grown by a field, or garbage."""
    start, end = scan_heartbeat(last).stamp
    stamp = draw(stamps)
    encoded = draw(st.one_of(
        st.just(varint(stamp)),
        st.integers(1, 4).map(lambda extra: varint(stamp, extra)),  # overlong, up to 11 bytes
        st.just(b"\xff" * 9 + b"\x01"),  # -1: ten bytes, the uint64 edge
        st.just(b"\xff" * 9 + b"\x02"),  # beyond 64 bits
        st.just(b"\xff" * 9),  # a varint that runs on into the next field
        st.just(b""),
    ))
    raw = last[:start] + tag(2, 0) + encoded + last[end:]
    how = draw(st.sampled_from(["restamped"] * 4 + ["mutated", "cut", "appended", "prepended", "garbage"]))
    if how == "mutated":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif how == "cut":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "appended":
        raw += draw(wire_fields())
    elif how == "prepended":
        raw = draw(wire_fields()) + raw
    elif how == "garbage":
        raw = draw(st.binary(max_size=len(raw) + 8))
    return raw


@settings(max_examples=1000)
@given(st.data())
def test_restamped_is_the_last_message_with_protobufs_new_stamp_or_nothing(data):
    last = data.draw(stamped_lasts())
    scan = scan_heartbeat(last)
    assert scan is not None and scan.stamp is not None
    raw = data.draw(next_messages(last))
    found = restamped(raw, last, scan.stamp)
    if found is None:
        return
    timestamp, end = found
    want = parsed(raw)
    assert want is not None, "restamped accepted bytes protobuf refuses"
    assert want == parsed(last)[:1] + (timestamp,) + parsed(last)[2:]
    again = scan_heartbeat(raw)
    assert again is not None and again.stamp == (scan.stamp[0], end)  # what the stream keeps for the next one


@given(stamped_lasts(), stamps)
def test_a_canonical_restamp_is_always_recognized(last, stamp):
    """The fast path is taken, not just safe: a new stamp of any value in a message that is
    otherwise the last one's bytes needs no parse."""
    start, end = scan_heartbeat(last).stamp
    raw = last[:start] + field_varint(2, stamp) + last[end:]
    assert restamped(raw, last, (start, end)) == (stamp, start + len(field_varint(2, stamp)))
