"""The chaos checker on hand-made histories: a clean one passes, and each invariant's violation is
found (so a chaos run that reports "held" could have reported otherwise)."""

from __future__ import annotations

import pytest

from tests.chaos import history as hist
from tests.chaos.history import Ack, Death, History, Poll, Submit, check
from tests.chaos.nemesis import KIND_NAMES, deaths, schedule
from tests.chaos.report import attribute, table


def _submit(at, replica="r0", term=5, request_id="q1", from_id=7, regions=(70, 71), outcome="OK",
            procedure="p1", category="submitted"):
    return Submit(at=at, replica=replica, term=term, request_id=request_id, from_id=from_id, to_id=2,
                  regions=list(regions), outcome=outcome, categories={category: list(regions)} if category else {},
                  procedure_id=procedure)


def clean() -> History:
    """Datanode 7 dies at 10 s and is failed over once; datanodes 1..3 live; two acknowledged writes."""
    return History(
        seed=1,
        submits=[_submit(20.0), _submit(21.0, outcome="CLIENT_GONE")],  # a retry of the same decision
        polls=[Poll(22.0, "r0", "p1", "MIGRATION_STATE_SUCCEEDED")],
        acks=[Ack(5.0, "register", pairs=[[1, 100]]), Ack(6.0, "maintenance", datanode_ids=[9000])],
        deaths=[Death(10.0, 7, [70, 71])],
        live_datanodes=[1, 2, 3],
        healed_at=15.0, leader_at=16.0, heartbeats_accepted_at={1: 16.5, 2: 16.6, 3: 17.0},
        final_pairs=[[1, 100], [1, 101]], final_maintenance=[9000], final_read=True, ended_at=40.0,
        failover_bound_s=30.0, recovery_bound_s=10.0,
    )


def _invariants(h: History) -> set[str]:
    return {v.invariant for v in check(h)}


def test_a_clean_history_passes():
    assert check(clean()) == []


def test_two_replicas_submitting_in_one_term_is_found():
    h = clean()
    h.submits.append(_submit(22.0, replica="r1", request_id="q2", regions=[72], from_id=8))
    h.deaths.append(Death(11.0, 8, [72]))
    assert _invariants(h) == {hist.SINGLE_SUBMITTER}


def test_a_lower_term_carried_out_after_a_higher_one_is_found():
    h = clean()
    h.deaths.append(Death(11.0, 8, [80]))
    h.submits = [_submit(20.0, term=6, request_id="q2", from_id=8, regions=[80], procedure="p2", replica="r1"),
                 _submit(20.5, term=5)]
    assert _invariants(h) == {hist.TERMS_FORWARD}


def test_a_stale_term_refused_by_fencing_is_no_violation():
    h = clean()
    h.submits.insert(0, _submit(19.0, term=6, request_id="q0", from_id=8, regions=[80], replica="r1",
                                outcome="FAILED_PRECONDITION", category=""))
    h.submits.append(_submit(25.0, term=4, request_id="q9", replica="r2", outcome="FAILED_PRECONDITION",
                             category=""))
    assert check(h) == []


def test_a_second_decision_while_the_first_runs_is_found():
    h = clean()
    h.submits.append(_submit(23.0, term=5, request_id="q2", procedure="p2"))
    found = check(h)
    assert {v.invariant for v in found} == {hist.NO_DOUBLE_SUBMIT}
    assert "region 70 of datanode 7" in found[0].detail


def test_a_second_decision_after_not_found_is_allowed_but_not_before():
    h = clean()
    h.polls = [Poll(22.0, "r0", "p1", "MIGRATION_STATE_NOT_FOUND")]
    h.submits.append(_submit(24.0, request_id="q2", procedure="p2"))
    assert check(h) == []
    h.submits[-1].at = 21.5  # before the status said it was gone
    assert _invariants(h) == {hist.NO_DOUBLE_SUBMIT}


def test_a_dead_datanode_moved_again_after_its_move_succeeded_is_a_double():
    h = clean()  # p1 SUCCEEDED at 22: datanode 7 is dead, nothing may move its regions again
    h.submits.append(_submit(30.0, request_id="q2", procedure="p2", term=9, replica="r1"))
    assert _invariants(h) == {hist.NO_DOUBLE_SUBMIT}


