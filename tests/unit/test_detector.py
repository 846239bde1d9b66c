"""Unit tests of the scalar phi accrual failure detector (docs/design.md §2)."""

from __future__ import annotations

import math
import random

import pytest

from supervisor_service.core import (
    PhiAccrualFailureDetector,
    PhiAccrualOptions,
    phi_from,
    stats_from_sums,
)

DEFAULTS = PhiAccrualOptions()
START_MS = 1_700_000_000_000  # a realistic epoch-millis start, as current_time_millis() gives


def _regular_detector(opts: PhiAccrualOptions, count: int, interval: int = 1000, start: int = START_MS):
    fd = PhiAccrualFailureDetector(opts)
    for i in range(count):
        fd.heartbeat(start + i * interval)
    return fd, start + (count - 1) * interval


def _state(fd: PhiAccrualFailureDetector) -> tuple:
    return fd.last_heartbeat_millis, fd.intervals, fd.mean_and_std()


# ---------------------------------------------------------------- options


def test_default_options_match_design():
    assert DEFAULTS.threshold == 8.0
    assert DEFAULTS.min_std_deviation_ms == 100
    assert DEFAULTS.acceptable_heartbeat_pause_ms == 10_000
    assert DEFAULTS.max_sample_size == 1000
    assert DEFAULTS.first_heartbeat_estimate_ms == 1000
    assert DEFAULTS.seed_intervals() == (750, 1250)


def test_detector_without_options_uses_defaults():
    assert PhiAccrualFailureDetector().opts == DEFAULTS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": -1.0},
        {"threshold": math.nan},
        {"min_std_deviation_ms": 0.0},
        {"min_std_deviation_ms": -5.0},
        {"min_std_deviation_ms": math.nan},
        {"acceptable_heartbeat_pause_ms": -1.0},
        {"acceptable_heartbeat_pause_ms": math.nan},
        {"max_sample_size": 1},
        {"max_sample_size": 0},
        {"max_sample_size": -3},
        {"first_heartbeat_estimate_ms": 0},
        {"first_heartbeat_estimate_ms": -1000},
    ],
)
def test_invalid_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        PhiAccrualOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1e-9},
        {"min_std_deviation_ms": 1e-9},
        {"acceptable_heartbeat_pause_ms": 0.0},
        {"max_sample_size": 2},
        {"first_heartbeat_estimate_ms": 1},
    ],
)
def test_boundary_options_are_accepted(kwargs):
    PhiAccrualOptions(**kwargs)


@pytest.mark.parametrize("est, seeds", [(1000, (750, 1250)), (400, (300, 500)), (1001, (751, 1251)), (3, (3, 3))])
def test_seed_intervals_are_est_minus_and_plus_a_quarter(est, seeds):
    assert PhiAccrualOptions(first_heartbeat_estimate_ms=est).seed_intervals() == seeds


# ---------------------------------------------------------------- phi_from check values


@pytest.mark.parametrize(
    "diff, expected",
    [(0, 0.0), (500, 0.1), (1000, 0.3), (1200, 1.6), (1400, 4.7), (1600, 10.8), (1700, 15.3)],
)
def test_phi_from_check_values_mean_1000_std_100(diff, expected):
    assert phi_from(diff, 1000.0, 100.0) == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize("diff, cdf", [(0, 0.5), (6, 0.7257), (15, 0.9332), (20, 0.97725)])
def test_phi_from_check_values_mean_0_std_10(diff, cdf):
    assert 1 - 10 ** -phi_from(diff, 0.0, 10.0) == pytest.approx(cdf, abs=1e-3)


def test_phi_from_at_the_mean_is_log10_of_two():
    # diff == mean takes the `else` branch: p = 1 - 1/2.
    assert phi_from(1000, 1000.0, 100.0) == pytest.approx(math.log10(2), abs=1e-15)


def test_phi_from_is_monotonic_in_diff():
    diffs = range(-5000, 5000, 7)
    phis = [phi_from(d, 1000.0, 100.0) for d in diffs]
    assert all(a <= b for a, b in zip(phis, phis[1:]))
    assert phis[0] == 0.0 and phis[-1] == math.inf


@pytest.mark.parametrize("diff", [1e12, 10**12, 1e15, 1e300, 2**62])
def test_phi_from_far_past_the_mean_is_inf_without_exception(diff):
    assert phi_from(diff, 11_000.0, 100.0) == math.inf


@pytest.mark.parametrize("diff", [-1e12, -(10**12), -1e300, 0, -(2**62)])
def test_phi_from_far_below_the_mean_is_zero(diff):
    phi = phi_from(diff, 11_000.0, 100.0)
    assert phi == 0.0
    assert math.copysign(1.0, phi) == 1.0  # not -0.0


