"""Phi accrual failure detector: the scalar reference (docs/design.md §2).

This is the definition every faster structure is checked against. Time is in
integer milliseconds. The population variance is computed exactly with
integers and rounded once, so any structure that keeps the same integer sums
gets the same bits.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from supervisor_service.core.options import option


@dataclass(frozen=True, slots=True)
class PhiAccrualOptions:
    """Options of one detector (Akka's and GreptimeDB's defaults)."""

    threshold: float = option(
        8.0, gt=0, le=1000, setting="phi_threshold", doc="phi at or above which a region counts as failed."
    )
    # A floor, so that a very regular history does not make phi jumpy.
    min_std_deviation_ms: float = option(
        100.0, gt=0, le=3_600_000, doc="Floor of the heartbeat interval standard deviation."
    )
    # Added to the mean interval: a GC or network hiccup this long is tolerated.
    acceptable_heartbeat_pause_ms: float = option(
        10_000.0, ge=0, le=86_400_000, doc="Heartbeat pause tolerated on top of the mean interval."
    )
    max_sample_size: int = option(1000, ge=2, le=100_000, doc="Heartbeat intervals kept per detector.")
    first_heartbeat_estimate_ms: int = option(
        1000, ge=1, le=3_600_000, doc="Interval assumed before one is seen (seeds the history with est -/+ est/4)."
    )

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if not self.min_std_deviation_ms > 0:
            raise ValueError(f"min_std_deviation_ms must be > 0, got {self.min_std_deviation_ms}")
        if not self.acceptable_heartbeat_pause_ms >= 0:
            raise ValueError(
                f"acceptable_heartbeat_pause_ms must be >= 0, got {self.acceptable_heartbeat_pause_ms}"
            )
        if self.max_sample_size < 2:
            raise ValueError(f"max_sample_size must be >= 2, got {self.max_sample_size}")
        if self.first_heartbeat_estimate_ms <= 0:
            raise ValueError(
                f"first_heartbeat_estimate_ms must be > 0, got {self.first_heartbeat_estimate_ms}"
            )

    def seed_intervals(self) -> tuple[int, int]:
        """The two samples a history starts with."""
        est = self.first_heartbeat_estimate_ms
        return est - est // 4, est + est // 4


def phi_from(diff: float, mean: float, std: float) -> float:
    """phi of a heartbeat `diff` ms late, against a normal law (mean, std).

    Uses the logistic approximation of the normal CDF (Akka). Far past the
    mean the exponential underflows to 0 and phi becomes +inf; far below it,
    `exp` would overflow, which is caught and gives 0.
    """
    y = (diff - mean) / std
    try:
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    except OverflowError:
        return 0.0  # diff far below the mean: certainly alive
    p = e / (1.0 + e) if diff > mean else 1.0 - 1.0 / (1.0 + e)
    # `+ 0.0` turns -0.0 (from log10(1.0)) into 0.0.
    return math.inf if p == 0.0 else -math.log10(p) + 0.0


def stats_from_sums(n: int, total: int, total_sq: int, opts: PhiAccrualOptions) -> tuple[float, float]:
    """(mean + acceptable pause, max(population std, min std)) from exact integer sums."""
    mean = total / n
    # n*sum(x^2) - sum(x)^2 is exact in Python integers; one rounding at the end.
    variance = (n * total_sq - total * total) / (n * n)
    std = math.sqrt(variance)
    return mean + opts.acceptable_heartbeat_pause_ms, max(std, opts.min_std_deviation_ms)


class PhiAccrualFailureDetector:
    """One detector: a window of heartbeat intervals and the last heartbeat time."""

    __slots__ = ("opts", "_intervals", "_total", "_total_sq", "_last")

    def __init__(self, opts: PhiAccrualOptions | None = None) -> None:
        self.opts = opts or PhiAccrualOptions()
        self._intervals: deque[int] = deque()
        self._total = 0
        self._total_sq = 0
        self._last: int | None = None

    @property
    def last_heartbeat_millis(self) -> int | None:
        return self._last

    @property
    def intervals(self) -> list[int]:
        return list(self._intervals)

    def _append(self, interval: int) -> None:
        if len(self._intervals) >= self.opts.max_sample_size:
            old = self._intervals.popleft()
            self._total -= old
            self._total_sq -= old * old
        self._intervals.append(interval)
        self._total += interval
        self._total_sq += interval * interval

    def heartbeat(self, ts_millis: int) -> None:
        """Record a heartbeat at `ts_millis`; one older than the last is ignored."""
        ts_millis = int(ts_millis)
        if self._last is None:
            for seed in self.opts.seed_intervals():
                self._append(seed)
        elif ts_millis < self._last:
            return
        elif self.is_available(ts_millis):
            self._append(ts_millis - self._last)
        self._last = ts_millis

    def mean_and_std(self) -> tuple[float, float]:
        """Mean interval plus acceptable pause, and the floored standard deviation."""
        if not self._intervals:
            raise ValueError("no heartbeat yet")
        return stats_from_sums(len(self._intervals), self._total, self._total_sq, self.opts)

    def phi(self, ts_millis: int) -> float:
        if self._last is None:
            return 0.0
        mean, std = self.mean_and_std()
        return phi_from(ts_millis - self._last, mean, std)

    def is_available(self, ts_millis: int) -> bool:
        return self.phi(ts_millis) < self.opts.threshold
