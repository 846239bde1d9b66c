"""The history groups over a shared interval log (core.history) and the due-time bound (core.phivec),
against scalar reference detectors: long runs (the log trims), regions joining one heartbeat apart,
skipped and missed intervals, wide intervals, the phi distribution metric."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import supervisor_service.core.table as table_module
from supervisor_service.core import PHI_BUCKETS, DetectorTable, PhiAccrualFailureDetector, PhiAccrualOptions
from supervisor_service.core.detector import phi_from
from supervisor_service.core.phivec import at_or_above, phi_array, safe_y
from supervisor_service.core.table import MERGE_EVERY, SILENT_INTERVALS

REGIONS = list(range(8))


def ids(regions) -> np.ndarray:
    return np.array(sorted(regions), dtype=np.uint64)


def reference_buckets(phis: list[float]) -> list[int]:
    buckets = [0] * len(PHI_BUCKETS)
    for phi in phis:
        buckets[next(i for i, bound in enumerate(PHI_BUCKETS) if phi <= bound)] += 1
    return buckets


class LongRuns(RuleBasedStateMachine):
    """Hundreds of heartbeats per datanode, so windows slide, seeds leave and the log trims."""

    @initialize(
        cap=st.integers(2, 9),
        est=st.sampled_from([1000, 1001, 3]),
        threshold=st.sampled_from([1.0, 8.0, 0.2]),
        pause=st.sampled_from([0.0, 500.0]),
    )
    def setup(self, cap: int, est: int, threshold: float, pause: float) -> None:
        self.opts = PhiAccrualOptions(
            threshold=threshold, min_std_deviation_ms=50.0, acceptable_heartbeat_pause_ms=pause,
            max_sample_size=cap, first_heartbeat_estimate_ms=est,
        )
        self.table = DetectorTable(self.opts)
        self.ref: dict[tuple[int, int], PhiAccrualFailureDetector] = {}
        self.now = 1_700_000_000_000

    def _beat(self, dn: int, regions: list[int], ts: int, create: bool = True) -> None:
        created = self.table.heartbeat(dn, ids(regions), ts, create=create)
        expect = []
        for r in sorted(regions):
            det = self.ref.get((dn, r))
            if det is None:
                if not create:
                    continue
                det = self.ref[(dn, r)] = PhiAccrualFailureDetector(self.opts)
                expect.append(r)
            det.heartbeat(ts)
        assert created.tolist() == expect

    def _known(self, dn: int) -> list[int]:
        return sorted(r for d, r in self.ref if d == dn)

    @rule(dn=st.sampled_from([0, 1]), beats=st.integers(1, 120), jitter=st.sampled_from([0, 1, 40]),
          base=st.sampled_from([1000, 3000, 20]))
    def steady(self, dn: int, beats: int, jitter: int, base: int) -> None:
        """Regular heartbeats naming every region the datanode has (the common case)."""
        known = self._known(dn)
        if not known:
            return
        for i in range(beats):
            self.now += base + (i * 7919) % (jitter + 1)
            self._beat(dn, known, self.now)

    @rule(dn=st.sampled_from([0, 1]), region=st.sampled_from(REGIONS), step=st.integers(0, 3000))
    def join_by_heartbeat(self, dn: int, region: int, step: int) -> None:
        self.now += step
        self._beat(dn, sorted(set(self._known(dn)) | {region}), self.now)

    @rule(dn=st.sampled_from([0, 1]), regions=st.sets(st.sampled_from(REGIONS), min_size=1),
          step=st.integers(-500, 3000))
    def register(self, dn: int, regions: set[int], step: int) -> None:
        """The metasrv registers between two heartbeats (or at a time behind the last one)."""
        ts = self.now + step
        self.now = max(self.now, ts)
        n = self.table.register(dn, ids(regions), ts)
        new = [r for r in regions if (dn, r) not in self.ref]
        for r in new:
            det = self.ref[(dn, r)] = PhiAccrualFailureDetector(self.opts)
            det.heartbeat(ts)
        assert n == len(new)

    @rule(dn=st.sampled_from([0, 1]), data=st.data(), step=st.integers(0, 3000), create=st.booleans())
    def some_missed(self, dn: int, data: st.DataObject, step: int, create: bool) -> None:
        """A heartbeat naming only some regions: the others miss an interval."""
        known = self._known(dn)
        if not known:
            return
        named = data.draw(st.lists(st.sampled_from(known), min_size=1, unique=True))
        self.now += step
        self._beat(dn, named, self.now, create=create)

    @rule(dn=st.sampled_from([0, 1]), step=st.sampled_from([20_000, 200_000, 10**8]))
    def long_pause(self, dn: int, step: int) -> None:
        """A gap past the threshold: the interval is skipped (or, with a big pause, taken and wide)."""
        self.now += step
        known = self._known(dn)
        if known:
            self._beat(dn, known, self.now)

    @rule(dn=st.sampled_from([0, 1]), back=st.integers(0, 2000))
    def stale(self, dn: int, back: int) -> None:
        known = self._known(dn)
        if known:
            self._beat(dn, known, self.now - back)

    @rule(dn=st.sampled_from([0, 1]), regions=st.sets(st.sampled_from(REGIONS), min_size=1))
    def leave(self, dn: int, regions: set[int]) -> None:
        n = self.table.deregister(dn, ids(regions))
        assert n == sum(self.ref.pop((dn, r), None) is not None for r in regions)

    @rule(dn=st.sampled_from([0, 1]), regions=st.sets(st.sampled_from(REGIONS), min_size=1))
    def reset(self, dn: int, regions: set[int]) -> None:
        self.table.reset(dn, ids(regions), self.now)
        for r in regions:
            det = self.ref[(dn, r)] = PhiAccrualFailureDetector(self.opts)
            det.heartbeat(self.now)

    @rule(dn=st.sampled_from([0, 1]))
    def rebaseline(self, dn: int) -> None:
        self.table.rebaseline([dn], self.now)
        for r in self._known(dn):
            det = self.ref[(dn, r)] = PhiAccrualFailureDetector(self.opts)
            det.heartbeat(self.now)

    @invariant()
    def same_as_reference(self) -> None:
        table, ref, opts = self.table, self.ref, self.opts
        assert len(table) == len(ref)
        assert table.group_count == sum(node.groups for node in table._nodes.values())
        assert table.datanode_count == len({d for d, _ in ref})
        for at in (self.now, self.now + 700, self.now + 2500, self.now + 40_000):
            want = {k: det.phi(at) for k, det in ref.items()}
            for (dn, r), phi in want.items():
                assert table.phi(dn, r, at) == phi, (dn, r, at)
            failed = {(dn, r) for dn, rs in table.failed(at) for r in rs.tolist()}
            assert failed == {k for k, phi in want.items() if phi >= opts.threshold}
            sizes = Counter()
            for phi, size in table.phi_sizes(at):
                sizes[phi] += size
            assert sizes == Counter(want.values())
            buckets, count, _ = table.phi_distribution(at, PHI_BUCKETS)
            assert count == len(want)
            assert buckets == reference_buckets(list(want.values()))
            silent = set(table.silent_datanodes(at, 1000))
            assert silent == self._silent(at, 1000)
        for node in table._nodes.values():
            # The log keeps no more than the windows need, and some room.
            assert node.log.buf.size <= 2 * (opts.max_sample_size * 3 + 64)
            # Each window's parts add up to its count, and every part it reads is still kept.
            live = node.size > 0
            parts = node.seeds + (node.oend - node.ostart) + node.plen + (node.end - node.start)
            assert (parts[live] == node.n[live]).all()
            cur, older = live & (node.end > node.start), live & (node.oend > node.ostart)
            assert (node.start[cur] >= node.log.base).all() and (node.ostart[older] >= node.log.base).all()
            assert (node.end[live] <= node.log.size).all() and (node.oend[live] <= node.log.size).all()
            assert ((node.pstart + node.plen)[live] <= node.priv.used).all()

    def _silent(self, at: int, silence_ms: int) -> set[int]:
        out = set()
        for dn in {d for d, _ in self.ref}:
            dets = [det for (d, _), det in self.ref.items() if d == dn]
            newest = max(det.last_heartbeat_millis for det in dets)
            # The longest mean interval of the detectors that heard the newest heartbeat.
            mean = max(sum(det.intervals) / len(det.intervals) for det in dets if det.last_heartbeat_millis == newest)
            quiet = at - newest
            if quiet > silence_ms and quiet > SILENT_INTERVALS * mean:
                out.add(dn)
        return out


LongRuns.TestCase.settings = settings(
    max_examples=120, stateful_step_count=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_long_runs_match_the_reference = LongRuns.TestCase


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(
    threshold=st.one_of(st.floats(1e-6, 1000.0), st.sampled_from([8.0, 0.30103, 323.3, 324.0, 1000.0])),
    mean=st.floats(0.0, 1e9),
    std=st.floats(1e-3, 1e8),
)
def test_below_the_due_time_phi_is_under_the_threshold(threshold: float, mean: float, std: float) -> None:
    """The bound the table relies on to skip phi: any diff under mean + safe_y * std gives phi < T;
    and it is not loose (a millisecond-scale step past it reaches T, where phi is finite)."""
    y = safe_y(threshold)
    reach = mean + y * std
    for diff in (math.floor(reach) - 1, math.floor(reach) - 2, math.floor(reach) - 1000):
        assert phi_from(diff, mean, std) < threshold, (diff, reach)
    if threshold < 300:
        past = reach + 1e-5 * max(1.0, abs(y)) * std + 1
        assert phi_from(math.ceil(past), mean, std) >= threshold


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    diffs=st.lists(st.integers(-10**9, 10**9), min_size=1, max_size=50),
    mean=st.floats(0.0, 1e7),
    std=st.floats(0.1, 1e6),
    threshold=st.floats(0.01, 50.0),
)
def test_vector_phi_and_decisions_agree_with_the_scalar(diffs, mean, std, threshold) -> None:
    d = np.array(diffs, dtype=np.float64)
    m, s = np.full(d.size, mean), np.full(d.size, std)
    want = [phi_from(x, mean, std) for x in diffs]
    got = phi_array(d, m, s).tolist()
    for a, b in zip(got, want):
        assert a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    assert at_or_above(d, m, s, threshold).tolist() == [p >= threshold for p in want]


def test_regions_joined_one_heartbeat_apart_stay_on_the_log_and_merge_once_full() -> None:
    """The case that made a history group per region: no private prefix, phi bit for bit, and one
    group again once every window is full of the same log entries."""
    opts = PhiAccrualOptions(max_sample_size=50)
    table = DetectorTable(opts)
    ref: dict[int, PhiAccrualFailureDetector] = {}
    ts = 0
    for i in range(40):
        ts += 3000 + i % 3
        table.heartbeat(7, np.arange(i + 1, dtype=np.uint64), ts)
        ref[i] = PhiAccrualFailureDetector(opts)
        for det in ref.values():
            det.heartbeat(ts)
    node = table._nodes[7]
    assert not node.plen.any()
    assert table.group_count == 40
    for at in (ts, ts + 5000, ts + 15_000, ts + 40_000):
        assert [table.phi(7, r, at) for r in range(40)] == [ref[r].phi(at) for r in range(40)]
    for _ in range(opts.max_sample_size + MERGE_EVERY):
        ts += 3000
        table.heartbeat(7, np.arange(40, dtype=np.uint64), ts)
        for det in ref.values():
            det.heartbeat(ts)
    assert table.group_count == 1
    assert [table.phi(7, r, ts + 9000) for r in range(40)] == [ref[r].phi(ts + 9000) for r in range(40)]


def test_alternating_halves_keep_two_groups() -> None:
    """Heartbeats naming one half, then the other: two histories, not one per region."""
    opts = PhiAccrualOptions(max_sample_size=20, acceptable_heartbeat_pause_ms=5000)
    table = DetectorTable(opts)
    regions = np.arange(100, dtype=np.uint64)
    ref = {r: PhiAccrualFailureDetector(opts) for r in range(100)}
    ts = 0
    table.heartbeat(1, regions, ts)
    for det in ref.values():
        det.heartbeat(ts)
    for i in range(200):
        ts += 1000
        half = regions[i % 2 :: 2]
        table.heartbeat(1, half, ts)
        for r in half.tolist():
            ref[r].heartbeat(ts)
        assert table.group_count <= 2
    assert table.phis(1, regions, ts + 3000) == {r: det.phi(ts + 3000) for r, det in ref.items()}


def test_a_region_silent_for_many_windows_comes_back_exactly() -> None:
    """A region left out of the heartbeats for much longer than the log keeps (it trims): when it
    is named again its window is still the reference's."""
    opts = PhiAccrualOptions(max_sample_size=5, acceptable_heartbeat_pause_ms=10**9)
    table = DetectorTable(opts)
    a, b = PhiAccrualFailureDetector(opts), PhiAccrualFailureDetector(opts)
    ts = 0
    table.heartbeat(1, ids([1, 2]), ts)
    a.heartbeat(ts)
    b.heartbeat(ts)
    for i in range(500):
        ts += 1000 + i % 5
        table.heartbeat(1, ids([1]), ts)
        a.heartbeat(ts)
    assert table._nodes[1].log.buf.size < 200
    ts += 1000
    table.heartbeat(1, ids([1, 2]), ts)
    a.heartbeat(ts)
    b.heartbeat(ts)
    for at in (ts, ts + 2000, ts + 10**6):
        assert table.phi(1, 1, at) == a.phi(at)
        assert table.phi(1, 2, at) == b.phi(at)


