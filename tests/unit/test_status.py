"""CoreStatus: what the core publishes after every event for other threads (docs/design.md §10).

The edge reads only `supervisor.status`: it is replaced after each event, before the event's
reply is resolved (the runtime resolves it after `handle` returns), and never mutated.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import pytest

from supervisor_service.core import (
    BecomeLeader,
    ClockMark,
    CoreStatus,
    Dump,
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    LoseLeadership,
    PhiAccrualOptions,
    ReleaseHold,
    SetMaintenance,
    StoredState,
    Supervisor,
    Tick,
    as_region_array,
)
from tests.support.core_fakes import FakeMetrics

OPTS = PhiAccrualOptions()


GUARDS = GuardSettings()


def supervisor(guards: GuardSettings | None = GUARDS, **kwargs) -> Supervisor:
    return Supervisor(OPTS, FakeMetrics(), FailoverPolicy(), guards=Guards(guards) if guards else None, **kwargs)


def beat(sup: Supervisor, datanode_id: int, now: int) -> None:
    sup.handle(Heartbeat(datanode_id, as_region_array([datanode_id * 10]), now), now)


def test_the_first_status_is_the_constructors():
    assert supervisor(is_leader=False, leader_term=4, maintenance=True).status == CoreStatus(
        is_leader=False, term=4, maintenance=True, guards_enabled=True)
    assert supervisor(None).status == CoreStatus(is_leader=True, term=1, guards_enabled=False)


def test_status_after_set_maintenance_includes_it():
    sup = supervisor()
    sup.handle(SetMaintenance(True, ttl_ms=60_000), 1000)
    assert (sup.status.maintenance, sup.status.maintenance_until_ms) == (True, 61_000)
    sup.handle(SetMaintenance(True, datanode_ids=(7, 3), ttl_ms=5000), 2000)
    sup.handle(SetMaintenance(True, datanode_ids=(5,)), 2000)
    assert sup.status.datanode_maintenance == ((3, 7000), (5, 0), (7, 7000))
    sup.handle(SetMaintenance(False, datanode_ids=(3,)), 3000)
    sup.handle(SetMaintenance(False), 3000)
    status = sup.status
    assert (status.maintenance, status.maintenance_until_ms, status.datanode_maintenance) == (
        False, 0, ((5, 0), (7, 7000)))


def test_status_is_replaced_never_changed():
    sup = supervisor()
    before = sup.status
    sup.handle(SetMaintenance(True), 0)
    assert sup.status is not before and before.maintenance is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        sup.status.maintenance = False  # type: ignore[misc]


def test_a_heartbeat_publishes_no_new_status():
    sup = supervisor()
    before = sup.status
    beat(sup, 1, 0)
    assert sup.status is before


def test_status_after_become_and_lose_leadership():
    sup = supervisor(is_leader=False, leader_term=0)
    state = StoredState(registry={1: as_region_array([10])}, maintenance=True, maintenance_until_ms=0,
                        datanode_maintenance={4: 0}, maintenance_mark=ClockMark("", 0, 0))
    sup.handle(BecomeLeader(5, state), 1000)
    assert sup.status == CoreStatus(is_leader=True, term=5, maintenance=True, datanode_maintenance=((4, 0),),
                                    guards_enabled=True)
    sup.handle(Tick(), 2000)
    assert sup.status.holds == ("maintenance", "warmup")
    sup.handle(LoseLeadership(), 3000)
    assert sup.status.is_leader is False and sup.status.term == 5
    assert sup.status.holds == ()


def _mass_failure(sup: Supervisor) -> int:
    """Four datanodes heartbeat for 10 s, then three go silent: ticks until the mass-failure hold."""
    now = 0
    for now in range(0, 10_001, 1000):
        for d in (1, 2, 3, 4):
            beat(sup, d, now)
        sup.handle(Tick(), now)
    while "mass_failure" not in sup.status.holds:
        assert now < 60_000, "no mass-failure hold"
        now += 1000
        beat(sup, 1, now)
        sup.handle(Tick(), now)
    return now


def test_status_after_release_hold():
    sup = supervisor()
    now = _mass_failure(sup)
    assert sup.status.holds == ("mass_failure",)
    assert sup.status.failed_datanode_fraction == 0.75
    reply: Future[bool] = Future()
    assert sup.handle(ReleaseHold(reply), now) is True
    # The release is seen by the next tick's holds; what the status shows is the last tick's.
    assert sup.status.holds == ("mass_failure",)
    sup.handle(Tick(), now + 1000)
    assert sup.status.holds == ()
    assert sup.status.failed_datanode_fraction == 0.75


@pytest.mark.parametrize("guards", [None, GUARDS], ids=["guards_disabled", "guards_enabled"])
def test_maintenance_and_warmup_holds_are_published_whatever_the_guards(guards):
    """Maintenance and warm-up are not guards: GetFailoverHolds and Dump show them with guards off too."""
    sup = supervisor(guards)
    sup.handle(SetMaintenance(True), 0)
    sup.handle(Tick(), 1000)
    assert sup.status.holds == ("maintenance",)
    assert sup.handle(Dump(Future()), 1000).holds == ("maintenance",)
    sup.handle(SetMaintenance(False), 1500)
    sup.handle(BecomeLeader(2, StoredState(registry={1: as_region_array([10]), 2: as_region_array([20])})), 2000)
    sup.handle(Tick(), 3000)
    assert sup.status.holds == ("warmup",)
    assert sup.handle(Dump(Future()), 3000).holds == ("warmup",)
    assert sup.status.guards_enabled is (guards is not None)
