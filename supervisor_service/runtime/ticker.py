"""The ticker: a Clear once, then a Tick every interval; a tick due while one is queued is skipped (docs/design.md §3.5)."""

from __future__ import annotations

import threading
from typing import Protocol

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    Clear,
    Clock,
    Tick,
)
from supervisor_service.runtime.queue import EventQueue


class _TicksPending(Protocol):
    tick_pending: threading.Event  # set while a Tick is queued; the consumer clears it


class Ticker:
    """Sends Clear once, then Tick every `interval_s` on the clock's monotonic time; missed ticks are skipped.

    Time is read only through `clock`. The thread waits on an Event (which `stop` sets) for as
    long as the clock says is left until the next due time, until the clock has reached it;
    then it calls `tick_once`, which a test can call itself after `begin`, moving a FakeClock
    instead of waiting.
    """

    def __init__(
        self, queue: EventQueue, runtime: _TicksPending, clock: Clock, metrics: Metrics, interval_s: float
    ) -> None:
        self._queue = queue
        self._runtime = runtime
        self._clock = clock
        self._metrics = metrics
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # makes "stopped" and "enqueue a Tick" exclusive
        self._thread: threading.Thread | None = None
        self._due = 0.0

    @property
    def next_due(self) -> float:
        """The monotonic time of the next tick."""
        return self._due

    def start(self, *, clear: bool = True) -> None:
        """`begin`, then tick from a thread of its own until `stop`."""
        if self._thread is not None:
            return
        self.begin(clear=clear)
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="supervisor-ticker", daemon=True)
        self._thread.start()

    def begin(self, *, clear: bool = True) -> None:
        """Enqueue Clear (unless `clear` is False); the first tick is due one interval from now."""
        self._stop = threading.Event()
        if clear:
            self._queue.put_control(Clear())
        self._due = self._clock.monotonic() + self._interval

    def stop(self) -> None:
        """Stops at once: no Tick is enqueued after this returns."""
        with self._lock:
            self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def tick_once(self) -> bool:
        """The tick that is due (call at or after `next_due`): enqueued unless one is still pending,
        after skipping those slept through, keeping the phase. False once stopped."""
        stop = self._stop
        now = self._clock.monotonic()
        due = self._due
        if now - due >= self._interval:
            # Slept through one or more ticks (a stall): skip them, keep the phase.
            skipped = int((now - due) // self._interval)
            self._metrics.ticks_skipped.inc(skipped)
            due += skipped * self._interval
        with self._lock:
            if stop.is_set():
                return False
            if self._runtime.tick_pending.is_set():
                self._metrics.ticks_skipped.inc()
            elif not self._queue.closed:
                self._runtime.tick_pending.set()
                self._queue.put_control(Tick(due_monotonic=due))
        self._due = due + self._interval
        return True

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            wait = self._due - self._clock.monotonic()
            if wait > 0:
                # Then look at the clock again: a tick never leaves before it is due on it.
                if stop.wait(wait):
                    return
                continue
            if not self.tick_once():
                return