def test_wide_intervals_fall_back_to_python_ints() -> None:
    """Intervals too large for exact int64 variance switch the datanode's sums to Python ints."""
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=86_400_000, max_sample_size=1000)
    table = DetectorTable(opts)
    det = PhiAccrualFailureDetector(opts)
    for ts in (0, 10_000_000, 30_000_000, 60_000_000, 61_000_000):
        table.heartbeat(0, ids([5]), ts)
        det.heartbeat(ts)
    assert table._nodes[0].wide
    for at in (61_000_000, 90_000_000, 200_000_000):
        assert table.phi(0, 5, at) == det.phi(at)
        assert bool(dict(table.failed(at))) == (det.phi(at) >= opts.threshold)


def test_the_phi_distribution_sweeps_a_big_table_over_several_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "PHI_SWEEP_GROUPS", 40)
    opts = PhiAccrualOptions()
    table = DetectorTable(opts)
    for dn in range(10):  # 10 datanodes of 5 groups each (regions joined one heartbeat apart)
        for i in range(5):
            table.heartbeat(dn, np.arange(i + 1, dtype=np.uint64), 1000 * i)
    at = 12_500  # some finite phi, some above every bound
    want = reference_buckets([phi for phi, size in table.phi_sizes(at) for _ in range(size)])
    calls = 0
    while True:
        calls += 1
        buckets, count, total = table.phi_distribution(at, PHI_BUCKETS)
        if count:
            break
        assert buckets == [0] * len(PHI_BUCKETS)  # nothing published before the first sweep ends
    assert calls > 1
    assert (buckets, count) == (want, 50)
    finite = [(phi, size) for phi, size in table.phi_sizes(at) if math.isfinite(phi)]
    assert finite and total == pytest.approx(sum(phi * size for phi, size in finite), rel=1e-12)


