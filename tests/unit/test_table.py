"""DetectorTable against a dict of scalar reference detectors (docs/design.md §2.3)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from supervisor_service.core import DetectorTable, PhiAccrualFailureDetector, PhiAccrualOptions, as_region_array
from supervisor_service.core.table import MERGE_EVERY

U64_MAX = 2**64 - 1
DATANODES = [0, 1, 7, 2**63, U64_MAX]
REGIONS = [0, 1, 2, 3, (1 << 32) | 1, (1 << 32) | 2, 2**63 - 1, 2**63, U64_MAX - 1, U64_MAX]


def arr(ids) -> np.ndarray:
    return as_region_array(list(ids))


ALL_REGIONS = arr(REGIONS)


def created_by_heartbeat(ret) -> set[int] | int:
    """What DetectorTable.heartbeat reports as created: the region ids (an array), or a bare count.

    The return type has been changing while these tests were written (a count, then the ids);
    both forms are checked against the reference, the ids exactly when they are given.
    """
    if isinstance(ret, (int, np.integer)):
        return int(ret)
    ids = np.asarray(ret).tolist()
    assert len(ids) == len(set(ids))
    return set(ids)


def check_created(ret, want_ids) -> None:
    got = created_by_heartbeat(ret)
    assert got == (len(want_ids) if isinstance(got, int) else set(want_ids))


class Reference:
    """The model: one scalar detector per (datanode, region), with the semantics of docs/design.md §2.1."""

    def __init__(self, opts: PhiAccrualOptions) -> None:
        self.opts = opts
        self.fds: dict[tuple[int, int], PhiAccrualFailureDetector] = {}

    def heartbeat(self, d: int, regions, ts: int) -> list[int]:
        created = []
        for r in regions:
            fd = self.fds.get((d, r))
            if fd is None:
                fd = self.fds[(d, r)] = PhiAccrualFailureDetector(self.opts)
                created.append(r)
            fd.heartbeat(ts)
        return created

    def register(self, d: int, regions, ts: int) -> int:
        created = 0
        for r in regions:
            if (d, r) not in self.fds:
                fd = self.fds[(d, r)] = PhiAccrualFailureDetector(self.opts)
                fd.heartbeat(ts)
                created += 1
        return created

    def reset(self, d: int, regions, ts: int) -> None:
        for r in regions:
            fd = self.fds[(d, r)] = PhiAccrualFailureDetector(self.opts)
            fd.heartbeat(ts)

    def deregister(self, d: int, regions) -> int:
        return sum(self.fds.pop((d, r), None) is not None for r in regions)

    def clear(self) -> None:
        self.fds.clear()


def alive_datanodes(table: DetectorTable, ts: int) -> set[int]:
    """Datanodes with at least one available detector at `ts` (what the table's phis say)."""
    threshold = table.opts.threshold
    return {
        d for d in table.datanode_ids()
        if any(phi < threshold for phi in table.phis(d, table.regions_of(d), ts).values())
    }


def assert_same(table: DetectorTable, ref: Reference, query_times) -> None:
    """Every observable of the table agrees with the reference, phi bit for bit."""
    opts = ref.opts
    assert len(table) == len(ref.fds)
    ref_nodes = {d for d, _ in ref.fds}
    assert set(table.datanode_ids()) == ref_nodes
    assert table.group_count <= len(ref.fds)
    assert (table.group_count == 0) == (len(ref.fds) == 0)
    for d in DATANODES:
        want = sorted(r for dd, r in ref.fds if dd == d)
        got = table.regions_of(d)
        assert got.tolist() == want
        for r in REGIONS:
            assert table.contains(d, r) == ((d, r) in ref.fds)
    for t in query_times:
        want_phi = {k: fd.phi(t) for k, fd in ref.fds.items()}
        for (d, r), want in want_phi.items():
            got = table.phi(d, r, t)
            assert got == want, ((d, r), t, got, want)
        failed = set()
        for d, regions in table.failed(t):
            regions = regions.tolist()
            assert regions, "failed() must not yield a datanode without failed regions"
            assert regions == sorted(set(regions))
            failed.update((d, r) for r in regions)
        assert failed == {k for k, phi in want_phi.items() if phi >= opts.threshold}
        assert alive_datanodes(table, t) == {d for (d, _), phi in want_phi.items() if phi < opts.threshold}
        dist = Counter()
        for phi, size in table.phi_sizes(t):
            assert size > 0
            dist[phi] += size
        assert dist == Counter(want_phi.values())
        for d in ref_nodes:
            want = {r: phi for (dd, r), phi in want_phi.items() if dd == d}
            assert table.phis(d, ALL_REGIONS, t) == want


def assert_snapshot_matches(table: DetectorTable, ref: Reference, t: int) -> None:
    snaps = table.snapshot()
    seen = set()
    for snap in snaps:
        assert snap.regions.tolist() == sorted(snap.regions.tolist())
        assert len(snap.regions) == len(snap.gids)
        assert set(snap.gids.tolist()) == set(snap.groups)
        for r, gid in zip(snap.regions.tolist(), snap.gids.tolist()):
            fd = ref.fds[(snap.datanode_id, r)]
            grp = snap.groups[gid]
            h = fd.intervals
            n, total, total_sq = len(h), sum(h), sum(x * x for x in h)
            assert grp.last == fd.last_heartbeat_millis
            assert grp.samples == n
            assert (grp.mean, grp.std) == fd.mean_and_std()
            assert grp.observed_mean == total / n
            assert grp.observed_std == math.sqrt((n * total_sq - total * total) / (n * n))
            assert grp.phi(t) == fd.phi(t)
            seen.add((snap.datanode_id, r))
    assert seen == set(ref.fds)


# ---------------------------------------------------------------- the property test

options_st = st.builds(
    PhiAccrualOptions,
    threshold=st.sampled_from([0.5, 3.0, 8.0, 16.0]),
    min_std_deviation_ms=st.sampled_from([1.0, 10.0, 100.0, 0.5]),
    acceptable_heartbeat_pause_ms=st.sampled_from([0.0, 50.0, 500.0, 2000.0]),
    max_sample_size=st.integers(min_value=2, max_value=6),
    first_heartbeat_estimate_ms=st.sampled_from([100, 1000, 37]),
)

# Forward steps small and large, huge gaps, zero, and backwards (out of order).
delta_st = st.one_of(
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=80, max_value=1200),
    st.sampled_from([100, 1000]),  # exact repeats so windows realign and groups merge
    st.integers(min_value=10_000, max_value=10**7),
    st.just(10**12),
    st.integers(min_value=-5000, max_value=-1),
)
regions_st = st.lists(st.sampled_from(REGIONS), max_size=6, unique=True)
datanode_st = st.sampled_from(DATANODES)