def test_phi_from_never_negative_nor_nan():
    for diff in range(-20_000, 40_000, 13):
        phi = phi_from(diff, 11_000.0, 100.0)
        assert phi >= 0.0 and not math.isnan(phi)
        assert math.copysign(1.0, phi) == 1.0


# ---------------------------------------------------------------- stats_from_sums


def test_stats_from_sums_of_the_design_history():
    history = [100, 200, 125, 340, 130]
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1)
    mean, std = stats_from_sums(len(history), sum(history), sum(x * x for x in history), opts)
    assert mean == 179.0
    assert std * std == pytest.approx(7584.0, rel=1e-12)
    assert std == math.sqrt(7584)


def test_stats_from_sums_adds_the_pause_and_floors_the_std():
    history = [100, 200, 125, 340, 130]
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=10_000, min_std_deviation_ms=100)
    mean, std = stats_from_sums(len(history), sum(history), sum(x * x for x in history), opts)
    assert mean == 10_179.0
    assert std == 100.0  # sqrt(7584) ~ 87.1 is below the floor


def test_stats_from_sums_is_population_not_sample_variance():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1e-9)
    # [0, 2]: population variance 1, sample variance 2.
    assert stats_from_sums(2, 2, 4, opts) == (1.0, 1.0)


def test_stats_from_sums_is_exact_for_large_intervals():
    # Naive float E[x^2] - E[x]^2 cancels catastrophically here; the integer form does not.
    base = 10**12
    history = [base, base + 2, base + 4]
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1e-9)
    mean, std = stats_from_sums(3, sum(history), sum(x * x for x in history), opts)
    assert mean == base + 2
    assert std == pytest.approx(math.sqrt(8 / 3), rel=1e-12)


# ---------------------------------------------------------------- detector: the design history


def test_detector_history_mean_179_variance_7584():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1, max_sample_size=5)
    fd = PhiAccrualFailureDetector(opts)
    t = 0
    fd.heartbeat(t)
    assert fd.intervals == [750, 1250]
    for interval in [100, 200, 125, 340, 130]:
        assert fd.is_available(t + interval)  # otherwise the interval would not be recorded
        t += interval
        fd.heartbeat(t)
    # The two seeds have fallen out of the five-sample window.
    assert fd.intervals == [100, 200, 125, 340, 130]
    mean, std = fd.mean_and_std()
    assert mean == 179.0
    assert std == math.sqrt(7584)
    assert std * std == pytest.approx(7584.0, rel=1e-12)
    for diff in (0, 100, 179, 300, 500, 1000):
        assert fd.phi(t + diff) == phi_from(diff, 179.0, math.sqrt(7584))


def test_detector_stats_agree_with_stats_from_sums():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1, max_sample_size=5)
    fd = PhiAccrualFailureDetector(opts)
    rng = random.Random(7)
    t = 0
    fd.heartbeat(t)
    for _ in range(50):
        t += rng.randint(50, 400)
        fd.heartbeat(t)
        h = fd.intervals
        assert fd.mean_and_std() == stats_from_sums(len(h), sum(h), sum(x * x for x in h), opts)


# ---------------------------------------------------------------- detector: scenarios


def test_phi_is_zero_before_the_first_heartbeat():
    fd = PhiAccrualFailureDetector()
    for t in (0, 1, START_MS, 10**15):
        assert fd.phi(t) == 0.0
        assert fd.is_available(t)
    assert fd.last_heartbeat_millis is None
    assert fd.intervals == []


def test_mean_and_std_before_the_first_heartbeat_raises():
    with pytest.raises(ValueError):
        PhiAccrualFailureDetector().mean_and_std()


def test_first_heartbeat_seeds_750_and_1250():
    fd = PhiAccrualFailureDetector()
    fd.heartbeat(START_MS)
    assert fd.intervals == [750, 1250]
    assert fd.last_heartbeat_millis == START_MS
    # mean 1000 + pause 10000; population std 250 (above the 100 floor).
    assert fd.mean_and_std() == (11_000.0, 250.0)
    assert fd.phi(START_MS + 4321) == phi_from(4321, 11_000.0, 250.0)


def test_first_heartbeat_seeds_follow_the_estimate():
    fd = PhiAccrualFailureDetector(PhiAccrualOptions(first_heartbeat_estimate_ms=400))
    fd.heartbeat(5)
    assert fd.intervals == [300, 500]
    assert fd.last_heartbeat_millis == 5