def test_a_region_left_out_of_every_tenth_heartbeat_stays_exact_and_bounded() -> None:
    """The region set changes every 10th heartbeat (one region left out, in turn): each time one
    group diverges and gets a private prefix; the prefixes drain and the buffer holding them is
    rebuilt, so memory stays bounded over many windows."""
    opts = PhiAccrualOptions(max_sample_size=200)
    table = DetectorTable(opts)
    regions = list(range(50))
    ref = {r: PhiAccrualFailureDetector(opts) for r in regions}
    ts = 0
    peak = 0
    for i in range(3000):
        ts += 1000 + i % 7
        named = [r for r in regions if i % 10 != 9 or r != (i // 10) % 50]
        table.heartbeat(3, ids(named), ts)
        for r in named:
            ref[r].heartbeat(ts)
        peak = max(peak, table._nodes[3].priv.buf.size)
    # At most ~20 groups diverged at once, each with under 200 private entries.
    assert peak <= 2 * (4 * 20 * 200 + 4096)
    assert table.phis(3, ids(regions), ts + 5000) == {r: d.phi(ts + 5000) for r, d in ref.items()}
    assert {r for _, rs in table.failed(ts + 40_000) for r in rs.tolist()} == {
        r for r, d in ref.items() if d.phi(ts + 40_000) >= opts.threshold
    }
