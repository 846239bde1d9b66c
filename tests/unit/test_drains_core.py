"""Drains in the core, driven by hand on a fake clock (docs/design.md §17): targets exclude the drained
datanodes, the budget paces submissions, every region is moved once, a drained datanode that dies
falls back to failover without a second move, cancel stops new submissions, the record is durable."""

from __future__ import annotations

import dataclasses

import pytest

from supervisor_service.core import (
    BecomeLeader,
    CancelDrain,
    DrainRefused,
    DrainSet,
    FailoverPolicy,
    GetDrain,
    MigrationState,
    Peer,
    SelectionDone,
    StartDrain,
    StoredState,
)
from supervisor_service.core.types import MANUAL
from tests.support.coresim import CoreSim, quiet_guards, selects, submits

P2, P3 = Peer(2, "dn2:1"), Peer(3, "dn3:1")
POLICY = FailoverPolicy(resubmit_backoff_ms=0, max_resubmissions_per_window=1_000_000, drain_regions_per_s=200,
                        drain_burst_regions=200, status_poll_interval_ms=1000, submit_retry_backoff_ms=1000)


class Cluster:
    """Datanodes 1 (drained), 2 and 3 heartbeat every second; a Selector alternates 2 and 3; every
    submission is accepted and SUCCEEDS at its first poll."""

    def __init__(self, regions=range(1000), policy=POLICY, **kw) -> None:
        self.sim = CoreSim(policy, guards=quiet_guards(), **kw)
        self.regions = list(regions)
        self.alive = {1: list(self.regions), 2: [900_001], 3: [900_002]}
        self.now = 0
        self.submitted: list[int] = []
        self.tasks = []
        self.outcome = MigrationState.SUCCEEDED
        self.selector_down = False
        for _ in range(5):
            self.step(run=False)

    def step(self, run: bool = True) -> None:
        for d, regions in self.alive.items():
            self.sim.beats(d, regions, self.now, 1)
        effects = self.sim.tick(self.now)
        if run:
            self.run(effects)
        self.now += 1000

    def run(self, effects) -> None:
        while effects:
            nxt = []
            for e in effects:
                name = type(e).__name__
                if name == "SelectPeers":
                    if self.selector_down:
                        self.sim.handle(SelectionDone(e.job, error="down"), self.now)
                        continue
                    peers = [P2 if i % 2 == 0 else P3 for i in range(len(e.job.region_ids))]
                    nxt += self.sim.select_done(e.job, peers, self.now)
                elif name == "SubmitMigration":
                    self.tasks.append(e.task)
                    self.submitted += list(e.task.region_ids)
                    nxt += self.sim.submit_done(e.task, self.now, submitted=e.task.region_ids,
                                                procedure_id=e.task.request_id)
                elif name == "PollMigration":
                    nxt += self.sim.status(e.procedure_id, self.outcome, self.now)
                    task = next(t for t in self.tasks if t.request_id == e.procedure_id)
                    if self.outcome is MigrationState.SUCCEEDED:  # the regions now live on the target
                        moved = set(task.region_ids)
                        if task.datanode_id in self.alive:
                            self.alive[task.datanode_id] = [r for r in self.alive[task.datanode_id] if r not in moved]
                        self.alive[task.to_peer.id] += sorted(moved)
            effects = nxt

    def drain(self, datanodes=(1,), reason="decommission"):
        value = self.sim.handle(StartDrain(tuple(datanodes), reason), self.now)
        self.run(self.sim.sup.drain_outbox())
        return value

    def get(self, drain_id=""):
        return self.sim.handle(GetDrain(drain_id), self.now)


def test_a_drain_of_a_thousand_regions_at_200_per_s_moves_each_once_in_about_5_s():
    c = Cluster()
    view = c.drain()
    assert view.state == "running" and view.regions_total == 1000
    start, seen = c.now, []
    while c.get(view.drain_id).state == "running" and c.now - start < 30_000:
        c.step()
        seen.append(c.get(view.drain_id).regions_moved)
    done = c.get(view.drain_id)
    assert done.state == "done" and done.regions_moved == 1000 and done.regions_in_flight == 0
    assert sorted(c.submitted) == c.regions  # every region exactly once
    assert 4000 <= c.now - start <= 7000, c.now - start
    assert seen == sorted(seen) and 0 < seen[1] < 1000  # progress shows in GetDrain
    assert all(t.trigger_reason == MANUAL and t.to_peer.id in (2, 3) for t in c.tasks)
    # The moved regions are watched on their targets, and none on the drained datanode.
    assert c.sim.sup.table.regions_of(1).size == 0
    on_targets = set(c.sim.sup.table.regions_of(2).tolist()) | set(c.sim.sup.table.regions_of(3).tolist())
    assert set(c.regions) <= on_targets
    assert c.sim.value("supervisor_drains", state="done") == 1