def test_first_heartbeat_at_time_zero_and_negative_is_recorded():
    fd = PhiAccrualFailureDetector()
    fd.heartbeat(0)
    assert fd.last_heartbeat_millis == 0
    fd2 = PhiAccrualFailureDetector()
    fd2.heartbeat(-50)
    assert fd2.last_heartbeat_millis == -50
    assert fd2.intervals == [750, 1250]


def test_second_heartbeat_appends_the_interval():
    fd = PhiAccrualFailureDetector()
    fd.heartbeat(1000)
    fd.heartbeat(1900)
    assert fd.intervals == [750, 1250, 900]
    assert fd.last_heartbeat_millis == 1900


def test_heartbeat_at_the_same_time_appends_a_zero_interval():
    # t == last is not "t < last": the call is not ignored.
    fd = PhiAccrualFailureDetector()
    fd.heartbeat(1000)
    fd.heartbeat(1000)
    assert fd.intervals == [750, 1250, 0]
    assert fd.last_heartbeat_millis == 1000


def test_missed_heartbeats_make_phi_grow_monotonically_and_cross_the_threshold():
    fd, last = _regular_detector(DEFAULTS, 100)
    phis = [fd.phi(last + d) for d in range(0, 30_001, 50)]
    assert all(a <= b for a, b in zip(phis, phis[1:]))
    assert phis[0] == 0.0
    assert phis[-1] > DEFAULTS.threshold
    crossing = next(i for i, p in enumerate(phis) if p >= DEFAULTS.threshold)
    assert 0 < crossing
    # is_available flips exactly where phi reaches the threshold.
    for i, p in enumerate(phis):
        assert fd.is_available(last + i * 50) == (i < crossing)
        assert fd.is_available(last + i * 50) == (p < DEFAULTS.threshold)
    # With mean 1000 + 10000 pause and std 100, the crossing is between 11 and 12 s.
    assert 11_000 < crossing * 50 < 12_000


