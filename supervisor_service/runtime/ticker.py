"""The ticker: a Clear once, then a Tick every interval; a tick due while one is queued is skipped."""

from __future__ import annotations

import threading

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    Clear,
    Clock,
    Tick,
)
from supervisor_service.runtime.consumer import SupervisorRuntime
from supervisor_service.runtime.queue import EventQueue


class Ticker:
    """Sends Clear once, then Tick every `interval_s` on the monotonic clock; missed ticks are skipped."""

    def __init__(
        self, queue: EventQueue, runtime: SupervisorRuntime, clock: Clock, metrics: Metrics, interval_s: float
    ) -> None:
        self._queue = queue
        self._runtime = runtime
        self._clock = clock
        self._metrics = metrics
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # makes "stopped" and "enqueue a Tick" exclusive
        self._thread: threading.Thread | None = None

    def start(self, *, clear: bool = True) -> None:
        if self._thread is not None:
            return
        self._stop = threading.Event()
        if clear:
            self._queue.put_control(Clear())
        self._thread = threading.Thread(target=self._run, name="supervisor-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops at once: no Tick is enqueued after this returns."""
        with self._lock:
            self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        stop = self._stop
        due = self._clock.monotonic() + self._interval
        while not stop.is_set():
            wait = due - self._clock.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            now = self._clock.monotonic()
            if now - due >= self._interval:
                # Slept through one or more ticks (a stall): skip them, keep the phase.
                skipped = int((now - due) // self._interval)
                self._metrics.ticks_skipped.inc(skipped)
                due += skipped * self._interval
            with self._lock:
                if stop.is_set():
                    return
                if self._runtime.tick_pending.is_set():
                    self._metrics.ticks_skipped.inc()
                elif not self._queue.closed:
                    self._runtime.tick_pending.set()
                    self._queue.put_control(Tick(due_monotonic=due))
            due += self._interval