class TableMachine(RuleBasedStateMachine):
    @initialize(opts=options_st, start=st.sampled_from([0, 1_700_000_000_000, -10_000]))
    def setup(self, opts, start):
        self.opts = opts
        self.table = DetectorTable(opts)
        self.ref = Reference(opts)
        self.now = start

    def _ts(self, delta: int) -> int:
        ts = self.now + delta
        self.now = max(self.now, ts)
        return ts

    @rule(d=datanode_st, regions=regions_st, delta=delta_st)
    def heartbeat(self, d, regions, delta):
        ts = self._ts(delta)
        check_created(self.table.heartbeat(d, arr(regions), ts), self.ref.heartbeat(d, regions, ts))

    @rule(d=datanode_st, delta=delta_st, extra=st.lists(st.sampled_from(REGIONS), max_size=2))
    def heartbeat_all(self, d, delta, extra):
        """The steady state: a datanode names every region it has (plus maybe new ones)."""
        ts = self._ts(delta)
        regions = sorted({r for dd, r in self.ref.fds if dd == d} | set(extra))
        check_created(self.table.heartbeat(d, arr(regions), ts), self.ref.heartbeat(d, regions, ts))

    @rule(d=datanode_st, back=st.integers(min_value=0, max_value=3000), subset=st.booleans(), data=st.data())
    def heartbeat_stale(self, d, back, subset, data):
        """Out of order relative to this datanode's own last heartbeat (or exactly equal to it)."""
        known = sorted(r for dd, r in self.ref.fds if dd == d)
        if not known:
            return
        latest = max(self.ref.fds[(d, r)].last_heartbeat_millis for r in known)
        ts = latest - back
        regions = data.draw(st.lists(st.sampled_from(known), min_size=1, unique=True)) if subset else known
        check_created(self.table.heartbeat(d, arr(regions), ts), self.ref.heartbeat(d, regions, ts))

    @rule(d=datanode_st, regions=regions_st, delta=delta_st)
    def register(self, d, regions, delta):
        ts = self._ts(delta)
        assert self.table.register(d, arr(regions), ts) == self.ref.register(d, regions, ts)

    @rule(d=datanode_st, regions=regions_st)
    def deregister(self, d, regions):
        assert self.table.deregister(d, arr(regions)) == self.ref.deregister(d, regions)

    @rule(d=datanode_st, regions=regions_st, delta=delta_st)
    def reset(self, d, regions, delta):
        ts = self._ts(delta)
        self.table.reset(d, arr(regions), ts)
        self.ref.reset(d, regions, ts)

    @rule()
    def clear(self):
        self.table.clear()
        self.ref.clear()

    @invariant()
    def agrees_with_reference(self):
        if not hasattr(self, "table"):
            return
        t = self.now
        query_times = [t - 2000, t, t + 700, t + 3000, t + 20_000, t + 10**12]
        assert_same(self.table, self.ref, query_times)
        assert_snapshot_matches(self.table, self.ref, t + 1500)


