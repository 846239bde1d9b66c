"""The heartbeats the edge could not queue reach the overload guard through the next Tick.

The edge only counts them (`EventQueue.refusals`); the consumer hands each Tick the increase since the
previous one, and the guard, on the supervisor thread, holds convictions (docs/design.md §5.1). A
fake clock, a real queue, consumer and Supervisor with guards.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import FakeClock, Guards, GuardSettings, Heartbeat, PhiAccrualOptions, Supervisor, Tick
from supervisor_service.runtime import Consumer, EventQueue


class Recording(Supervisor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ticks: list[Tick] = []

    def handle(self, event, now):
        if isinstance(event, Tick):
            self.ticks.append(event)
        return super().handle(event, now)


def test_each_tick_carries_the_refusals_counted_since_the_previous_one():
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    queue = EventQueue(2, clock=clock)
    sup = Recording(PhiAccrualOptions(), metrics, guards=Guards(GuardSettings(overload_hold_ms=3000)))
    consumer = Consumer(sup, queue, clock, metrics, lambda effect: None)
    queue.put_control(Tick())
    assert consumer.step(0)
    for why in ("queue_full", "queue_bytes", "datanode_share", None, "queue_full"):
        queue.refusals.note(why)
    queue.put_control(Tick())
    assert consumer.step(0)
    queue.put_control(Tick())
    assert consumer.step(0)
    assert [t.heartbeats_refused for t in sup.ticks] == [0, 3, 0]
    assert sup.status.holds == ("overload",)  # held 3 s after the tick that saw them
    clock.advance(3000)
    queue.put_control(Tick())
    assert consumer.step(0)
    assert sup.status.holds == ()


def test_a_full_queue_refuses_and_the_edge_counts_it():
    """What the edge calls when a heartbeat finds no room: the queue says why, the count says whether
    it holds convictions."""
    queue = EventQueue(1, clock=FakeClock())
    beat = Heartbeat(1, np.array([10], dtype=np.uint64), 0)
    assert queue.offer_heartbeat(beat, None) is not None
    other = Heartbeat(2, np.array([20], dtype=np.uint64), 0)
    assert queue.offer_heartbeat(other, None) is None
    assert queue.refusals.note(queue.refusal(other)) is True
    assert queue.refusals.count == 1
