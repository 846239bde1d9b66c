"""Explain and WhatIf (core/insight.py, core/whatif.py) on a fake clock: Explain for a healthy, a failing, a
held (maintenance, mass failure, rate limit) and an in-flight region; a what-if against the real outcome of
the same scenario (a single failure, a mass failure, a rate-limited burst), and that it changes nothing."""

from __future__ import annotations

import copy

from supervisor_service.core import FailoverPolicy, GuardSettings, MigrationState, SetMaintenance
from supervisor_service.core.insight import ExplainQuery, ListFailoversQuery, WhatIfQuery
from supervisor_service.core.planned_events import SetTablePolicy, StartDrain
from supervisor_service.core.reasons import clock_text
from tests.support.insight_sim import START, TICK, InsightSim


def warm(sim: InsightSim) -> None:
    sim.run_to(START + 20 * TICK)


def region(d: int, i: int = 0) -> int:
    return (d << 32) | i


def test_explain_a_healthy_region_says_when_it_would_fail():
    sim = InsightSim()
    warm(sim)
    ex = sim.ask(ExplainQuery(2, region(2)))
    assert ex.found and len(ex.detectors) == 1
    row = ex.detectors[0]
    assert row.available and row.phi < 8
    assert ex.verdict.startswith("healthy: phi ")
    # With nothing arriving, the first tick at or after the prediction convicts it.
    assert sim.now + 10_000 < ex.predicted_failure_millis < sim.now + 13_000
    assert clock_text(ex.predicted_failure_millis) in ex.verdict
    sim.alive.discard(2)
    while not sim.selections():
        sim.step()
    convicted = sim.selections()[0][0]
    assert ex.predicted_failure_millis <= convicted < ex.predicted_failure_millis + TICK
    assert ex.holds == ()


def test_explain_a_whole_datanode_and_an_unknown_one():
    sim = InsightSim(regions=3)
    warm(sim)
    ex = sim.ask(ExplainQuery(4))
    assert len(ex.detectors) == 3 and ex.verdict.startswith("datanode 4: 3 regions, 0 failing, 0 in flight; healthy")
    assert not sim.ask(ExplainQuery(99)).found
    assert not sim.ask(ExplainQuery(4, region(4, 7))).found


def test_explain_a_failing_region_held_by_maintenance_of_its_datanode():
    sim = InsightSim()
    warm(sim)
    sim.handle(SetMaintenance(True, None, (3,), 600_000))
    sim.alive.discard(3)
    sim.run_to(sim.now + 15 * TICK)
    ex = sim.ask(ExplainQuery(3, region(3)))
    assert not ex.detectors[0].available
    until = clock_text(START + 20 * TICK + 600_000)
    assert ex.verdict.startswith("failing (phi ")
    assert f"held: maintenance of datanode 3 until {until}" in ex.verdict
    assert ex.holds == (f"held: maintenance of datanode 3 until {until}",)
    assert not sim.submissions()


def test_explain_a_mass_failure_hold():
    sim = InsightSim()
    warm(sim)
    sim.alive -= {1, 2, 3, 4, 5, 6}
    sim.run_to(sim.now + 15 * TICK)
    ex = sim.ask(ExplainQuery(2, region(2)))
    assert "held: mass failure, 6 datanodes silent (0.60 > 0.50)" in ex.verdict
    assert "supervisor-service hold release" in ex.verdict
    assert not sim.submissions()


def test_explain_a_rate_limited_region_says_when_the_next_token_comes():
    sim = InsightSim(guards=GuardSettings(failover_rate_per_s=0.1, failover_burst=1, max_failed_datanode_fraction=1.0))
    warm(sim)
    sim.alive -= {2, 3}
    while len(sim.submissions()) < 1:
        sim.step()
    sim.step()
    ex = sim.ask(ExplainQuery(3, region(3)))
    assert "rate limited: next token in " in ex.verdict, ex.verdict
    left = float(ex.verdict.split("next token in ")[1].split(" s")[0])
    assert 0 < left <= 10.0
    # The next token is when the other datanode goes.
    at = sim.now
    while len(sim.submissions()) < 2:
        sim.step()
    assert at + left * 1000 <= sim.submissions()[1][0] < at + left * 1000 + TICK