TableMachine.TestCase.settings = settings(
    max_examples=150,
    derandomize=True,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_table_matches_scalar_reference = TableMachine.TestCase


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    opts=options_st,
    n_regions=st.integers(min_value=1, max_value=8),
    plan=st.lists(
        st.tuples(st.sampled_from([1000, 1000, 1000, 999, 1500, 50_000]), st.booleans()),
        min_size=1,
        max_size=40,
    ),
)
def test_one_datanode_regular_heartbeats_with_some_partial(opts, n_regions, plan):
    """Mostly full heartbeats, sometimes only the first half: groups split and merge back."""
    table, ref = DetectorTable(opts), Reference(opts)
    regions = REGIONS[:n_regions]
    t = 0
    table.heartbeat(5, arr(regions), t)
    ref.heartbeat(5, regions, t)
    for step, full in plan:
        t += step
        named = regions if full else regions[: max(1, n_regions // 2)]
        table.heartbeat(5, arr(named), t)
        ref.heartbeat(5, named, t)
        # A group is never shared between two states (phi would differ).
        assert_groups_hold_one_state(table, ref, 5)
    assert_same(table, ref, [t, t + 900, t + 5000, t + 60_000])
    # Identical states that heartbeat together merge back: once every window has slid past the
    # divergence (max_sample_size heartbeats) and the next look for identical windows.
    for _ in range(opts.max_sample_size + MERGE_EVERY):
        t += 1000
        table.heartbeat(5, arr(regions), t)
        ref.heartbeat(5, regions, t)
    states = {(fd.last_heartbeat_millis, tuple(fd.intervals)) for fd in ref.fds.values()}
    assert table.group_count == len(states)
    assert_same(table, ref, [t, t + 900, t + 5000])


def assert_groups_hold_one_state(table: DetectorTable, ref: Reference, d: int) -> None:
    """Every history group's members have the same reference state (window and last heartbeat)."""
    for snap in table.snapshot({d}):
        states: dict[int, set] = {}
        for r, g in zip(snap.regions.tolist(), snap.gids.tolist()):
            fd = ref.fds[(d, r)]
            states.setdefault(g, set()).add((fd.last_heartbeat_millis, tuple(fd.intervals)))
        assert all(len(s) == 1 for s in states.values()), states


# ---------------------------------------------------------------- targeted tests

OPTS = PhiAccrualOptions(max_sample_size=4, acceptable_heartbeat_pause_ms=1000, min_std_deviation_ms=50)


def test_regions_of_a_datanode_share_one_group():
    table = DetectorTable(OPTS)
    regions = arr(range(1, 101))
    for i in range(10):
        table.heartbeat(1, regions, i * 1000)
        assert table.group_count == 1
    assert len(table) == 100
    table.heartbeat(2, arr([5, 6]), 0)
    assert table.group_count == 2
    phis = table.phis(1, regions, 9500)
    assert len(set(phis.values())) == 1


def test_heartbeat_reports_what_it_created():
    table = DetectorTable(OPTS)
    check_created(table.heartbeat(1, arr([1, 2, 3]), 0), [1, 2, 3])
    check_created(table.heartbeat(1, arr([1, 2, 3]), 1000), [])
    check_created(table.heartbeat(1, arr([2, 3, 4, U64_MAX]), 2000), [4, U64_MAX])
    check_created(table.heartbeat(2, arr([4]), 500), [4])
    assert len(table) == 6


def test_partial_heartbeat_splits_the_group():
    table, ref = DetectorTable(OPTS), Reference(OPTS)
    table.heartbeat(1, arr([1, 2, 3]), 0)
    ref.heartbeat(1, [1, 2, 3], 0)
    assert table.group_count == 1
    table.heartbeat(1, arr([1]), 1000)
    ref.heartbeat(1, [1], 1000)
    assert table.group_count == 2
    assert table.phi(1, 1, 3000) != table.phi(1, 2, 3000)
    assert table.phi(1, 2, 3000) == table.phi(1, 3, 3000)
    assert_same(table, ref, [1000, 2000, 3000, 10_000])


def test_groups_merge_back_once_windows_realign():
    table, ref = DetectorTable(OPTS), Reference(OPTS)
    regions = [1, 2, 3]

    def beat(named, t):
        table.heartbeat(1, arr(named), t)
        ref.heartbeat(1, named, t)

    beat(regions, 0)
    beat([1], 1000)  # split: region 1 has its own history now
    assert table.group_count == 2
    beat(regions, 2000)  # all named again, but the windows still differ
    assert table.group_count == 2
    # The divergent intervals leave a window of max_sample_size only after that many more beats;
    # the groups merge at the next look for met windows (within MERGE_EVERY heartbeats).
    t = 2000
    for i in range(OPTS.max_sample_size + MERGE_EVERY):
        t += 1000
        beat(regions, t)
        fd1, fd2 = ref.fds[(1, 1)], ref.fds[(1, 2)]
        identical = fd1.intervals == fd2.intervals
        assert identical == (i >= OPTS.max_sample_size - 1)
        if not identical:
            assert table.group_count == 2
        assert_same(table, ref, [t, t + 1500])
    assert table.group_count == 1


def test_groups_merge_when_fresh_regions_match_existing_fresh_group():
    table = DetectorTable(OPTS)
    table.register(1, arr([1, 2]), 500)
    table.register(1, arr([3]), 500)
    # Same seeds, same last heartbeat: identical state, one group.
    assert table.group_count == 1
    table.register(1, arr([4]), 600)
    assert table.group_count == 2


def test_out_of_order_heartbeat_neither_changes_nor_splits():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2, 3]), 5000)
    before = [table.phi(1, r, 7000) for r in (1, 2, 3)]
    table.heartbeat(1, arr([1]), 4000)
    table.heartbeat(1, arr([1, 2, 3]), 4999)
    assert table.group_count == 1
    assert [table.phi(1, r, 7000) for r in (1, 2, 3)] == before
    assert table.snapshot()[0].groups[int(table.snapshot()[0].gids[0])].last == 5000


