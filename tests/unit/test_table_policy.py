"""Per-table failover policy in the core (docs/design.md §17): a disabled table's regions stay put
while the others move, counted and explained; under a tight rate limit higher priorities go first."""

from __future__ import annotations

from supervisor_service.core import (
    BecomeLeader,
    ListTablePolicies,
    Peer,
    SetTablePolicy,
    StoredState,
    TablePoliciesSet,
    TablePolicy,
    table_of,
)
from tests.support.coresim import CoreSim, quiet_guards, selects, submits

P5 = Peer(5, "dn5:1")


def rid(table: int, number: int) -> int:
    return (table << 32) | number


def _fail(sim: CoreSim, regions, datanode=1, until=60_000):
    """Datanode `datanode` reports `regions` for 5 s and dies; ticks until its failover is asked."""
    sim.beats(datanode, regions, 0, 5)
    for t in range(5000, until, 500):
        found = [s for s in selects(sim.tick(t)) if s.job.datanode_id == datanode]
        if found:
            return t, found[0]
    raise AssertionError("never failed over")


def test_table_of_is_the_high_32_bits():
    assert table_of(rid(1024, 7)) == 1024 and table_of(7) == 0 and table_of(2**64 - 1) == 2**32 - 1


def test_a_disabled_tables_regions_stay_put_while_the_others_move():
    sim = CoreSim()
    policies = sim.handle(SetTablePolicy((7,), failover_enabled=False), 0)
    assert policies == (TablePolicy(7, False, 0),)
    assert [c for c in sim.sup.drain_changes() if isinstance(c, TablePoliciesSet)] == [TablePoliciesSet(policies)]
    regions = [rid(7, 1), rid(7, 2), rid(8, 1), rid(9, 1)]
    t, sel = _fail(sim, regions)
    assert set(sel.job.region_ids) == {rid(8, 1), rid(9, 1)}
    assert sim.skipped("table_disabled") == 2
    (sub,) = submits(sim.select_done(sel.job, [P5, P5], t))
    assert set(sub.task.region_ids) == {rid(8, 1), rid(9, 1)}
    assert "table_disabled" in (sim.sup.why_not_failed_over(1, rid(7, 1)) or "")
    assert sim.sup.why_not_failed_over(1, rid(8, 1)) is None
    # Still watched, still failed, still not moved at later ticks.
    assert sim.sup.table.contains(1, rid(7, 1))
    for later in range(t + 1000, t + 20_000, 1000):
        for s in selects(sim.tick(later)):
            assert not {rid(7, 1), rid(7, 2)} & set(s.job.region_ids)
    # Enabled again: they fail over.
    sim.handle(SetTablePolicy((7,), failover_enabled=True), t + 20_000)
    assert sim.handle(ListTablePolicies(), t + 20_000) == ()  # the default policy is no policy
    sel2 = selects(sim.tick(t + 21_000))
    assert sel2 and {rid(7, 1), rid(7, 2)} <= set(sel2[0].job.region_ids)


def test_priorities_order_submissions_under_a_tight_target_budget():
    sim = CoreSim(guards=quiet_guards(target_regions_per_s=1, target_burst_regions=2))
    sim.handle(SetTablePolicy((30,), True, priority=10), 0)
    sim.handle(SetTablePolicy((20,), True, priority=5), 0)
    sim.sup.drain_changes()
    regions = [rid(10, 1), rid(10, 2), rid(20, 1), rid(30, 1), rid(30, 2), rid(40, 1)]
    t, sel = _fail(sim, regions)
    assert list(sel.job.region_ids[:3]) == [rid(30, 1), rid(30, 2), rid(20, 1)]
    (sub,) = submits(sim.select_done(sel.job, [P5] * len(sel.job.region_ids), t))
    assert sub.task.region_ids == (rid(30, 1), rid(30, 2))  # the budget of 2 went to the highest priority


def test_datanodes_with_higher_priority_tables_go_first_under_the_global_budget():
    sim = CoreSim(guards=quiet_guards(failover_rate_per_s=0.001, failover_burst=1))
    sim.handle(SetTablePolicy((99,), True, priority=1), 0)
    sim.beats(1, [rid(10, 1)], 0, 5)
    sim.beats(2, [rid(99, 1)], 0, 5)
    for t in range(5000, 60_000, 500):
        found = selects(sim.tick(t))
        if found:
            assert [s.job.datanode_id for s in found] == [2]
            return
    raise AssertionError("never failed over")


def test_policies_are_loaded_by_a_new_leader():
    sim = CoreSim(is_leader=False)
    state = StoredState(registry={}, table_policies=(TablePolicy(7, False, 3), TablePolicy(8, True, -2)))
    sim.handle(BecomeLeader(2, state), 0)
    assert sim.handle(ListTablePolicies(), 0) == (TablePolicy(7, False, 3), TablePolicy(8, True, -2))
    assert sim.handle(ListTablePolicies((8, 100)), 0) == (TablePolicy(8, True, -2), TablePolicy(100, True, 0))


def test_the_number_of_tables_with_a_policy_is_bounded_and_a_refusal_changes_nothing():
    from supervisor_service.core.policy import MAX_TABLE_POLICIES, PolicyRefused

    sim = CoreSim()
    assert len(sim.handle(SetTablePolicy(tuple(range(MAX_TABLE_POLICIES)), False), 0)) == MAX_TABLE_POLICIES
    sim.sup.drain_changes()
    refused = sim.handle(SetTablePolicy((MAX_TABLE_POLICIES, MAX_TABLE_POLICIES + 1), False), 0)
    assert isinstance(refused, PolicyRefused) and "at most 10000" in str(refused)
    assert sim.sup.drain_changes() == []
    assert len(sim.handle(ListTablePolicies(), 0)) == MAX_TABLE_POLICIES
    # Changing tables that have one, or removing them, is always possible.
    assert sim.handle(SetTablePolicy((0, 1), True, 4), 0)[0].priority == 4
    sim.handle(SetTablePolicy((2, 3), True, 0), 0)
    assert len(sim.handle(ListTablePolicies(), 0)) == MAX_TABLE_POLICIES - 2


def test_a_part_left_out_keeps_what_the_table_has():
    sim = CoreSim()
    assert sim.handle(SetTablePolicy((5,), priority=10), 0) == (TablePolicy(5, True, 10),)  # not turned off
    assert sim.handle(SetTablePolicy((5, 6), failover_enabled=False), 0) == (TablePolicy(5, False, 10),
                                                                              TablePolicy(6, False, 0))
    assert sim.handle(SetTablePolicy((5,), priority=0), 0) == (TablePolicy(5, False, 0),)