def test_a_live_datanode_failing_again_after_a_finished_move_is_a_new_decision():
    h = clean()
    h.deaths, h.live_datanodes = [], [1, 2, 3, 7]
    h.heartbeats_accepted_at[7] = 16.0
    h.submits.append(_submit(30.0, request_id="q2", procedure="p2"))
    assert _invariants(h) == {hist.LIVE_NOT_FAILED_OVER}  # a false failover, but not a double one
    h.deaths, h.live_datanodes = [Death(25.0, 7, [70, 71])], [1, 2, 3]  # it dies after the move ended
    assert _invariants(h) == {hist.LIVE_NOT_FAILED_OVER}


def test_a_dead_datanode_not_failed_over_in_time_is_found():
    h = clean()
    h.submits = [_submit(50.0)]  # healed at 15, bound 30: due at 45
    assert _invariants(h) == {hist.DEAD_FAILED_OVER}
    h.submits = []
    assert _invariants(h) == {hist.DEAD_FAILED_OVER}
    h.submits = [_submit(20.0, regions=[70])]  # one region of two
    assert _invariants(h) == {hist.DEAD_FAILED_OVER}


def test_a_live_datanode_failed_over_is_found():
    h = clean()
    h.submits.append(_submit(25.0, request_id="q3", from_id=2, regions=[20], procedure="p3"))
    assert _invariants(h) == {hist.LIVE_NOT_FAILED_OVER}
    h = clean()
    h.submits.insert(0, _submit(9.0, request_id="q0", procedure="p0", category=""))  # before its death at 10
    assert hist.LIVE_NOT_FAILED_OVER in _invariants(h)


def test_a_refused_submission_of_a_live_datanode_is_no_failover():
    h = clean()
    h.submits.append(_submit(25.0, request_id="q3", from_id=2, regions=[20], outcome="UNAVAILABLE", category=""))
    assert check(h) == []


def test_a_lost_acknowledged_write_is_found():
    h = clean()
    h.final_pairs = [[1, 101]]
    assert _invariants(h) == {hist.ACKED_KEPT}
    h = clean()
    h.final_maintenance = []
    assert _invariants(h) == {hist.ACKED_KEPT}
    h = clean()
    h.final_read = False
    assert _invariants(h) == {hist.ACKED_KEPT}


def test_a_registered_region_of_a_dead_datanode_may_be_gone():
    h = clean()
    h.acks.append(Ack(7.0, "register", pairs=[[7, 72]]))
    assert check(h) == []


def test_no_leader_or_unheard_datanodes_after_healing_are_found():
    h = clean()
    h.leader_at = None
    assert _invariants(h) == {hist.RECOVERY}
    h = clean()
    h.leader_at = 26.0
    assert _invariants(h) == {hist.RECOVERY}
    h = clean()
    h.heartbeats_accepted_at[3] = None
    assert _invariants(h) == {hist.RECOVERY}
    h.heartbeats_accepted_at[3] = 30.0
    assert _invariants(h) == {hist.RECOVERY}


def test_history_round_trips_through_json():
    h = clean()
    h.submits.append(_submit(23.0, request_id="q2", procedure="p2"))
    again = History.from_json(h.to_json())
    assert again == h
    assert check(again) == check(h)


def test_violations_are_attributed_to_the_faults_on_at_the_time():
    h = clean()
    h.faults = [hist.FaultRecord("cut_etcd", "r0", 18.0, 22.0), hist.FaultRecord("delay", "r1", 1.0, 2.0)]
    h.submits.append(_submit(23.0, request_id="q2", procedure="p2"))
    violations = check(h)
    assert attribute(h, violations) == {("cut_etcd", hist.NO_DOUBLE_SUBMIT): 1}
    text = table(h, violations)
    assert "VIOLATED x1" in text and "| delay" in text


@pytest.mark.parametrize("seed", [1, 2, 3, 12345])
def test_the_schedule_is_a_function_of_the_seed(seed):
    assert schedule(seed, 120) == schedule(seed, 120)
    assert deaths(seed, 120, list(range(1, 25)), 3) == deaths(seed, 120, list(range(1, 25)), 3)
    assert schedule(seed, 120) != schedule(seed + 1, 120)
    faults = schedule(seed, 200)
    assert {f.kind for f in faults} == set(KIND_NAMES)  # a few minutes inject every kind
    assert all(0 < f.start < 200 and f.duration > 0 for f in faults)
