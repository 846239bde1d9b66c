"""backoff.ResubmitBackoff on its own: when a region whose decision ended unsettled may go again (docs/design.md §4)."""

from __future__ import annotations

import logging

from supervisor_service.core import FailoverPolicy
from supervisor_service.core.backoff import ResubmitBackoff

POLICY = FailoverPolicy(resubmit_backoff_ms=10_000, resubmit_backoff_max_ms=35_000, max_resubmissions_per_window=3,
                        resubmit_window_ms=600_000)


def test_the_backoff_doubles_per_unsettled_end_up_to_its_cap():
    b = ResubmitBackoff(POLICY)
    waits = []
    now = 0
    for _ in range(3):
        b.back_off(1, [10], "failed", now)
        waits.append(b.until_ms[10] - now)
        now = b.until_ms[10]
    assert waits == [10_000, 20_000, 35_000]


def test_due_splits_ready_backed_off_and_limited_regions():
    b = ResubmitBackoff(POLICY)
    for t in (0, 1, 2, 3):  # four ends within the window: over the limit of three
        b.back_off(1, [10], "not_found", t)
    b.back_off(1, [11], "refused", 3)
    assert b.due([10, 11, 12], 4) == ([12], 1, 1)
    assert b.until_ms[10] == 0 + POLICY.resubmit_window_ms  # the first end of the window, plus the window
    assert b.due([11], 3 + 10_000) == ([11], 0, 0)
    assert 11 not in b.until_ms, "a region taken when due keeps no backoff"


def test_expire_forgets_what_ran_out_and_forget_drops_a_region():
    b = ResubmitBackoff(POLICY)
    b.back_off(1, [10, 11], "failed", 0)
    assert b
    b.expire(10_000)
    assert not b and set(b.ended_ms) == {10, 11}, "the ends are kept for the window's limit"
    b.expire(600_000)
    assert b.ended_ms == {}
    b.back_off(1, [12], "failed", 600_000)
    b.forget(12)
    assert b.until_ms == {} and b.ended_ms == {}


def test_a_backoff_is_logged_once_per_decision(caplog):
    b = ResubmitBackoff(POLICY)
    with caplog.at_level(logging.WARNING, logger="supervisor_service.supervisor"):
        b.back_off(1, [10, 11], "not_found", 0, "p-1")
        b.back_off(1, [12], "peer_conflict", 0, "p-2")
    assert [r.getMessage() for r in caplog.records] == ["migration_not_found", "failover_resubmission_backed_off"]
    assert caplog.records[0].fields["regions"] == 2 and caplog.records[0].fields["procedure_id"] == "p-1"
