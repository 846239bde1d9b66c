"""Injected time. Production uses `SystemClock`; tests use `FakeClock`, which moves only when told."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from supervisor_service.core.changes import ClockMark

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True, slots=True)
class ClockBase:
    """How `now_ms()` relates to the machine's monotonic clock, for durations that outlive a process.

    `now_ms() - offset_ms` is CLOCK_MONOTONIC in ms, which every process on one
    boot of one machine shares (and which no wall-clock step moves); `boot_id`
    names that boot ("" when unknown: nothing is then compared across lives).
    """

    boot_id: str = ""
    offset_ms: int = 0

    def monotonic_ms(self, now_ms: int) -> int:
        return now_ms - self.offset_ms

    def mark(self, now_ms: int) -> ClockMark:
        """Where a duration stored at `now_ms` was measured (see ClockMark)."""
        return ClockMark(self.boot_id, self.monotonic_ms(now_ms), now_ms)

    def elapsed_since(self, mark: ClockMark | None, now_ms: int) -> int:
        """Time since `mark` as measured by the machine's monotonic clock, when it was written on this
        boot; 0 otherwise (another machine, a reboot: the elapsed time is unknowable, and assuming
        none can only extend what runs, never end it early)."""
        if mark is None or not mark.boot_id or mark.boot_id != self.boot_id:
            return 0
        return max(0, self.monotonic_ms(now_ms) - mark.monotonic_ms)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds on the detector clock: wall time at start, then advanced monotonically."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock, for durations and deadlines."""

    def sleep(self, seconds: float) -> None: ...

    def base(self) -> ClockBase:
        """The boot and monotonic offset of `now_ms()` (see ClockBase)."""


def read_boot_id(path: str = _BOOT_ID_PATH) -> str:
    """The kernel's id of this boot (Linux), or "" where there is none."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


class SystemClock:
    """Wall-clock milliseconds anchored once, then advanced by the monotonic clock.

    Detector timestamps must never jump: a step of the wall clock (NTP, an
    operator) would otherwise make every detector look dead or make heartbeats
    look older than the last one and be ignored. The values still read as
    wall time, so Dump output can be compared with logs.
    """

    def __init__(self) -> None:
        self._mono0 = time.monotonic_ns()
        self._wall0_ms = time.time_ns() // 1_000_000
        self._boot_id = read_boot_id()

    def now_ms(self) -> int:
        return self._wall0_ms + (time.monotonic_ns() - self._mono0) // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def base(self) -> ClockBase:
        # time.monotonic is CLOCK_MONOTONIC on Linux: the same for every process of this boot.
        return ClockBase(self._boot_id, self._wall0_ms - self._mono0 // 1_000_000)


class FakeClock:
    """A clock that only moves when a test calls `advance`. `sleep` advances it.

    `monotonic()` is `(now_ms() - monotonic_offset_ms) / 1000`; two FakeClocks
    with the same `boot_id` whose monotonic readings continue each other model
    two lives of the supervisor on one machine (with the wall clock stepped by
    the difference of their offsets).
    """

    def __init__(self, start_ms: int = 1_700_000_000_000, *, monotonic_offset_ms: int = 0,
                 boot_id: str = "fake-boot") -> None:
        self._ms = start_ms
        self._offset = monotonic_offset_ms
        self._boot_id = boot_id
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._ms

    def monotonic(self) -> float:
        with self._lock:
            return (self._ms - self._offset) / 1000.0

    def sleep(self, seconds: float) -> None:
        self.advance(int(seconds * 1000))

    def advance(self, ms: int) -> int:
        with self._lock:
            self._ms += int(ms)
            return self._ms

    def base(self) -> ClockBase:
        return ClockBase(self._boot_id, self._offset)