def test_phi_strictly_increases_past_the_mean():
    fd, last = _regular_detector(DEFAULTS, 20)
    mean, _ = fd.mean_and_std()
    phis = [fd.phi(last + int(mean) + d) for d in range(0, 800, 25)]
    assert all(a < b for a, b in zip(phis, phis[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_reference_test_heartbeat(seed):
    """Port of test_heartbeat in the Rust original: 2000 heartbeats, 1 s apart with 0-100 ms jitter."""
    rng = random.Random(seed)
    start = START_MS
    stamps = [start + i * 1000 + rng.randrange(0, 100) for i in range(2000)]
    fd = PhiAccrualFailureDetector(DEFAULTS)
    for ts in stamps:
        fd.heartbeat(ts)
    assert len(fd.intervals) == DEFAULTS.max_sample_size
    last = stamps[-1]
    assert fd.last_heartbeat_millis == last
    pause = int(DEFAULTS.acceptable_heartbeat_pause_ms)
    # Within the acceptable pause, phi is exactly zero ...
    for i in range(1, pause // 1000 + 1):
        assert fd.phi(last + i * 1000) == 0.0
    # ... then in less than two seconds it is above the threshold.
    assert fd.phi(last + pause + 1000) < DEFAULTS.threshold
    assert fd.phi(last + pause + 2000) > DEFAULTS.threshold


def test_recovery_after_a_failure():
    fd, last = _regular_detector(DEFAULTS, 30)
    before = fd.intervals
    gap = 60_000
    assert fd.phi(last + gap) >= DEFAULTS.threshold
    assert not fd.is_available(last + gap)
    fd.heartbeat(last + gap)
    # The long gap is not a sample (is_available was false) ...
    assert fd.intervals == before
    # ... but the heartbeat counts: last moves, phi drops back.
    assert fd.last_heartbeat_millis == last + gap
    assert fd.phi(last + gap) == 0.0
    assert fd.phi(last + gap + 1000) < 1.0
    assert fd.is_available(last + gap + 1000)
    # Regular heartbeats afterwards are recorded again.
    fd.heartbeat(last + gap + 1000)
    assert fd.intervals == (before + [1000])[-DEFAULTS.max_sample_size :]


def test_interval_recorded_only_while_available_boundary():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=100)
    fd = PhiAccrualFailureDetector(opts)
    fd.heartbeat(0)
    # Find the first diff with phi >= threshold; one ms before it is still recorded.
    crossing = next(d for d in range(0, 100_000) if fd.phi(d) >= opts.threshold)
    just_available = PhiAccrualFailureDetector(opts)
    just_available.heartbeat(0)
    just_available.heartbeat(crossing - 1)
    assert just_available.intervals == [750, 1250, crossing - 1]
    unavailable = PhiAccrualFailureDetector(opts)
    unavailable.heartbeat(0)
    unavailable.heartbeat(crossing)
    assert unavailable.intervals == [750, 1250]
    assert unavailable.last_heartbeat_millis == crossing


def test_out_of_order_heartbeat_is_ignored_entirely():
    fd, last = _regular_detector(DEFAULTS, 10)
    before = _state(fd)
    phis_before = [fd.phi(last + d) for d in (0, 500, 5000, 12_000, 20_000)]
    for ts in (last - 1, last - 1000, last - 10**9, 0, -1):
        fd.heartbeat(ts)
        assert _state(fd) == before
        assert [fd.phi(last + d) for d in (0, 500, 5000, 12_000, 20_000)] == phis_before


def test_out_of_order_heartbeat_after_a_failure_does_not_recover_it():
    fd, last = _regular_detector(DEFAULTS, 10)
    late = last + 60_000
    assert not fd.is_available(late)
    fd.heartbeat(last - 1)
    assert not fd.is_available(late)
    assert fd.last_heartbeat_millis == last


def test_window_cap_drops_the_oldest():
    opts = PhiAccrualOptions(max_sample_size=3)
    fd = PhiAccrualFailureDetector(opts)
    fd.heartbeat(0)
    assert fd.intervals == [750, 1250]
    fd.heartbeat(100)
    assert fd.intervals == [750, 1250, 100]
    fd.heartbeat(300)
    assert fd.intervals == [1250, 100, 200]
    fd.heartbeat(600)
    assert fd.intervals == [100, 200, 300]
    fd.heartbeat(1000)
    assert fd.intervals == [200, 300, 400]
    # The sums follow the window, not the whole history.
    mean, std = fd.mean_and_std()
    assert mean == 300.0 + opts.acceptable_heartbeat_pause_ms
    assert std == max(math.sqrt(20_000 / 3), opts.min_std_deviation_ms)


def test_window_cap_of_two_replaces_the_seeds():
    opts = PhiAccrualOptions(max_sample_size=2, acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=1)
    fd = PhiAccrualFailureDetector(opts)
    fd.heartbeat(0)
    fd.heartbeat(900)
    fd.heartbeat(1900)
    assert fd.intervals == [900, 1000]
    assert fd.mean_and_std() == (950.0, 50.0)


def test_window_never_exceeds_max_sample_size():
    opts = PhiAccrualOptions(max_sample_size=4)
    fd = PhiAccrualFailureDetector(opts)
    for i in range(50):
        fd.heartbeat(i * 1000)
        assert len(fd.intervals) == min(2 + i, 4)


def test_extreme_gap_gives_inf_without_exception():
    fd, last = _regular_detector(DEFAULTS, 10)
    assert fd.phi(last + 10**12) == math.inf
    assert fd.phi(last + int(1e12)) == math.inf
    assert not fd.is_available(last + 10**12)
    # A heartbeat after that gap is not recorded as an interval, and nothing raises.
    before = fd.intervals
    fd.heartbeat(last + 10**12)
    assert fd.intervals == before
    assert fd.phi(last + 10**12) == 0.0


def test_far_below_the_mean_gives_zero():
    fd, last = _regular_detector(DEFAULTS, 10)
    assert fd.phi(last) == 0.0
    assert fd.phi(last + 1) == 0.0
    # A query before the last heartbeat (negative diff), even absurdly far, is 0, not an error.
    assert fd.phi(last - 10**12) == 0.0
    assert fd.is_available(last - 10**12)


def test_phi_uses_mean_plus_pause_and_floored_std():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=3000, min_std_deviation_ms=100)
    fd, last = _regular_detector(opts, 50, interval=1000)
    # The 1000-sample window still holds the two seeds, so the observed std is small but not 0.
    h = fd.intervals
    n, total, total_sq = len(h), sum(h), sum(x * x for x in h)
    mean = total / n + 3000
    std = max(math.sqrt((n * total_sq - total * total) / (n * n)), 100)
    assert fd.mean_and_std() == (mean, std)
    for diff in (0, 2000, 4000, 4100, 4500, 5000):
        assert fd.phi(last + diff) == phi_from(diff, mean, std)


def test_min_std_floor_applies_to_a_perfectly_regular_history():
    opts = PhiAccrualOptions(acceptable_heartbeat_pause_ms=0, min_std_deviation_ms=100, max_sample_size=5)
    fd, last = _regular_detector(opts, 20, interval=1000)
    assert fd.intervals == [1000] * 5
    assert fd.mean_and_std() == (1000.0, 100.0)
    assert fd.phi(last + 1600) == pytest.approx(10.8, abs=0.1)

