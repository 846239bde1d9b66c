"""Hypothesis strategies for fuzzing the service: protobuf messages built from their descriptors, with
edge values in every field, and wire bytes no protobuf library writes (README "Fuzzing").

- `message(cls)`: an instance of the generated class `cls` with any subset of its fields set, each
  to an edge or random value of its type: uint64 0, 1, 2**63-1, 2**63, 2**64-1; int64 and int32
  extremes and negatives; NaN, infinities, -0.0 for doubles; long, empty and odd-Unicode strings;
  unknown enum numbers; empty, small and huge repeated fields; nested messages.
- `wire(cls)`: bytes for a request of type `cls`: a serialized `message(cls)`, then perhaps
  truncated, a byte flipped, a string field carrying non-UTF-8 bytes, a known field sent with the
  wrong wire type, an unknown field, a field repeated, or plain garbage.

The number of examples is fixed (`examples(n)`) and the generation derandomized, so `make test`
runs the same examples on every machine; `FUZZ_EXAMPLES=N` (as `make fuzz` sets it) multiplies them,
randomizes the seed and keeps failing examples in hypothesis's database (`.hypothesis/`, not in the
repo). Every failure found is kept as an explicit `@example` next to the test that found it.
"""

from __future__ import annotations

import os

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.support.wire import field_bytes, field_varint, tag, varint

U64_EDGES = (0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1)
I64_EDGES = (0, 1, -1, 2**31, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63), -(2**63) + 1)
U32_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)
I32_EDGES = (0, 1, -1, 2**31 - 1, -(2**31))
DOUBLE_EDGES = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324)
# Strings a person would not send: empty, control characters, NUL, right-to-left marks, astral
# planes, very long; and what looks like an address.
ODD_TEXT = ("", " ", "\x00", "a\x00b", "\n", "\u202e", "\U0001f600" * 3, "é" * 40, "host:1", "[::1]:0",
            "x" * 300, "x" * 301, "10.0.0.1:4001")

_KIND = FieldDescriptor


def _edge_or(edges: tuple, lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


_SCALARS: dict[int, st.SearchStrategy] = {
    _KIND.TYPE_UINT64: _edge_or(U64_EDGES, 0, 2**64 - 1),
    _KIND.TYPE_FIXED64: _edge_or(U64_EDGES, 0, 2**64 - 1),
    _KIND.TYPE_INT64: _edge_or(I64_EDGES, -(2**63), 2**63 - 1),
    _KIND.TYPE_SINT64: _edge_or(I64_EDGES, -(2**63), 2**63 - 1),
    _KIND.TYPE_SFIXED64: _edge_or(I64_EDGES, -(2**63), 2**63 - 1),
    _KIND.TYPE_UINT32: _edge_or(U32_EDGES, 0, 2**32 - 1),
    _KIND.TYPE_FIXED32: _edge_or(U32_EDGES, 0, 2**32 - 1),
    _KIND.TYPE_INT32: _edge_or(I32_EDGES, -(2**31), 2**31 - 1),
    _KIND.TYPE_SINT32: _edge_or(I32_EDGES, -(2**31), 2**31 - 1),
    _KIND.TYPE_SFIXED32: _edge_or(I32_EDGES, -(2**31), 2**31 - 1),
    _KIND.TYPE_BOOL: st.booleans(),
    _KIND.TYPE_DOUBLE: st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats()),
    _KIND.TYPE_FLOAT: st.one_of(st.sampled_from(DOUBLE_EDGES[:7]), st.floats(width=32)),
    _KIND.TYPE_STRING: st.one_of(
        st.sampled_from(ODD_TEXT),
        st.text(max_size=40),
        st.integers(1000, 200_000).map(lambda n: "y" * n),
    ),
    _KIND.TYPE_BYTES: st.binary(max_size=64),
}

HUGE_REPEATED = (1001, 5000, 100_001)  # past the limits the fuzzed service is given (and the default)


