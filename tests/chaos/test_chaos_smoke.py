"""The `make test` subset of the chaos suite: about a minute of seed 7's faults on the full cluster,
and the disk scenario; the checker must find no violation. `make chaos` runs the long version."""

from __future__ import annotations

import os

import pytest

from tests.chaos.disk import disk_available, run_disk
from tests.chaos.report import render
from tests.chaos.run import run_chaos
from tests.support.servers import require_binary

pytestmark = pytest.mark.realtime

SMOKE_SEED = 7
# The kinds most likely to break an invariant, so the minute is spent on them.
SMOKE_KINDS = ("replica_kill", "replica_pause", "etcd_kill_majority", "etcd_pause_one", "cut_etcd",
               "cut_datanodes_oneway", "cut_remotes", "loss", "migration_hang", "migration_unknown_procedure",
               "migration_two_categories", "migration_slow", "selector_self", "clock_forward", "clock_back")


@pytest.mark.timeout(240)
def test_a_minute_of_chaos_breaks_no_invariant(tmp_path):
    require_binary("etcd", "etcd-server")
    require_binary("gcc", "gcc")
    result = run_chaos(seed=SMOKE_SEED, seconds=35, datanodes=16, deaths_count=2, kinds=SMOKE_KINDS,
                       work_dir=str(tmp_path / "cluster"), log=lambda *_: None, failover_bound_s=45.0)
    report = render(SMOKE_SEED, result.faults, result.history, result.violations, result.numbers,
                    result.nemesis_errors)
    assert not result.violations, report
    assert not result.nemesis_errors, report
    assert len(result.history.faults) >= 8, report
    assert result.history.deaths and any(s.executed for s in result.history.submits), report


@pytest.mark.timeout(180)
def test_the_disk_scenario_breaks_no_invariant(tmp_path):
    why = disk_available()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    result = run_disk(seed=SMOKE_SEED, work_dir=str(tmp_path / "disk"), log=lambda *_: None)
    assert not result.violations, result.report()
    assert result.refusals, "the full and read-only disk refused nothing: " + result.report()
