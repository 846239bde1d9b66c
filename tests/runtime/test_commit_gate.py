"""The commit gate: a SubmitRegionMigration leaves only after its intent is committed (docs/design.md §6, §11).

The real runtime drives the real decisions: `SupervisorRuntime` (its
consumer thread and one failover worker) around a `Supervisor`, a real
`StateStore` writing to a `FaultyKV`, and the remote services as in-process
gRPC fakes reached through their ordinary clients. Time is a `FakeClock`:
the test heartbeats and ticks by hand, and waits for each Tick to be handled
(`supervisor_events_total{type="Tick"}`), never for a duration.

From the moment the store is idle after warm-up, the backend
(a) fails every commit (StoreError: the writer keeps retrying),
(b) answers FencedOut (another replica's term is in the store), or
(c) holds every commit until the test releases it.
Datanode 3 then dies, so the supervisor decides a failover: the Selector is
asked, the decision's intent goes to the store, and nothing may reach the
RegionMigration while that intent is not durable.

How "nothing arrived" is known, without sleeping: the runtime runs with one
failover worker, which runs effects in the order they were released. After
the intent of datanode 3 reached the store, datanode 4 dies too; once the
Selector has answered for datanode 4, a submission for datanode 3 released
before that call (had the gate been open) has been carried out already, and
would be in the fake's call log.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    BecomeLeader,
    FailoverPolicy,
    FakeClock,
    Heartbeat,
    PhiAccrualOptions,
    Supervisor,
    Tick,
)
from supervisor_service.remotes import PeerDirectory, build_remotes
from supervisor_service.runtime import EventQueue, SupervisorRuntime
from supervisor_service.store import StateStore, StoreError, decode_state
from tests.support.fakes import FakePeerLookup, FakeRegionMigration, FakeSelector, peer
from tests.support.kv import FaultyKV
from tests.support.waiting import handled, wait_for

START = 1_700_000_000_000
TICK_MS = 1000
PREFIX = "/gate"
TERM = 1
DATANODES = (1, 2, 3, 4, 5)
OPTS = PhiAccrualOptions(acceptable_heartbeat_pause_ms=3000)
MORE_TICKS = 10  # ticks handled after the barrier before "nothing arrived" is asserted
WAIT_S = 10.0  # bound on one real wait (one event through the queue, one remote call)


def regions(datanode_id: int) -> list[int]:
    return [datanode_id * 100 + i for i in range(3)]


def addr(datanode_id: int) -> str:
    return f"10.0.0.{datanode_id}:4001"


class Rig:
    """The runtime, the supervisor, the store on a FaultyKV, the fakes, a fake clock; datanodes beat on `tick()`."""

    def __init__(self) -> None:
        self.clock = FakeClock(START)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.kv = FaultyKV()
        self.kv.take_over(TERM, PREFIX)  # this replica's term is the store's
        self.fenced: list[bool] = []
        self.store = StateStore(self.kv, PREFIX, flush_interval_s=0, metrics=self.metrics,
                                on_fenced=lambda: self.fenced.append(True))
        state = self.store.load()
        self.store.start()
        self.rm = FakeRegionMigration()
        self.sel = FakeSelector([peer(d, addr(d)) for d in DATANODES], per_call=True)
        self.lookup = FakePeerLookup({d: addr(d) for d in DATANODES})
        self.remotes = build_remotes(
            clock=self.clock, directory=PeerDirectory(self.clock), selector_endpoint=self.sel.endpoint,
            peer_lookup_endpoint=self.lookup.endpoint, region_migration_endpoint=self.rm.endpoint,
            timeout_s=WAIT_S, alive_window_ms=60_000, journal_capacity=100,
        )
        self.supervisor = Supervisor(OPTS, self.metrics, FailoverPolicy(), is_leader=False, leader_term=0,
                                     clock_base=self.clock.base())
        self.queue = EventQueue(1000)
        # One worker: effects run in the order the consumer released them (see the module docstring).
        self.runtime = SupervisorRuntime(self.supervisor, self.queue, self.clock, self.metrics, self.remotes,
                                         workers=1, store=self.store)
        self.runtime.start()
        self.alive = set(DATANODES)
        self.queue.put_control(BecomeLeader(TERM, state))
        self.wait_handled("BecomeLeader", 1)

    def handled(self, event_type: str) -> int:
        return handled(self.registry, event_type)

    def wait_handled(self, event_type: str, n: int) -> None:
        wait_for(lambda: self.handled(event_type) >= n, WAIT_S,
                 message=f"the supervisor thread did not handle {n} {event_type} (handled {self.handled(event_type)})")

    def tick(self, n: int = 1) -> None:
        """`n` times: a second passes, the live datanodes heartbeat, a Tick is handled."""
        for _ in range(n):
            self.clock.advance(TICK_MS)
            for d in sorted(self.alive):
                assert self.queue.offer(Heartbeat(d, np.array(regions(d), dtype=np.uint64), self.clock.now_ms()))
            goal = self.handled("Tick") + 1
            self.queue.put_control(Tick())
            self.wait_handled("Tick", goal)

    def tick_until(self, condition, what: str, limit: int = 60) -> None:
        for _ in range(limit):
            if condition():
                return
            self.tick()
        raise AssertionError(f"{what}: not after {limit} ticks")

    def intents(self) -> list:
        """Commit attempts that wrote an in-flight record (a decision's intent, or its rewrite)."""
        return self.kv.attempts_with("/inflight/")

    def warm_up(self) -> None:
        """Every datanode heartbeats for a while; their regions are committed; the store is idle."""
        self.tick(10)
        self.store.flush()
        assert self.sel.calls == [] and self.rm.attempts == []

    def decide(self, datanode_id: int) -> None:
        """`datanode_id` stops heartbeating; tick until its intent has reached the store, and one tick more
        (the consumer has then released everything the decision produced)."""
        self.alive.discard(datanode_id)
        before = len(self.intents())
        self.tick_until(lambda: len(self.intents()) > before, f"no intent of datanode {datanode_id} reached the store")
        self.tick()
        asked = [c.request.from_peer_id for c in self.sel.calls]
        assert asked.count(datanode_id) == 1, asked

    def barrier(self) -> None:
        """Datanode 4 dies and the Selector answers for it: the one worker ran that call after whatever
        it was given before (a submission for datanode 3, had it been released), so that submission
        would be in the fake's log by now. Then more ticks."""
        self.alive.discard(4)
        self.tick_until(lambda: any(c.request.from_peer_id == 4 and c.done_at is not None for c in self.sel.calls),
                        "the Selector was never asked for datanode 4")
        self.tick(MORE_TICKS)

    def submitted_from(self) -> list[int]:
        return [c.request.from_peer.id for c in self.rm.attempts]

    def close(self) -> None:
        self.kv.heal()
        self.runtime.stop(5)
        self.store.stop(5)
        self.remotes.close()
        for fake in (self.rm, self.sel, self.lookup):
            fake.stop()


@pytest.fixture
def rig():
    made = Rig()
    try:
        yield made
    finally:
        made.close()


def test_no_submission_leaves_while_the_store_fails_every_commit(rig):
    rig.warm_up()
    rig.kv.fail(StoreError("sqlite /data/supervisor.sqlite3: database or disk is full", reason="disk_full"))
    rig.decide(3)
    rig.barrier()
    assert rig.rm.attempts == [], f"submitted while the intent could not be committed: {rig.submitted_from()}"
    assert rig.intents() and all(a.outcome == "failed" for a in rig.intents())
    assert not rig.store.healthy

    # The same run with the store back: each decision leaves once, after its intent is committed.
    rig.kv.heal()
    wait_for(lambda: len(rig.rm.attempts) == 2, WAIT_S, message="the intents committed, nothing was submitted")
    rig.tick(MORE_TICKS)
    assert sorted(rig.submitted_from()) == [3, 4]
    committed = {rec.request_id for rec in decode_state(rig.kv.read_prefix(PREFIX), PREFIX).inflight.values()}
    assert {c.request.request_id for c in rig.rm.attempts} <= committed


def test_no_submission_leaves_when_the_store_answers_fenced_out(rig):
    rig.warm_up()
    rig.kv.take_over(TERM + 1, PREFIX)  # another replica leads: every write of term 1 is refused
    rig.decide(3)
    rig.barrier()
    assert rig.rm.attempts == [], f"submitted while the intent was fenced out: {rig.submitted_from()}"
    assert rig.intents() and all(a.outcome == "fenced" for a in rig.intents())
    assert rig.fenced, "the store did not report the fenced write"
    # The decision was not dropped: its intent is written again before each retry, and refused again.
    assert len(rig.intents()) > 2


def test_a_slow_commit_holds_the_submission_until_it_lands_and_then_it_leaves_once(rig):
    rig.warm_up()
    rig.kv.hold()
    rig.decide(3)
    assert rig.kv.waiting.wait(WAIT_S), "the intent's commit is not waiting in the store"
    rig.barrier()
    assert rig.rm.attempts == [], f"submitted before the intent was committed: {rig.submitted_from()}"
    assert [a.outcome for a in rig.intents()] == ["waiting"]  # the writer is still in the first commit

    released = time.monotonic()
    rig.kv.release(1)  # datanode 3's intent lands; datanode 4's, queued behind it, is held next
    wait_for(lambda: rig.rm.attempts, WAIT_S, message="the intent was committed, nothing was submitted")
    rig.wait_handled("SubmissionDone", 1)
    rig.tick(MORE_TICKS)
    [call] = rig.rm.attempts
    assert call.ok and call.at >= released
    assert call.request.from_peer.id == 3 and sorted(call.request.region_ids) == regions(3)
    committed = {rec.request_id for rec in decode_state(rig.kv.read_prefix(PREFIX), PREFIX).inflight.values()}
    assert call.request.request_id in committed
