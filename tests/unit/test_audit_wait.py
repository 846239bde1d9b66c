"""How long an accepted state-changing call waits for its audit entry (edge/audit.py): the change itself
is already committed when the entry is written, so the wait is bounded by the store's health and by the
caller's deadline; a failing store or a short deadline must not turn a committed change into
DEADLINE_EXCEEDED (the chaos disk scenario saw that when the disk filled between the two)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import SystemClock
from supervisor_service.edge.audit import AuditTrail
from supervisor_service.edge.problems import ProblemLog
from supervisor_service.proto import pb


class _Store:
    """Takes entries and commits them only when told; says it is failing when told."""

    def __init__(self) -> None:
        self.failing = ""
        self.callbacks: list = []

    def submit(self, changes, on_durable=None, *, term=None) -> None:
        self.callbacks.append(on_durable)

    def unavailable(self, after_s: float = 0.0) -> str:
        return self.failing


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def _trail(store: _Store) -> AuditTrail:
    clock = SystemClock()
    leadership = SimpleNamespace(is_leader=lambda: True, term=3)
    return AuditTrail(store=store, leadership=leadership, status=lambda: SimpleNamespace(is_leader=True),  # type: ignore[arg-type]
                      clock=clock, metrics=Metrics(CollectorRegistry()), refusal_interval_ms=1000,
                      log_problem=ProblemLog(clock))


def _accept(trail: AuditTrail, context: _Context) -> float:
    request = pb.SetMaintenanceModeRequest(enabled=True, reason="r")
    started = time.monotonic()
    asyncio.run(trail.accepted(context, "ops-alice", "SetMaintenanceMode", request))
    return time.monotonic() - started


def test_a_failing_store_does_not_hold_the_answer_of_a_committed_change():
    store = _Store()
    store.failing = "disk full"
    assert _accept(_trail(store), _Context(remaining=3.0)) < 1.0
    assert len(store.callbacks) == 1  # still handed to the writer, which keeps retrying it


def test_the_wait_ends_before_the_callers_deadline():
    store = _Store()
    waited = _accept(_trail(store), _Context(remaining=1.0))
    assert waited < 1.0, waited


def test_a_healthy_store_is_waited_for_until_the_entry_is_committed():
    store = _Store()
    trail = _trail(store)
    timer = threading.Timer(0.3, lambda: store.callbacks[0](None))
    timer.start()
    try:
        waited = _accept(trail, _Context(remaining=None))
    finally:
        timer.cancel()
    assert 0.25 <= waited < 2.0, waited
