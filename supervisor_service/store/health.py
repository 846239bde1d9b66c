"""Whether the state store commits: failing since when and why, gone, reported and logged (docs/design.md §12).

The writer thread reports each attempt's outcome; any thread reads `healthy`
and `unavailable`. A change of health goes to the `supervisor_store_healthy`
gauge and to `on_health` (the service's NOT_SERVING); failures are counted
by reason and logged with the real error, again every interval while the
same error lasts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from supervisor_service.core import describe, log_event
from supervisor_service.store.kv import StoreError, StoreGone

log = logging.getLogger("supervisor_service.store")

_FAILURE_LOG_INTERVAL_S = 10.0  # a store failing the same way (or a full queue) is logged again this often


class StoreMetrics(Protocol):
    """What the store reports (`app.metrics.Metrics` provides it)."""

    store_healthy: Any
    store_errors: Any
    store_transactions: Any
    store_batch_splits: Any
    store_commit_duration: Any

    def bind_store(self, pending: Callable[[], float]) -> None: ...


class StoreHealth:
    """The store's health as the writer found it on its last attempts."""

    def __init__(self, on_health: Callable[[bool, str], None] | None, metrics: StoreMetrics | None) -> None:
        self._on_health = on_health
        self._metrics = metrics
        self._lock = threading.Lock()
        self.gone: StoreGone | None = None  # the store was deleted or replaced: nothing commits any more
        self.failing_since: float | None = None  # monotonic time of the first failed attempt in a row
        self.last_error = ""
        self.failures = 0
        self._last_logged = (0.0, "")
        self._full_logged_at: float | None = None  # when a refusal for a full queue was last logged

    # ------------------------------------------------------------ any thread

    @property
    def healthy(self) -> bool:
        return self.failing_since is None and self.gone is None

    def unavailable(self, after_s: float = 0.0) -> str:
        """The error that keeps writes from committing, once it has lasted `after_s` seconds; '' otherwise."""
        if self.gone is not None:
            return str(self.gone)
        since = self.failing_since
        if since is not None and time.monotonic() - since >= after_s:
            return self.last_error
        return ""

    def count_error(self, reason: str, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.store_errors.labels(reason=reason).inc(n)

    def recovered_if(self, nothing_left: Callable[[], bool]) -> None:
        """Healthy again if failing only because of writes that are all answered now (dropped, fenced)."""
        with self._lock:
            recovered = self.failing_since is not None and self.gone is None and nothing_left()
            if recovered:
                self.failing_since = None
        if recovered:
            self._report(True, "")

    def queue_full(self, error: StoreError, pending: int, max_pending: int) -> None:
        """A durable call was turned away because `max_pending` writes are queued: counted; logged once,
        then every interval."""
        self.count_error(error.reason, 1)
        now = time.monotonic()
        last = self._full_logged_at
        if last is None or now - last >= _FAILURE_LOG_INTERVAL_S:
            self._full_logged_at = now
            log_event(log, logging.ERROR, "store_queue_full", pending=pending, max_pending=max_pending,
                      error=self.last_error or "the store is not keeping up")

    # ------------------------------------------------------------ the writer thread

    def committed(self) -> None:
        """An attempt succeeded."""
        if self.failing_since is not None:
            log_event(log, logging.WARNING, "store_recovered",
                      failed_for_s=round(time.monotonic() - self.failing_since, 3), failures=self.failures)
            self.failing_since = None
            self.last_error = ""
            self._report(True, "")

    def failed(self, exc: Exception, pending: int) -> None:
        """An attempt failed (it is retried): counted, logged, and unhealthy from the first in a row."""
        self.failures += 1
        reason = getattr(exc, "reason", "error")
        self.count_error(reason, 1)
        now = time.monotonic()
        with self._lock:
            first = self.failing_since is None
            if first:
                self.failing_since = now
            failing_for = now - self.failing_since
        error = self.last_error = describe(exc)
        last_at, last_error = self._last_logged
        if first or error != last_error or now - last_at >= _FAILURE_LOG_INTERVAL_S:
            self._last_logged = (now, error)
            log_event(log, logging.ERROR, "store_write_failed", error=error, reason=reason,
                      failures=self.failures, pending=pending, failing_for_s=round(failing_for, 3))
        if first:
            self._report(False, error)

    def store_gone(self, exc: StoreGone, refused: int) -> None:
        """The store was deleted or replaced (reported once, by the caller that found it first)."""
        log_event(log, logging.ERROR, "store_gone", error=describe(exc), writes_refused=refused)
        self.count_error(exc.reason, max(1, refused))
        self._report(False, describe(exc))

    def _report(self, healthy: bool, error: str) -> None:
        if self._metrics is not None:
            self._metrics.store_healthy.set(int(healthy))
        if self._on_health is not None:
            self._on_health(healthy, error)