def test_drained_datanodes_are_excluded_as_targets_of_drains_and_failovers():
    c = Cluster(regions=range(10))
    c.alive[4] = [800]
    c.step(run=False)
    view = c.drain()
    effects = c.sim.tick(c.now)
    job = selects(effects)[0].job
    assert 1 in job.exclude_targets
    # A Selector that names the drained datanode is refused whole (asked again at the next tick).
    out = c.sim.select_done(job, [Peer(1, "dn1:1")] * len(job.region_ids), c.now)
    assert submits(out) == []
    # Datanode 4 dies: its failover may not go to datanode 1, which is being drained.
    c.alive.pop(4)
    for _ in range(40):
        c.now += 1000
        for d, regions in c.alive.items():
            c.sim.beats(d, regions, c.now, 1)
        for s in selects(c.sim.tick(c.now)):
            if s.job.datanode_id == 4:
                assert 1 in s.job.exclude_targets
                return
    pytest.fail(f"datanode 4 was never failed over ({view})")


def test_a_second_drain_of_a_datanode_being_drained_is_refused():
    c = Cluster(regions=range(10))
    c.drain()
    refused = c.drain((1, 2))
    assert isinstance(refused, DrainRefused) and "already being drained" in str(refused)


def test_cancel_stops_new_submissions_and_reports_what_moved():
    c = Cluster()
    view = c.drain()
    c.step()
    c.step()
    moved = c.get(view.drain_id).regions_moved
    assert 0 < moved < 1000
    cancelled = c.sim.handle(CancelDrain(view.drain_id, "changed my mind"), c.now)
    assert cancelled.state == "cancelled" and cancelled.finished_at_ms == c.now
    before = len(c.submitted)
    for _ in range(10):
        c.step()
    assert len(c.submitted) == before, "a cancelled drain submitted again"
    after = c.get(view.drain_id)
    assert after.regions_moved == len(set(c.submitted)) and after.regions_in_flight == 0
    assert c.sim.handle(CancelDrain("no-such-drain"), c.now) is None


def test_a_drained_datanode_that_dies_falls_back_to_failover_without_moving_a_region_twice():
    c = Cluster(regions=range(1000), policy=dataclasses.replace(POLICY, drain_regions_per_s=20, drain_burst_regions=20))
    view = c.drain()
    c.step()
    c.step()
    c.alive.pop(1)  # the drained datanode dies mid-drain
    for _ in range(60):
        c.step()
        if c.get(view.drain_id).state != "running":
            break
    done = c.get(view.drain_id)
    assert done.state == "done", done
    assert sorted(c.submitted) == c.regions, "a region was moved twice, or not at all"
    assert {t.trigger_reason for t in c.tasks} == {"MANUAL", "FAILOVER"}


def test_failed_migrations_are_retried_then_the_drain_fails_naming_the_regions():
    c = Cluster(regions=range(3))
    c.outcome = MigrationState.FAILED
    view = c.drain()
    for _ in range(30):
        c.step()
        if c.get(view.drain_id).state != "running":
            break
    end = c.get(view.drain_id)
    assert end.state == "failed" and end.regions_failed == 3 and end.regions_moved == 0
    assert end.failures[0].startswith("0/0: FAILED (3 attempts)")
    assert len(c.submitted) == 3 * POLICY.drain_max_attempts


def test_a_selector_error_gives_the_budget_back_and_is_retried():
    c = Cluster(regions=range(10))
    c.selector_down = True
    view = c.drain()
    for _ in range(3):
        c.step()
    assert c.get(view.drain_id).regions_moved == 0
    c.selector_down = False
    for _ in range(4):
        c.step()
    assert c.get(view.drain_id).state == "done"