def test_out_of_order_heartbeat_still_creates_missing_detectors():
    table, ref = DetectorTable(OPTS), Reference(OPTS)
    table.heartbeat(1, arr([1]), 5000)
    ref.heartbeat(1, [1], 5000)
    check_created(table.heartbeat(1, arr([1, 2]), 3000), ref.heartbeat(1, [1, 2], 3000))
    assert_same(table, ref, [3000, 5000, 8000])


def test_register_leaves_existing_detectors_untouched():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1]), 0)
    table.heartbeat(1, arr([1]), 1000)
    before = table.phi(1, 1, 5000)
    assert table.register(1, arr([1, 2]), 4000) == 1
    assert table.phi(1, 1, 5000) == before
    assert table.phi(1, 2, 5000) != before
    assert table.register(1, arr([1, 2]), 4500) == 0


def test_reset_replaces_with_a_fresh_detector():
    table = DetectorTable(OPTS)
    for t in range(0, 10_000, 1000):
        table.heartbeat(1, arr([1, 2]), t)
    table.reset(1, arr([1]), 20_000)
    fresh = PhiAccrualFailureDetector(OPTS)
    fresh.heartbeat(20_000)
    assert table.phi(1, 1, 21_000) == fresh.phi(21_000)
    assert table.phi(1, 2, 21_000) != fresh.phi(21_000)
    assert table.group_count == 2