def test_explain_an_in_flight_region_names_its_procedure_and_its_history():
    sim = InsightSim()
    warm(sim)
    sim.alive.discard(5)
    while not sim.submissions():
        sim.step()
    ex = sim.ask(ExplainQuery(5, region(5, 1)))
    assert ex.detectors[0].migrating
    assert ex.verdict == "in flight: moving to datanode 1 under procedure proc-1"
    assert [f.failover_id for f in ex.failovers] == [f.failover_id for f in sim.ask(ListFailoversQuery())]


# ---------------------------------------------------------------- what-if against the real outcome


def predict_and_run(sim: InsightSim, datanodes: tuple[int, ...], horizon_ms: int = 120_000):
    """The what-if now, then the same scenario for real: (the plan, {datanode: first submit time})."""
    changes, status, budget = len(sim.changes), sim.sup.status, copy.deepcopy(vars(sim.guards.global_budget(sim.now)))
    explained = [sim.ask(ExplainQuery(d)) for d in datanodes]
    plan = sim.ask(WhatIfQuery(datanodes))
    # No state change: nothing for the store, no effect, the same status, budget and table.
    assert len(sim.changes) == changes and sim.sup.status == status and not sim.sup.drain_outbox()
    assert vars(sim.guards.global_budget(sim.now)) == budget
    assert [sim.ask(ExplainQuery(d)) for d in datanodes] == explained
    sim.alive -= set(datanodes)
    sim.run_to(sim.now + horizon_ms)
    submitted: dict[int, int] = {}
    for t, task in sim.submissions():
        submitted.setdefault(task.datanode_id, t)
    convicted: dict[int, int] = {}
    for t, d in sim.selections():
        convicted.setdefault(d, t)
    return plan, submitted, convicted


def test_what_if_a_single_failure_matches_the_real_outcome():
    sim = InsightSim()
    warm(sim)
    plan, submitted, _ = predict_and_run(sim, (7,))
    assert plan.held_by == ()
    (p,) = plan.plans
    assert p.datanode_id == 7 and p.regions == 2
    assert p.predicted_failure_millis <= submitted[7] < p.predicted_failure_millis + TICK
    assert p.earliest_submit_millis <= submitted[7] < p.earliest_submit_millis + TICK
    assert plan.all_submitted_by_millis == p.earliest_submit_millis
    assert "1 datanode (2 regions) would be convicted" in plan.summary


def test_what_if_a_mass_failure_matches_the_real_outcome_nothing_moves():
    sim = InsightSim()
    warm(sim)
    plan, submitted, _ = predict_and_run(sim, (1, 2, 3, 4, 5, 6))
    assert submitted == {}
    assert plan.held_by[0].startswith("mass_failure: 6 of 10 datanodes would be silent (0.60 > 0.50)")
    assert all(p.earliest_submit_millis == 0 for p in plan.plans) and plan.all_submitted_by_millis == 0
    assert "nothing would move" in plan.summary


def test_what_if_a_rate_limited_burst_matches_the_real_outcome():
    guards = GuardSettings(failover_rate_per_s=0.2, failover_burst=2, max_failed_datanode_fraction=1.0)
    sim = InsightSim(datanodes=10, guards=guards)
    warm(sim)
    plan, submitted, convicted = predict_and_run(sim, (2, 3, 4, 5))
    assert set(submitted) == {2, 3, 4, 5}
    for p in plan.plans:
        # Asked for targets at the first tick with a token, at or after its conviction.
        assert p.predicted_failure_millis <= convicted[p.datanode_id]
        assert p.earliest_submit_millis <= submitted[p.datanode_id] < p.earliest_submit_millis + TICK, p
    last = max(submitted.values())
    assert plan.all_submitted_by_millis <= last < plan.all_submitted_by_millis + TICK
    # Two go at once (the burst), the next two 5 s apart.
    gaps = sorted(p.earliest_submit_millis for p in plan.plans)
    assert gaps[1] - gaps[0] < TICK and gaps[2] - gaps[1] >= 4_000 and gaps[3] - gaps[2] >= 4_000


