"""Dump rows straight to protobuf wire bytes, vectorized: no Python object per detector.

A Dump of a million detectors built one `pb.DetectorState` at a time costs
about 2.5 s of interpreter time, and that time is taken from the heartbeat
streams (one GIL). Rows of one datanode share their `datanode_id`, and rows
of one history group share every other field except `region_id` (and the
rare `failover_count` / `migrating`), so a page is assembled with numpy from
a handful of byte strings per group, each serialized by protobuf itself:

    row = 0x0A len | DetectorState{datanode_id} | 0x10 varint(region_id)
          | DetectorState{fields 3..8 of the group} | DetectorState{fields 9, 10}

Concatenated serialized messages are a valid serialization of their merge,
fields are written in field-number order as protobuf writes them, and the
page is parsed back with `FromString` (C code), so what leaves on the wire
is what `pb.DetectorState(...)` per row would have given
(tests/unit/test_dumpcodec.py compares the two).
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
# Varint length of v: 1 + the number of these thresholds v is at or above.
_VARINT_STEPS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_REPEATED_ROW_TAG = 0x0A  # DumpResponse.detectors: field 1, length-delimited
_REGION_TAG = 0x10  # DetectorState.region_id: field 2, varint
_MAX_ROW = 127  # one length byte: rows are at most ~80 bytes


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of the varint encoding of each uint64."""
    lengths = np.ones(values.size, dtype=np.int64)
    for step in _VARINT_STEPS:
        lengths += values >= step
    return lengths


def encode_rows(
    prefix: bytes,
    region_ids: np.ndarray,
    group_index: np.ndarray,
    group_bytes: list[bytes],
    extras: dict[int, bytes] | None = None,
) -> bytes:
    """Serialized `DumpResponse.detectors` entries, one per region.

    `prefix`: the serialized fields that every row shares (datanode_id);
    `region_ids`: uint64; `group_index[i]`: which of `group_bytes` (the
    serialized fields 3..8) row i gets; `extras`: row index -> serialized
    fields 9 and 10, for the few rows that have them.
    """
    n = int(region_ids.size)
    if n == 0:
        return b""
    regions = np.asarray(region_ids, dtype=_U64)
    group_index = np.asarray(group_index, dtype=np.int64)
    group_len = np.array([len(g) for g in group_bytes], dtype=np.int64)
    vlen = varint_lengths(regions)
    extra_len = np.zeros(n, dtype=np.int64)
    if extras:
        idx = np.fromiter(extras.keys(), dtype=np.int64, count=len(extras))
        extra_len[idx] = [len(b) for b in extras.values()]
    body = len(prefix) + 1 + vlen + group_len[group_index] + extra_len
    if int(body.max()) > _MAX_ROW:  # cannot happen with this message; guard the one-byte length
        raise ValueError("DetectorState row longer than 127 bytes")
    row_len = body + 2
    ends = np.cumsum(row_len)
    starts = ends - row_len
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    out[starts] = _REPEATED_ROW_TAG
    out[starts + 1] = body
    pos = starts + 2
    if prefix:
        out[pos[:, None] + np.arange(len(prefix))] = np.frombuffer(prefix, dtype=np.uint8)
        pos = pos + len(prefix)
    out[pos] = _REGION_TAG
    pos = pos + 1
    rest = regions.copy()
    for j in range(int(vlen.max())):
        more = vlen > j + 1
        byte = (rest & _U64(0x7F)).astype(np.uint8) | np.where(more, 0x80, 0).astype(np.uint8)
        live = vlen > j
        out[pos[live] + j] = byte[live]
        rest >>= _U64(7)
    pos = pos + vlen
    for g, data in enumerate(group_bytes):
        if not data:
            continue
        rows = np.flatnonzero(group_index == g)
        if rows.size:
            out[pos[rows][:, None] + np.arange(len(data))] = np.frombuffer(data, dtype=np.uint8)
    if extras:
        pos = pos + group_len[group_index]
        for i, data in extras.items():
            out[pos[i] : pos[i] + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out.tobytes()
