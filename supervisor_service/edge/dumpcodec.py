"""Dump rows straight to protobuf wire bytes, vectorized: no Python object per detector.

A Dump of a million detectors built one `pb.DetectorState` at a time costs
about 2.5 s of interpreter time, and that time is taken from the heartbeat
streams (one GIL); when every region joined its datanode at a different time,
a million rows are close to a million distinct history groups, so nothing per
group may be a Python object either. A page is assembled with numpy, field by
field for all its rows at once:

    row = 0x0A len | DetectorState{datanode_id} | 0x10 varint(region_id)
          | fields 3..8 of the row's group (last heartbeat, phi, available,
            samples, observed mean and std), gathered from per-group arrays
          | DetectorState{fields 9, 10} for the few rows that have them
          | field 11 (when phi reaches the threshold if nothing arrives), of the row's group

Concatenated serialized fields are a valid serialization of their message,
fields are written in field-number order as protobuf writes them (fields 3..8
always, zeros included: the message parses the same), and the page is parsed
back with `FromString` (C code), so what leaves on the wire is what
`pb.DetectorState(...)` per row would have given (tests/unit/test_dumpcodec.py
compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_U64 = np.uint64
# Varint length of v: 1 + the number of these thresholds v is at or above.
_VARINT_STEPS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_REPEATED_ROW_TAG = 0x0A  # DumpResponse.detectors: field 1, length-delimited
_REGION_TAG = 0x10  # DetectorState.region_id: field 2, varint
_MAX_ROW = 127  # one length byte: rows are at most ~100 bytes


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of the varint encoding of each uint64."""
    lengths = np.ones(values.size, dtype=np.int64)
    for step in _VARINT_STEPS:
        lengths += values >= step
    return lengths


@dataclass(frozen=True, slots=True)
class GroupColumns:
    """Fields 3..8 of DetectorState for each history group of one datanode (parallel arrays)."""

    last: np.ndarray  # int64 last_heartbeat_millis
    phi: np.ndarray  # float64
    available: np.ndarray  # bool
    samples: np.ndarray  # int64, within uint32
    mean: np.ndarray  # float64 observed mean interval
    std: np.ndarray  # float64 observed standard deviation
    predicted: np.ndarray | None = None  # int64 predicted_failure_millis (field 11; None: not written)

    @classmethod
    def empty(cls) -> GroupColumns:
        i, f = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        return cls(i, f, np.empty(0, dtype=bool), i, f, f)


# Tags of the group's fields: (field number << 3) | wire type (0 varint, 1 fixed64).
_LAST_TAG, _PHI_TAG, _AVAILABLE_TAG, _SAMPLES_TAG, _MEAN_TAG, _STD_TAG = 0x18, 0x21, 0x28, 0x30, 0x39, 0x41
_PREDICTED_TAG = 0x58  # field 11, varint: after fields 9 and 10, as protobuf orders them; omitted when 0


def _put_varints(out: np.ndarray, pos: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> None:
    rest = values.copy()
    for j in range(int(lengths.max())):
        more = lengths > j + 1
        byte = (rest & _U64(0x7F)).astype(np.uint8) | np.where(more, 0x80, 0).astype(np.uint8)
        live = lengths > j
        out[pos[live] + j] = byte[live]
        rest >>= _U64(7)


def _put_double(out: np.ndarray, pos: np.ndarray, tag: int, values: np.ndarray) -> np.ndarray:
    out[pos] = tag
    out[(pos + 1)[:, None] + np.arange(8)] = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(-1, 8)
    return pos + 9


def encode_rows(
    prefix: bytes,
    region_ids: np.ndarray,
    group_index: np.ndarray,
    groups: GroupColumns,
    extras: dict[int, bytes] | None = None,
) -> bytes:
    """Serialized `DumpResponse.detectors` entries, one per region.

    `prefix`: the serialized fields that every row shares (datanode_id);
    `region_ids`: uint64; `group_index[i]`: which of `groups` row i gets;
    `extras`: row index -> serialized fields 9 and 10, for the few rows that
    have them.
    """
    n = int(region_ids.size)
    if n == 0:
        return b""
    regions = np.asarray(region_ids, dtype=_U64)
    gi = np.asarray(group_index, dtype=np.int64)
    last = groups.last[gi].astype(np.int64).view(_U64)  # int64 varints are two's complement, 10 bytes if negative
    samples = groups.samples[gi].astype(_U64)
    vlen, last_len, samples_len = varint_lengths(regions), varint_lengths(last), varint_lengths(samples)
    extra_len = np.zeros(n, dtype=np.int64)
    if extras:
        idx = np.fromiter(extras.keys(), dtype=np.int64, count=len(extras))
        extra_len[idx] = [len(b) for b in extras.values()]
    predicted = pred_len = None
    pred_field = 0
    if groups.predicted is not None:
        predicted = groups.predicted[gi].astype(np.int64).view(_U64)
        pred_len = varint_lengths(predicted)
        pred_field = np.where(predicted != 0, 1 + pred_len, 0)
    body = len(prefix) + 1 + vlen + 1 + last_len + 9 + 2 + 1 + samples_len + 9 + 9 + extra_len + pred_field
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
    _put_varints(out, pos + 1, regions, vlen)
    pos = pos + 1 + vlen
    out[pos] = _LAST_TAG
    _put_varints(out, pos + 1, last, last_len)
    pos = _put_double(out, pos + 1 + last_len, _PHI_TAG, groups.phi[gi])
    out[pos] = _AVAILABLE_TAG
    out[pos + 1] = groups.available[gi]
    pos = pos + 2
    out[pos] = _SAMPLES_TAG
    _put_varints(out, pos + 1, samples, samples_len)
    pos = _put_double(out, pos + 1 + samples_len, _MEAN_TAG, groups.mean[gi])
    pos = _put_double(out, pos, _STD_TAG, groups.std[gi])
    if extras:
        for i, data in extras.items():
            out[pos[i] : pos[i] + len(data)] = np.frombuffer(data, dtype=np.uint8)
    if predicted is not None and pred_len is not None:
        at, live = pos + extra_len, predicted != 0
        if live.any():
            out[at[live]] = _PREDICTED_TAG
            _put_varints(out, at[live] + 1, predicted[live], pred_len[live])
    return out.tobytes()
