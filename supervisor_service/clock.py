"""Injected time. Production uses `SystemClock`; tests use `FakeClock`, which moves only when told."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds on the detector clock: wall time at start, then advanced monotonically."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock, for durations and deadlines."""

    def sleep(self, seconds: float) -> None: ...


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

    def now_ms(self) -> int:
        return self._wall0_ms + (time.monotonic_ns() - self._mono0) // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock:
    """A clock that only moves when a test calls `advance`. `sleep` advances it."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._ms = start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._ms

    def monotonic(self) -> float:
        with self._lock:
            return self._ms / 1000.0

    def sleep(self, seconds: float) -> None:
        self.advance(int(seconds * 1000))

    def advance(self, ms: int) -> int:
        with self._lock:
            self._ms += int(ms)
            return self._ms