def test_deregister_drops_empty_datanodes():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2]), 0)
    table.heartbeat(2, arr([3]), 0)
    assert table.deregister(1, arr([1])) == 1
    assert sorted(table.datanode_ids()) == [1, 2]
    assert table.deregister(1, arr([2, 99])) == 1
    assert sorted(table.datanode_ids()) == [2]
    assert table.regions_of(1).size == 0
    assert not table.contains(1, 2)
    assert table.group_count == 1
    assert len(table) == 1
    assert table.deregister(1, arr([1])) == 0
    assert table.deregister(42, arr([1])) == 0


def test_deregister_part_of_a_group_keeps_the_rest():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2, 3]), 0)
    table.heartbeat(1, arr([1, 2, 3]), 1000)
    before = table.phi(1, 3, 5000)
    table.deregister(1, arr([2]))
    assert table.regions_of(1).tolist() == [1, 3]
    assert table.phi(1, 3, 5000) == before
    assert table.group_count == 1
    # A heartbeat of exactly the remaining regions keeps one group.
    table.heartbeat(1, arr([1, 3]), 2000)
    assert table.group_count == 1


def test_empty_region_lists_change_nothing():
    table = DetectorTable(OPTS)
    check_created(table.heartbeat(1, arr([]), 0), [])
    assert table.register(2, arr([]), 0) == 0
    assert table.deregister(3, arr([])) == 0
    assert len(table) == 0
    assert table.datanode_ids() == []
    table.heartbeat(1, arr([1]), 0)
    before = table.phi(1, 1, 5000)
    check_created(table.heartbeat(1, arr([]), 1000), [])
    assert table.datanode_ids() == [1]
    assert table.phi(1, 1, 5000) == before


def test_clear_removes_everything():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2]), 0)
    table.heartbeat(2, arr([3]), 0)
    table.clear()
    assert len(table) == 0
    assert table.group_count == 0
    assert table.datanode_ids() == []
    assert list(table.failed(10**9)) == []
    assert not table.contains(1, 1)


def test_phi_of_a_missing_detector_raises_key_error():
    table = DetectorTable(OPTS)
    with pytest.raises(KeyError):
        table.phi(1, 1, 0)
    table.heartbeat(1, arr([1]), 0)
    with pytest.raises(KeyError):
        table.phi(1, 2, 0)
    with pytest.raises(KeyError):
        table.phi(2, 1, 0)


def test_phis_returns_only_existing_regions():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 3, U64_MAX]), 0)
    got = table.phis(1, arr([0, 1, 2, 3, 4, U64_MAX]), 500)
    assert set(got) == {1, 3, U64_MAX}
    assert all(type(k) is int for k in got)
    assert got[U64_MAX] == table.phi(1, U64_MAX, 500)
    assert table.phis(2, arr([1]), 500) == {}
    assert table.phis(1, arr([]), 500) == {}


def test_failed_yields_only_the_failed_regions_of_a_datanode():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2, 3]), 0)
    for t in range(1000, 60_000, 1000):
        table.heartbeat(1, arr([2]), t)
    failed = {d: r.tolist() for d, r in table.failed(60_000)}
    assert failed == {1: [1, 3]}
    table.heartbeat(1, arr([1, 3]), 60_000)
    assert dict(table.failed(60_000)) == {}
    failed = {d: r.tolist() for d, r in table.failed(10**9)}
    assert failed == {1: [1, 2, 3]}


def test_failed_uses_phi_at_or_above_threshold():
    opts = PhiAccrualOptions(max_sample_size=4)
    table = DetectorTable(opts)
    fd = PhiAccrualFailureDetector(opts)
    table.heartbeat(1, arr([1]), 0)
    fd.heartbeat(0)
    crossing = next(t for t in range(0, 100_000) if fd.phi(t) >= opts.threshold)
    assert dict(table.failed(crossing - 1)) == {}
    assert [d for d, _ in table.failed(crossing)] == [1]
    assert alive_datanodes(table, crossing - 1) == {1}
    assert alive_datanodes(table, crossing) == set()