def test_a_new_leader_continues_the_drain_without_moving_a_region_twice():
    c = Cluster()
    view = c.drain()
    c.step()
    c.step()
    records = {}
    inflight = {}
    for ch in c.sim.sup.drain_changes():
        if isinstance(ch, DrainSet):
            records[ch.drain_id] = ch.record
        elif type(ch).__name__ == "InFlightSet":
            inflight[ch.submission_id] = ch.record
        elif type(ch).__name__ == "InFlightDrop":
            inflight.pop(ch.submission_id, None)
    moved_before = c.get(view.drain_id).regions_moved
    assert 0 < moved_before < 1000
    # A successor loads what was stored: the drain and the migrations in flight.
    registry = {d: c.sim.sup.table.regions_of(d) for d in c.sim.sup.table.datanode_ids()}
    nxt = CoreSim(POLICY, guards=quiet_guards(), is_leader=False)
    nxt.handle(BecomeLeader(2, StoredState(registry=registry, inflight=inflight, drains=records)), c.now)
    nxt.sup.drain_outbox()
    c.sim = nxt
    for _ in range(30):
        c.step()
        if c.get(view.drain_id).state != "running":
            break
    done = c.get(view.drain_id)
    assert done.state == "done" and done.regions_moved == 1000
    assert sorted(c.submitted) == c.regions


def test_a_selector_that_keeps_naming_a_drained_datanode_submits_nothing_and_cancel_ends_it():
    c = Cluster(regions=range(20))
    view = c.drain()
    # Answer every drain job with the drained datanode itself.
    for _ in range(10):
        for d, regions in c.alive.items():
            c.sim.beats(d, regions, c.now, 1)
        for s in selects(c.sim.tick(c.now)):
            assert submits(c.sim.select_done(s.job, [Peer(1, "dn1:1")] * len(s.job.region_ids), c.now)) == []
        c.now += 1000
    status = c.get(view.drain_id)
    assert status.state == "running" and status.regions_moved == 0 and status.regions_pending == 20
    assert c.sim.handle(CancelDrain(view.drain_id), c.now).state == "cancelled"


def test_a_region_deregistered_mid_drain_is_gone_not_failed():
    c = Cluster(regions=range(10), policy=dataclasses.replace(POLICY, drain_regions_per_s=1, drain_burst_regions=1))
    view = c.drain()
    c.alive[1] = [r for r in c.alive[1] if r != 9]
    from supervisor_service.core import Deregister
    c.sim.handle(Deregister(((1, 9),)), c.now)
    for _ in range(30):
        c.step()
        if c.get(view.drain_id).state != "running":
            break
    done = c.get(view.drain_id)
    assert done.state == "done" and done.regions_gone == 1 and done.regions_moved == 9
    assert 9 not in c.submitted


def test_a_moved_region_the_drained_datanode_keeps_reporting_is_dropped_not_failed_back():
    c = Cluster(regions=range(10))
    view = c.drain()
    for _ in range(5):
        c.step()
    assert c.get(view.drain_id).state == "done"
    # The drained datanode reports the moved regions once more, then is switched off.
    c.sim.beats(1, range(10), c.now, 1)
    assert c.sim.sup.table.regions_of(1).size == 10
    assert "drained" in (c.sim.sup.why_not_failed_over(1, 3) or "")
    c.alive.pop(1)
    before = len(c.submitted)
    for _ in range(40):
        c.step()
    assert len(c.submitted) == before, "a region moved by the drain was failed over from the drained datanode"
    assert c.sim.skipped("drained") == 10 and c.sim.sup.table.regions_of(1).size == 0


def test_a_drain_moves_a_disabled_tables_regions_highest_priority_first():
    from supervisor_service.core import SetTablePolicy
    regions = [(t << 32) | n for t in (1, 2, 3) for n in range(4)]
    c = Cluster(regions=regions, policy=dataclasses.replace(POLICY, drain_regions_per_s=4, drain_burst_regions=4))
    c.sim.handle(SetTablePolicy((3,), True, 9), c.now)
    c.sim.handle(SetTablePolicy((2,), False, 5), c.now)
    view = c.drain()
    c.step()
    c.step()
    assert [r >> 32 for r in c.submitted[:8]] == [3] * 4 + [2] * 4
    for _ in range(10):
        c.step()
    assert c.get(view.drain_id).state == "done" and sorted(c.submitted) == sorted(regions)
