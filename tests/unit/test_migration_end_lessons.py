"""What the end of a migration does to the detectors of its target, and the cap on its timeout
(docs/design.md §16): GreptimeDB's #8234 and #1762 (SUCCEEDED: the target is watched from a fresh
heartbeat at the end), #7212 (FAILED: a detector made for the candidate goes), and a failover count
that only grows never makes a timeout beyond max_failover_timeout_ms, even one stored by a leader
with a larger cap."""

from __future__ import annotations

from supervisor_service.core import (
    BecomeLeader,
    FailoverPolicy,
    InFlightRecord,
    MigrationState,
    Peer,
    SelectionDone,
    StoredState,
    as_region_array,
)
from supervisor_service.core.changes import MIGRATING
from tests.support.coresim import CoreSim, selects, submits

SRC, P5 = Peer(1, "dn1:4001"), Peer(5, "dn5:4001")


def _in_flight(sim: CoreSim, regions=(10, 11)) -> int:
    """Datanode 1 dies; its regions go to 5 under procedure "p"; returns the time of the first poll."""
    sim.beats(1, regions, 0, 5)
    sim.beats(5, [50], 0, 5)
    t = 4000
    sel = []
    while not sel:
        t += 100
        sim.beats(5, [50], t, 1)
        found = selects(sim.tick(t))
        sel = [s for s in found if s.job.datanode_id == 1]
        for other in found:  # anything else failing meanwhile is answered with an error (asked again later)
            if other.job.datanode_id != 1:
                sim.handle(SelectionDone(other.job, error="not now"), t)
    (sub,) = submits(sim.select_done(sel[0].job, [P5] * len(regions), t, from_peer=SRC))
    sim.submit_done(sub.task, t, submitted=tuple(regions), procedure_id="p")
    return t + sim.policy.status_poll_interval_ms


def test_succeeded_resets_a_stale_detector_of_the_target_so_it_is_not_failed_back():
    sim = CoreSim()
    sim.beats(5, [10], 0, 5)  # a detector of (5, 10) from an earlier life of the region there: stale at the end
    poll = _in_flight(sim, (10,))
    sim.beats(5, [50], poll, 1)
    sim.tick(poll)
    sim.status("p", MigrationState.SUCCEEDED, poll)
    assert sim.sup.table.phi(5, 10, poll) == 0.0  # a fresh heartbeat at the end
    for t in range(poll + 1000, poll + 9000, 1000):  # the target heartbeats, just not region 10 yet
        sim.beats(5, [50], t, 1)
        assert [s.job for s in selects(sim.tick(t)) if s.job.datanode_id == 5] == []


def test_succeeded_watches_the_target_even_before_its_first_heartbeat_of_the_region():
    sim = CoreSim()
    poll = _in_flight(sim, (10, 11))
    sim.tick(poll)
    sim.status("p", MigrationState.SUCCEEDED, poll)
    assert sim.sup.table.contains(5, 10) and sim.sup.table.contains(5, 11)
    assert not sim.sup.table.contains(1, 10)
    # The target dies before its first heartbeat carrying them: they are failed over all the same.
    asked: set[int] = set()
    for t in range(poll + 1000, poll + 60_000, 1000):
        for s in selects(sim.tick(t)):
            asked.update(s.job.region_ids)
            sim.handle(SelectionDone(s.job, error="no peers yet"), t)  # asked again at a later tick
    assert {10, 11} <= asked


def test_failed_drops_the_detector_made_for_the_candidate():
    sim = CoreSim()
    poll = _in_flight(sim, (10,))
    sim.beats(5, [10, 50], poll - 500, 1)  # the candidate reported the region while it was being moved
    assert sim.sup.table.contains(5, 10)
    sim.tick(poll)
    sim.status("p", MigrationState.FAILED, poll)
    assert not sim.sup.table.contains(5, 10)
    assert sim.sup.table.contains(1, 10)  # the region is still the source's, failed over again later
    for t in range(poll + 1000, poll + 60_000, 1000):
        sim.beats(5, [50], t, 1)
        for s in selects(sim.tick(t)):
            assert s.job.datanode_id != 5, "a candidate that never got the region was failed over"


def test_failed_keeps_a_target_detector_the_supervisor_did_not_make_for_the_candidate():
    """Only the candidate's detector of the moved regions goes: the target's own regions stay."""
    sim = CoreSim()
    poll = _in_flight(sim, (10,))
    sim.tick(poll)
    sim.status("p", MigrationState.FAILED, poll)
    assert sim.sup.table.contains(5, 50)


def test_a_count_that_only_grows_yields_at_most_the_cap():
    policy = FailoverPolicy(resubmit_backoff_ms=0, max_resubmissions_per_window=1_000_000)
    assert policy.max_failover_timeout_ms == 10 * policy.base_timeout_ms == 1_200_000
    sim = CoreSim(policy)
    sim.sup._registry.failover_counts[(1, 10)] = 10**9
    sim.beats(1, [10], 0, 5)
    t, sel = 4000, []
    while not sel:
        t += 100
        sel = selects(sim.tick(t))
    (sub,) = submits(sim.select_done(sel[0].job, [P5], t, from_peer=SRC))
    assert sub.task.timeout_ms == 1_200_000


def test_a_stored_timeout_above_the_cap_is_capped_by_the_new_leader():
    """A record written by a leader with a larger cap (or none): the successor's cap bounds it."""
    sim = CoreSim(is_leader=False)
    rec = InFlightRecord("r-1", 1, SRC, P5, (10,), 10**12, MIGRATING)
    state = StoredState(registry={1: as_region_array([10])}, inflight={"r-1": rec})
    sim.handle(BecomeLeader(2, state), 0)
    sim.sup.drain_outbox()
    assert sim.value("supervisor_migrations_in_flight") == 1
    cap = sim.policy.max_failover_timeout_ms
    sim.tick(cap - 1)
    assert sim.value("supervisor_migrations_in_flight") == 1
    sim.tick(cap + 1)
    assert sim.value("supervisor_migrations_in_flight") == 0


def test_with_the_dry_run_a_success_does_not_watch_a_target_that_never_got_the_regions():
    """The embedded RegionMigration moves nothing: watching its "target" would convict it there and fail
    the region over again and again, one dry run after another."""
    from supervisor_service.app.settings import load_settings

    assert load_settings().failover_policy().watch_target_on_success is False
    assert load_settings(region_migration_endpoint="rm:1").failover_policy().watch_target_on_success is True
    import dataclasses

    sim = CoreSim(dataclasses.replace(CoreSim().policy, watch_target_on_success=False))
    poll = _in_flight(sim, (10,))
    sim.tick(poll)
    sim.status("p", MigrationState.SUCCEEDED, poll)
    assert not sim.sup.table.contains(5, 10) and not sim.sup.table.contains(1, 10)