def test_uint64_edge_region_and_datanode_ids():
    table, ref = DetectorTable(OPTS), Reference(OPTS)
    regions = [0, 2**63 - 1, 2**63, U64_MAX - 1, U64_MAX]
    for t in (0, 1000, 2000):
        table.heartbeat(U64_MAX, arr(regions), t)
        ref.heartbeat(U64_MAX, regions, t)
    table.heartbeat(U64_MAX, arr([U64_MAX]), 3000)
    ref.heartbeat(U64_MAX, [U64_MAX], 3000)
    assert table.regions_of(U64_MAX).tolist() == regions
    assert table.contains(U64_MAX, U64_MAX)
    assert table.contains(U64_MAX, 0)
    assert not table.contains(U64_MAX, 1)
    failed = {d: r.tolist() for d, r in table.failed(3000 + 10**9)}
    assert failed == {U64_MAX: regions}
    assert_same(table, ref, [3000, 5000, 20_000])
    assert table.deregister(U64_MAX, arr([U64_MAX])) == 1
    assert not table.contains(U64_MAX, U64_MAX)
    assert table.contains(U64_MAX, U64_MAX - 1)


def test_as_region_array_sorts_and_deduplicates_uint64():
    got = as_region_array([U64_MAX, 3, 3, 0, 2**63])
    assert got.dtype == np.uint64
    assert got.tolist() == [0, 3, 2**63, U64_MAX]
    assert as_region_array([]).tolist() == []


def test_snapshot_returns_copies():
    table = DetectorTable(OPTS)
    table.heartbeat(1, arr([1, 2]), 0)
    table.heartbeat(1, arr([1, 2]), 1000)
    table.heartbeat(2, arr([5]), 1000)
    snaps = {s.datanode_id: s for s in table.snapshot()}
    regions_before = snaps[1].regions.tolist()
    gid = int(snaps[1].gids[0])
    grp_before = snaps[1].groups[gid]
    phi_before = grp_before.phi(4000)
    # Mutate the table in every way after the snapshot.
    table.heartbeat(1, arr([1]), 2000)
    table.heartbeat(1, arr([1, 2, 3]), 3000)
    table.deregister(1, arr([2]))
    table.clear()
    assert snaps[1].regions.tolist() == regions_before
    assert snaps[1].groups[gid].last == 1000
    assert snaps[1].groups[gid].samples == 3
    assert grp_before.phi(4000) == phi_before
    assert snaps[2].regions.tolist() == [5]
    # Mutating the snapshot's arrays does not reach the table either.
    table.heartbeat(1, arr([1, 2]), 0)
    snap = table.snapshot()[0]
    snap.regions[0] = 77
    snap.gids[:] = 99
    assert table.regions_of(1).tolist() == [1, 2]
    assert table.phi(1, 1, 500) == table.phi(1, 2, 500)


def test_snapshot_filters_datanodes():
    table = DetectorTable(OPTS)
    for d in (1, 2, 3):
        table.heartbeat(d, arr([d * 10]), 0)
    assert sorted(s.datanode_id for s in table.snapshot({1, 3})) == [1, 3]
    assert table.snapshot(set()) == []
    assert sorted(s.datanode_id for s in table.snapshot()) == [1, 2, 3]
    assert table.snapshot({99}) == []


def test_silent_datanodes_need_the_silence_and_one_and_a_half_intervals():
    table = DetectorTable(PhiAccrualOptions())
    for t in range(0, 30_001, 3000):  # datanode 1 every 3 s, datanode 2 every 500 ms up to 30 s
        table.heartbeat(1, arr([1]), t)
    for t in range(0, 30_001, 500):
        table.heartbeat(2, arr([2]), t)
    # 1.5 s of silence is asked for, but datanode 1 is between two regular heartbeats until 1.5 x ~3 s.
    assert table.silent_datanodes(30_000 + 1600, 1500) == [2]
    mean_1 = table.snapshot({1})[0].groups[0].observed_mean
    assert table.silent_datanodes(30_000 + int(1.5 * mean_1) + 1, 1500) == [1, 2]
    # A longer silence setting still rules: 5 s.
    assert table.silent_datanodes(30_000 + 4999, 5000) == []
    assert table.silent_datanodes(30_000 + 5001, 5000) == [1, 2]
