"""The state store's commit latency histogram: every backend transaction attempt observed, the
committed and the failed, and nothing observed while nothing is written."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import RegistryAdd
from supervisor_service.store import StateStore, StoreError
from tests.support.kv import FaultyKV
from tests.support.waiting import wait_for

COUNT = "supervisor_store_commit_duration_seconds_count"


def _store(kv: FaultyKV) -> tuple[StateStore, CollectorRegistry]:
    registry = CollectorRegistry()
    store = StateStore(kv, "/c", flush_interval_s=0, metrics=Metrics(registry))
    store.load()
    store.start()
    return store, registry


def test_each_commit_is_timed_and_failed_attempts_too():
    kv = FaultyKV()
    store, registry = _store(kv)
    try:
        assert (registry.get_sample_value(COUNT) or 0) == 0
        answers: list = []
        store.submit([RegistryAdd(1, np.array([1, 2], dtype=np.uint64))], answers.append)
        wait_for(lambda: answers, timeout=10)
        assert answers == [None]
        committed = registry.get_sample_value(COUNT)
        assert committed >= 1
        assert registry.get_sample_value("supervisor_store_commit_duration_seconds_bucket", {"le": "+Inf"}) == committed
        kv.fail(StoreError("disk on fire", reason="io_error"))
        store.submit([RegistryAdd(2, np.array([3], dtype=np.uint64))], answers.append)
        wait_for(lambda: registry.get_sample_value(COUNT) >= committed + 2, timeout=10)  # retried, each timed
        assert registry.get_sample_value("supervisor_store_errors_total", {"reason": "io_error"}) >= 2
        assert len(answers) == 1  # not answered while failing: kept and retried
        kv.heal()
        wait_for(lambda: len(answers) == 2, timeout=10)
        assert answers[1] is None
        assert 0 <= registry.get_sample_value("supervisor_store_commit_duration_seconds_sum") < 30
    finally:
        store.stop(5)