def test_what_if_a_maintained_datanode_is_held_and_unknown_ones_are_named():
    sim = InsightSim()
    warm(sim)
    sim.handle(SetMaintenance(True, None, (4,), 0))
    plan, submitted, _ = predict_and_run(sim, (4, 42), horizon_ms=40_000)
    assert submitted == {}
    assert "datanode 42 has no detector: nothing to fail over" in plan.held_by
    assert "datanode 4: held: maintenance of datanode 4 until switched off (no expiry)" in plan.held_by
    assert plan.plans[0].earliest_submit_millis == 0


def test_what_if_a_datanode_already_failed_or_in_flight():
    sim = InsightSim(guards=GuardSettings(max_failed_datanode_fraction=1.0),
                     policy=FailoverPolicy(rebaseline_after_maintenance=False))
    warm(sim)
    sim.alive.discard(4)
    while not sim.submissions():
        sim.step()
    plan = sim.ask(WhatIfQuery((4,)))
    assert plan.held_by == ("datanode 4: every region of it is already being migrated",) and plan.plans == ()
    # One failed (phi over the threshold) but held by maintenance: it would go at the next tick after the release.
    sim.handle(SetMaintenance(True, None, (6,), 0))
    sim.alive.discard(6)
    sim.run_to(sim.now + 15 * TICK)
    sim.handle(SetMaintenance(False, None, (6,), 0))
    plan = sim.ask(WhatIfQuery((6,)))
    (p,) = plan.plans
    assert p.predicted_failure_millis < sim.now and sim.now < p.earliest_submit_millis <= sim.now + TICK
    n = len(sim.submissions())
    sim.step()
    assert len(sim.submissions()) == n + 1 and sim.submissions()[-1][0] == p.earliest_submit_millis


def test_explain_a_failing_region_of_a_table_with_failover_disabled_says_so_and_it_stays():
    sim = InsightSim()
    warm(sim)
    sim.handle(SetTablePolicy((3,), failover_enabled=False))  # table 3: the regions (3 << 32) | i
    sim.alive.discard(3)
    sim.run_to(sim.now + 15 * TICK)
    ex = sim.ask(ExplainQuery(3, region(3)))
    assert not ex.detectors[0].available
    held = "held: failover of table 3 is disabled (policy set)"
    assert ex.verdict.startswith("failing (phi ") and ex.verdict.endswith(held)
    assert ex.holds == (held,)
    assert 3 not in [d for _, d in sim.selections()]
    # The other tables of a dead datanode are not held by it.
    sim.alive.discard(4)
    sim.run_to(sim.now + 15 * TICK)
    assert 4 in [d for _, d in sim.selections()] and 3 not in [d for _, d in sim.selections()]


def test_explain_a_datanode_being_drained_says_so():
    sim = InsightSim(regions=3)
    warm(sim)
    sim.poll_state = MigrationState.RUNNING  # the drain's migrations stay in flight
    sim.handle(StartDrain((5,), reason="hardware swap"))
    ex = sim.ask(ExplainQuery(5))
    assert any(h.startswith("held: datanode 5 is being drained by ") for h in ex.holds), ex.holds
    assert sim.ask(ExplainQuery(6)).holds == ()


def test_a_drain_decision_is_in_the_history_as_manual_with_its_drain():
    sim = InsightSim(regions=3)
    warm(sim)
    sim.handle(StartDrain((5,), reason="hardware swap"))
    sim.run_to(sim.now + 3 * TICK)
    records = sim.ask(ListFailoversQuery((5,), (), 0, 100))
    assert records and {r.trigger_reason for r in records} == {"manual"}
    assert sorted(r for rec in records for r in rec.region_ids) == sorted(sim.regions[5])
    assert all(any(c.startswith("drain: drain-") for c in rec.checks) for rec in records), records[0].checks
    assert all(5 not in (rec.to_peer.id,) for rec in records)