def _is_repeated(field: FieldDescriptor) -> bool:
    # `is_repeated` is the newer protobuf's (which dropped `label`); the older ones have only `label`.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == _KIND.LABEL_REPEATED


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == _KIND.TYPE_ENUM:
        # Known numbers, and numbers the enum does not define (proto3 enums are open).
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.sampled_from(I32_EDGES))
    return _SCALARS[field.type]


def _repeated(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list]:
    element = _element(field, depth)
    small = st.lists(element, max_size=8)
    if field.type == _KIND.TYPE_MESSAGE:
        return small
    # A huge repeated field: one edge value, or a run, many times (cheap to build, heavy to send).
    huge = st.tuples(st.sampled_from(HUGE_REPEATED), element, st.booleans()).map(
        lambda t: [t[1]] * t[0] if t[2] or not isinstance(t[1], int) else list(range(t[0]))
    )
    return st.one_of(small, small, small, huge)


def _element(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == _KIND.TYPE_MESSAGE:
        return _message_of(field.message_type._concrete_class, depth + 1)
    return _scalar(field)


def _message_of(cls: type, depth: int) -> st.SearchStrategy:
    fields = list(cls.DESCRIPTOR.fields)

    @st.composite
    def build(draw):
        message = cls()
        if depth > 2:
            return message
        for field in draw(st.lists(st.sampled_from(fields), unique=True)) if fields else ():
            if _is_repeated(field):
                values = draw(_repeated(field, depth))
                target = getattr(message, field.name)
                if field.type == _KIND.TYPE_MESSAGE:
                    for value in values:
                        target.add().CopyFrom(value)
                else:
                    target.extend(values)
            elif field.type == _KIND.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(_message_of(field.message_type._concrete_class, depth + 1)))
            else:
                setattr(message, field.name, draw(_scalar(field)))
        return message

    return build()


def message(cls: type) -> st.SearchStrategy:
    """Instances of the generated protobuf class `cls`, any field set to any value of its type."""
    return _message_of(cls, 0)


def _string_fields(cls: type) -> list[FieldDescriptor]:
    return [f for f in cls.DESCRIPTOR.fields if f.type == _KIND.TYPE_STRING]


NON_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\x80", b"\xc0\xaf")


def wire(cls: type) -> st.SearchStrategy[bytes]:
    """Bytes sent as a request of type `cls`: well-formed, damaged, or garbage."""
    good = message(cls).map(lambda m: m.SerializeToString())
    numbers = [f.number for f in cls.DESCRIPTOR.fields] or [1]

    @st.composite
    def damaged(draw):
        raw = draw(good)
        how = draw(st.sampled_from(["truncate", "flip", "non_utf8", "wire_type", "unknown", "repeat", "overlong"]))
        if how == "truncate" and raw:
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if how == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        if how == "non_utf8" and _string_fields(cls):
            field = draw(st.sampled_from(_string_fields(cls)))
            return raw + field_bytes(field.number, draw(st.sampled_from(NON_UTF8)))
        if how == "wire_type":
            number = draw(st.sampled_from(numbers))
            wire_type = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
            payload = {0: varint(2**64 - 1), 1: b"\x00" * 8, 2: varint(3) + b"abc", 5: b"\x00" * 4}.get(wire_type, b"")
            return raw + tag(number, wire_type) + payload
        if how == "unknown":
            return raw + field_varint(draw(st.sampled_from([15, 99, 2**29 - 1])), 2**64 - 1)
        if how == "repeat":
            return raw + raw
        if how == "overlong" and numbers:
            # A length-delimited field that claims more bytes than follow.
            return raw + tag(numbers[0], 2) + varint(2**31)
        return raw

    garbage = st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10 + b"\x01", b"\x80"]),
    )
    return st.one_of(good, good, damaged(), damaged(), garbage)


def examples(n: int) -> settings:
    """The settings of a fuzz test: `n` examples (times FUZZ_EXAMPLES when set), derandomized unless
    FUZZ_EXAMPLES is set, no deadline (a real server's latency is not the property)."""
    factor = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)
    return settings(
        max_examples=n * factor if factor > 0 else n,
        derandomize=factor <= 0,
        database=None if factor <= 0 else settings.default.database,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
