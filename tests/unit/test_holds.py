"""holds: what holds all failover, the warm-up, the rate-limited held lines (docs/design.md §5).

Maintenance and warm-up are not guards: they hold failover with the guards off too.
"""

from __future__ import annotations

import logging

from supervisor_service.core import FailoverPolicy, Guards, GuardSettings, PhiAccrualOptions
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detection import Detection
from supervisor_service.core.holds import HoldLog, Holds, Warmup
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.table import DetectorTable
from tests.support.core_fakes import FakeMetrics

POLICY = FailoverPolicy(warmup_grace_ms=30_000, warmup_fraction=0.5, log_interval_ms=60_000)


def holds(guards: Guards | None):
    metrics = FakeMetrics()
    table = DetectorTable(PhiAccrualOptions())
    maintenance = Maintenance(POLICY, metrics, ClockBase(), Detection(table, metrics), Outbox(), False)
    warmup = Warmup(POLICY)
    return Holds(metrics, maintenance, warmup, guards), maintenance, warmup, metrics


def test_holds_of_all_failover_most_fundamental_first():
    guards = Guards(GuardSettings())
    h, maintenance, warmup, _ = holds(guards)
    assert h.compute(0, None) == ()
    maintenance.enabled = True
    warmup.start([1, 2], 0)
    assert h.compute(1000, "local_pause") == ("maintenance", "warmup", "local_pause")


def test_maintenance_and_warmup_hold_without_guards():
    h, maintenance, warmup, metrics = holds(None)
    maintenance.enabled = True
    warmup.start([1], 0)
    assert h.compute(1000, None) == ("maintenance", "warmup")
    h.publish(("maintenance", "warmup"))
    assert h.current == ("maintenance", "warmup")
    assert metrics.failover_hold.child(reason="maintenance") == 1
    assert metrics.failover_hold.child(reason="mass_failure") == 0
    h.reset()
    assert h.current == ()


def test_warmup_ends_at_its_grace_or_when_enough_datanodes_were_heard():
    w = Warmup(POLICY)
    assert not w.active(0), "no warm-up before a leadership"
    w.start([1, 2, 3, 4], 0)
    w.heard(1)
    assert w.active(1000)
    w.heard(2)
    assert not w.active(1000), "half of the known datanodes heard"
    w.heard(3)
    assert not w.active(1000), "once ended, it stays ended"
    w.start([1, 2], 0)
    assert w.active(29_999) and not w.active(30_000)


def test_held_lines_are_rate_limited_per_kind(caplog):
    log = HoldLog(POLICY)
    with caplog.at_level(logging.WARNING, logger="supervisor_service.supervisor"):
        log(0, "failover_held_maintenance", regions=1)
        log(59_999, "failover_held_maintenance", regions=2)
        log.keyed(59_999, "selector_invalid/zero_id", "failover_selector_answer_invalid")
        log.keyed(59_999, "selector_invalid/no_address", "failover_selector_answer_invalid")
        log(60_000, "failover_held_maintenance", regions=3)
    assert [(r.getMessage(), r.fields.get("regions")) for r in caplog.records] == [
        ("failover_held_maintenance", 1),
        ("failover_selector_answer_invalid", None),
        ("failover_selector_answer_invalid", None),
        ("failover_held_maintenance", 3),
    ]
