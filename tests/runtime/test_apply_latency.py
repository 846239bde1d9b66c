"""supervisor_heartbeat_apply_latency_seconds: receipt stamp (carried in the Heartbeat event) to table update."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import FakeClock, Heartbeat, PhiAccrualOptions, Stop, Supervisor, Tick
from supervisor_service.remotes import Remotes
from supervisor_service.runtime import EventQueue, SupervisorRuntime

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
    runtime.consumer.run()  # the consumer loop, on this thread, until Stop
    assert len(runtime.supervisor.table) == 3
    assert registry.get_sample_value(f"{NAME}_count") == 1
    assert abs(registry.get_sample_value(f"{NAME}_sum") - 0.030) < 1e-6  # fake seconds are ~1.7e9: float rounding
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "0.025"}) == 0
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "0.05"}) == 1
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "+Inf"}) == 1


def test_a_tick_between_runs_of_heartbeats_sees_the_queue_behind_it():
    """The consumer applies runs of heartbeats together, but never takes what is behind a Tick
    before the Tick: the overload guard reads the queue as it stands at the Tick."""
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    queue = EventQueue(10)
    supervisor = Supervisor(PhiAccrualOptions(), metrics)
    seen = []
    handle = supervisor.handle

    def spy(event, now):
        seen.append((type(event).__name__, getattr(event, "queue_fill", None)))
        return handle(event, now)

    supervisor.handle = spy
    runtime = SupervisorRuntime(supervisor, queue, clock, metrics, Remotes(None, None, None))
    for datanode_id in (1, 2):
        queue.offer(Heartbeat(datanode_id, np.array([1], dtype=np.uint64), clock.now_ms()))
    queue.put_control(Tick())
    for datanode_id in (3, 4, 5):
        queue.offer(Heartbeat(datanode_id, np.array([1], dtype=np.uint64), clock.now_ms()))
    queue.put_control(Stop())
    runtime.consumer.run()
    assert seen == [("Heartbeat", None)] * 2 + [("Tick", 0.3)] + [("Heartbeat", None)] * 3
    assert registry.get_sample_value("supervisor_events_total", {"type": "Heartbeat"}) == 5
    assert len(supervisor.table) == 5


def test_a_submission_of_an_ended_term_is_not_sent_and_does_not_depose_the_current_leader():
    """A SubmitMigration queued for the workers under term 1 runs after the replica led again as
    term 2 (which resends the committed intent itself): it is not sent under the old term, so a
    RegionMigration that has seen term 2 never refuses it and the current leadership stands."""
    from supervisor_service.core import MigrationTask, Peer, SubmissionDone, SubmitMigration

    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    queue = EventQueue(10)
    supervisor = Supervisor(PhiAccrualOptions(), metrics, leader_term=2)
    sent, fenced = [], []

    class Migration:
        def submit(self, task):
            sent.append(task)
            raise AssertionError("sent under an ended term")

    runtime = SupervisorRuntime(supervisor, queue, clock, metrics, Remotes(None, None, Migration()),
                                on_fenced=fenced.append)
    task = MigrationTask(task_id=1, datanode_id=3, from_peer=Peer(3), to_peer=Peer(5, "dn5:1"),
                         region_ids=(30,), timeout_ms=1000, leader_term=1, request_id="1-x")
    runtime.effects.run(SubmitMigration(task))
    [answer] = queue.drain()
    assert isinstance(answer, SubmissionDone) and "term 1 ended" in answer.error
    assert sent == [] and fenced == []
