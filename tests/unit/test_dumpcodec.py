"""Dump pages encoded with numpy (`supervisor_service.edge.dumpcodec`) are the rows `pb.DetectorState` would give."""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import Dump, Heartbeat, PhiAccrualOptions, Supervisor, as_region_array
from supervisor_service.core.whatif import crossing_ms
from supervisor_service.edge import DumpPages, GroupColumns, encode_rows, varint_lengths
from supervisor_service.proto import pb

U64_MAX = 2**64 - 1
T0 = 1_700_000_000_000


def test_varint_lengths_match_protobuf():
    values = [0, 1, 127, 128, 16383, 16384, 2**35, 2**56 - 1, 2**56, 2**63, U64_MAX]
    got = varint_lengths(np.array(values, dtype=np.uint64)).tolist()
    want = [len(pb.DetectorState(region_id=v).SerializeToString()) - 1 if v else 1 for v in values]
    assert got == want


def test_encode_rows_extremes():
    regions = np.array([0, 1, 300, 2**63, U64_MAX], dtype=np.uint64)
    groups = GroupColumns(
        last=np.array([0, -1], dtype=np.int64),  # a negative int64 is a 10-byte varint
        phi=np.array([0.0, float("inf")]),
        available=np.array([True, False]),
        samples=np.array([0, 2**32 - 1], dtype=np.int64),
        mean=np.array([-0.0, 1e300]),
        std=np.array([0.5, float("nan")]),
    )
    extras = {4: pb.DetectorState(failover_count=3, migrating=True).SerializeToString()}
    data = encode_rows(pb.DetectorState(datanode_id=U64_MAX).SerializeToString(), regions,
                       np.array([0, 1, 0, 1, 1]), groups, extras)
    rows = list(pb.DumpResponse.FromString(data).detectors)
    assert [r.region_id for r in rows] == regions.tolist()
    assert {r.datanode_id for r in rows} == {U64_MAX}
    assert [r.sample_count for r in rows] == [0, 2**32 - 1, 0, 2**32 - 1, 2**32 - 1]
    assert [r.last_heartbeat_millis for r in rows] == [0, -1, 0, -1, -1]
    assert [r.available for r in rows] == [True, False, True, False, False]
    assert rows[1].phi == float("inf") and rows[1].mean_interval_millis == 1e300 and math.isnan(rows[1].std_deviation_millis)
    assert rows[0].std_deviation_millis == 0.5 and math.copysign(1.0, rows[0].mean_interval_millis) == -1.0
    assert rows[4].failover_count == 3 and rows[4].migrating and not rows[3].migrating
    assert encode_rows(b"", np.array([], dtype=np.uint64), np.array([]), GroupColumns.empty()) == b""


def test_encode_rows_predicted_failure_extremes():
    """Field 11 after fields 9 and 10: omitted when 0, a negative one a 10-byte varint, the row still one length
    byte long with every other field at its longest."""
    regions = np.array([U64_MAX] * 4, dtype=np.uint64)
    groups = GroupColumns(
        last=np.array([-1] * 4, dtype=np.int64), phi=np.zeros(4), available=np.zeros(4, dtype=bool),
        samples=np.full(4, 2**32 - 1, dtype=np.int64), mean=np.zeros(4), std=np.zeros(4),
        predicted=np.array([0, -1, 2**63 - 1, 1_796_219_390_708], dtype=np.int64),
    )
    extras = {i: pb.DetectorState(failover_count=2**32 - 1, migrating=True).SerializeToString() for i in range(4)}
    data = encode_rows(pb.DetectorState(datanode_id=U64_MAX).SerializeToString(), regions, np.arange(4), groups,
                       extras)
    rows = list(pb.DumpResponse.FromString(data).detectors)
    assert [r.predicted_failure_millis for r in rows] == [0, -1, 2**63 - 1, 1_796_219_390_708]
    assert all(r.failover_count == 2**32 - 1 and r.migrating and r.sample_count == 2**32 - 1
               and r.last_heartbeat_millis == -1 and r.region_id == U64_MAX for r in rows)


def reference_rows(snapshot, at: int, only_failed: bool) -> list[pb.DetectorState]:
    """The rows of a dump one message at a time, in the order DumpPages shows them: the
    reference the numpy encoding is tested against."""
    threshold, counts, migrating = snapshot.threshold, snapshot.failover_counts, snapshot.migrating
    rows = []
    for node in snapshot.nodes:
        for region_id, gid in zip(node.regions.tolist(), node.gids.tolist()):
            grp = node.groups[gid]
            phi = grp.phi(at)
            if only_failed and phi < threshold:
                continue
            rows.append(
                pb.DetectorState(
                    datanode_id=node.datanode_id,
                    region_id=region_id,
                    last_heartbeat_millis=grp.last,
                    phi=phi,
                    available=phi < threshold,
                    sample_count=grp.samples,
                    mean_interval_millis=grp.observed_mean,
                    std_deviation_millis=grp.observed_std,
                    failover_count=counts.get((node.datanode_id, region_id), 0),
                    migrating=region_id in migrating,
                    predicted_failure_millis=crossing_ms(grp, threshold),
                )
            )
    return rows


region_ids = st.one_of(st.integers(0, 300), st.integers(0, U64_MAX))


@settings(max_examples=60, deadline=None)
@given(
    heartbeats=st.lists(
        st.tuples(st.integers(0, 3), st.lists(region_ids, min_size=1, max_size=12), st.integers(0, 20_000)),
        min_size=1, max_size=25,
    ),
    at=st.integers(0, 60_000),
    only_failed=st.booleans(),
    page_size=st.integers(1, 17),
    counted=st.lists(st.tuples(st.integers(0, 3), region_ids, st.integers(0, 5)), max_size=8),
    migrating=st.lists(region_ids, max_size=6),
)
def test_encoded_pages_equal_row_by_row_pages(heartbeats, at, only_failed, page_size, counted, migrating):
    sup = Supervisor(PhiAccrualOptions(), Metrics(CollectorRegistry()))
    ts = T0
    for datanode_id, regions, step in heartbeats:
        ts += step
        sup.handle(Heartbeat(datanode_id, as_region_array(regions), ts), ts)
    snapshot = sup.handle(Dump(Future()), ts)
    # Counts and flights for some detectors that exist, some that do not.
    existing = [(n.datanode_id, r) for n in snapshot.nodes for r in n.regions.tolist()]
    counts = {k: c for k, c in zip(existing[::3], range(1, 100))}
    counts.update({(d, r): c for d, r, c in counted})
    moving = set(migrating) | {r for _, r in existing[1::4]}
    snapshot = dataclasses.replace(snapshot, failover_counts=counts, migrating=frozenset(moving))
    dump = DumpPages(snapshot, ts + at, only_failed)
    header = dict(is_leader=True, at_millis=ts + at, total=dump.total, holds=["warmup"])
    encoded = [build() for build in dump.pages(page_size, header)]
    reference = reference_rows(snapshot, ts + at, only_failed)
    assert [row for page in encoded for row in page.detectors] == reference
    assert all(len(page.detectors) <= page_size for page in encoded)
    assert all(p.total == dump.total and p.is_leader and list(p.holds) == ["warmup"] for p in encoded)
    assert sum(len(p.detectors) for p in encoded) == dump.total
