"""supervisor_heartbeat_apply_latency_seconds: receipt stamp (carried in the Heartbeat event) to table update."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.clock import FakeClock
from supervisor_service.detector import PhiAccrualOptions
from supervisor_service.events import EventQueue, Heartbeat, Stop
from supervisor_service.metrics import Metrics
from supervisor_service.remotes import Remotes
from supervisor_service.runtime import SupervisorRuntime
from supervisor_service.supervisor import Supervisor

NAME = "supervisor_heartbeat_apply_latency_seconds"


def test_heartbeats_with_a_receipt_stamp_are_timed_until_applied():
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    queue = EventQueue(16)
    runtime = SupervisorRuntime(Supervisor(PhiAccrualOptions(), metrics), queue, clock, metrics,
                                Remotes(None, None, None))
    regions = np.array([1, 2, 3], dtype=np.uint64)
    received = clock.monotonic()
    queue.offer(Heartbeat(7, regions, clock.now_ms(), received))
    clock.advance(30)  # the event waited 30 ms in the queue
    queue.offer(Heartbeat(7, regions, clock.now_ms()))  # no stamp: not timed
    queue.put_control(Stop())
    runtime._run()  # the consumer loop, on this thread, until Stop
    assert len(runtime.supervisor.table) == 3
    assert registry.get_sample_value(f"{NAME}_count") == 1
    assert abs(registry.get_sample_value(f"{NAME}_sum") - 0.030) < 1e-6  # fake seconds are ~1.7e9: float rounding
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "0.025"}) == 0
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "0.05"}) == 1
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "+Inf"}) == 1
