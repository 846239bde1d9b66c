"""The guards against false and runaway failovers (docs/design.md §5), on a fake clock.

Each guard is driven through `Supervisor.handle(event, now)` with explicit
times: heartbeats and ticks are events, time moves only when the test says
so, and the effects (SelectPeers, SubmitMigration) are read from the outbox.
For every guard the tests check the setting, the metric, the log line, and
that turning the guard off restores the original behaviour. `Guards` and
`TokenBucket` are also exercised directly where that is clearer.

Detector parameters are the defaults (threshold 8, acceptable pause 10 s):
with a heartbeat every second, a datanode that goes silent is convicted on
the tick 12 s after its last heartbeat. Tests do not hard-code that: they
ask the detector table when a silent datanode crosses (`Sim.crossing`).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import ConfigError, load_settings
from supervisor_service.core import (
    BecomeLeader,
    CountsDrop,
    Dump,
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    MaintenanceSet,
    MigrationResult,
    Peer,
    PhiAccrualOptions,
    ReleaseHold,
    SelectionDone,
    SelectPeers,
    SetMaintenance,
    StoredState,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    TokenBucket,
    as_region_array,
)

OPTS = PhiAccrualOptions()
TICK = 1000
START = 1_700_000_000_000
ALL = tuple(range(1, 11))  # ten datanodes
NO_MASS = dict(max_failed_datanode_fraction=1.0)  # isolates another guard from the mass-failure one


def regions_of(datanode_id: int, n: int = 2) -> list[int]:
    return [(datanode_id << 32) | i for i in range(n)]


class Sim:
    """A Supervisor with guards, ten datanodes heartbeating every second, and a ticker, all on a fake clock.

    `step()` advances one tick interval: every alive datanode heartbeats (at its
    phase within the interval, default: at the tick time), then the tick runs.
    A datanode taken out of `alive` goes silent.
    """

    def __init__(
        self,
        guards: GuardSettings | None = GuardSettings(),
        policy: FailoverPolicy | None = None,
        *,
        datanodes=ALL,
        regions: int = 2,
        is_leader: bool = True,
        phases: dict[int, int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.guards = Guards(guards) if guards is not None else None
        self.sup = Supervisor(
            OPTS, self.metrics, policy or FailoverPolicy(), guards=self.guards, is_leader=is_leader
        )
        self.now = START
        self.regions = {d: regions_of(d, regions) for d in datanodes}
        self.alive = set(datanodes)
        self.phases = phases or {}
        self.timeline: list[tuple[int, object]] = []  # (time, effect), every effect ever drained

    # -- events

    def handle(self, event):
        return self.sup.handle(event, self.now)

    def beat(self, d: int, ts: int | None = None) -> None:
        ts = self.now if ts is None else ts
        self.sup.handle(Heartbeat(d, as_region_array(self.regions[d]), ts), ts)

    def drain(self) -> list:
        out = self.sup.drain_outbox()
        self.timeline.extend((self.now, e) for e in out)
        return out

    def tick(self, *, lag_ms: float = 0.0, queue_fill: float = 0.0) -> list:
        assert self.sup.handle(Tick(lag_ms=lag_ms, queue_fill=queue_fill), self.now) is None
        return self.drain()

    def step(self, ms: int = TICK, **tick_kw) -> list:
        start, self.now = self.now, self.now + ms
        for d in sorted(self.alive):
            self.beat(d, max(start + 1, self.now - TICK + self.phases.get(d, TICK)))
        return self.tick(**tick_kw)

    def run(self, ms: int) -> list:
        out = []
        for _ in range(ms // TICK):
            out += self.step()
        return out

    def run_to(self, t: int) -> list:
        out = []
        while self.now < t:
            out += self.step()
        return out

    def answer(self, job, *targets: int) -> list:
        """The Selector's answer: every region to `targets` (one each, or all to a single one)."""
        if len(targets) == 1:
            targets = targets * len(job.region_ids)
        self.handle(SelectionDone(job, from_peer=Peer(job.datanode_id), peers=tuple(Peer(t) for t in targets)))
        return tasks(self.drain())

    def fail_answer(self, job) -> None:
        self.handle(SelectionDone(job, error="selector unreachable", error_stage="select"))
        self.drain()

    def complete(self, task, category: str = "migrated") -> None:
        self.handle(SubmissionDone(task, result=MigrationResult(**{category: task.region_ids})))
        self.drain()

    def failover(self, job, target: int = 10, category: str = "migrated") -> list:
        submitted = self.answer(job, target)
        for task in submitted:
            self.complete(task, category)
        return submitted

    # -- observations

    def crossing(self, d: int) -> int:
        """The first tick time after now at which silent datanode `d` is failed."""
        t, r = self.now, self.regions[d][0]
        while True:
            t += TICK
            if self.sup.table.phi(d, r, t) >= OPTS.threshold:
                return t
            assert t - self.now < 120_000, "never crosses"

    def phi(self, d: int) -> float:
        return self.sup.table.phi(d, self.regions[d][0], self.now)

    def value(self, name: str, **labels) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def skipped(self, reason: str) -> float:
        return self.value("supervisor_failover_skipped_regions_total", reason=reason)

    def hold(self, reason: str) -> float:
        return self.value("supervisor_failover_hold", reason=reason)

    def fraction(self) -> float:
        return self.value("supervisor_failed_datanode_fraction")

    def selected_at(self) -> list[tuple[int, int]]:
        """(time, datanode) of every SelectPeers so far."""
        return [(t, e.job.datanode_id) for t, e in self.timeline if isinstance(e, SelectPeers)]


def jobs(effects) -> list:
    return [e.job for e in effects if isinstance(e, SelectPeers)]


def selected(effects) -> list[int]:
    return sorted(j.datanode_id for j in jobs(effects))


def tasks(effects) -> list:
    return [e.task for e in effects if isinstance(e, SubmitMigration)]




def warm(sim: Sim, ms: int = 30_000) -> None:
    effects = sim.run(ms)
    assert jobs(effects) == [], "a steady cluster fails nothing over"


# ====================================================================== local pause


class TestLocalPause:
    """A stall of the supervisor itself (GC, SIGSTOP, a full queue) convicts nobody."""

    def stalled(self, settings: GuardSettings | None, stall_ms: int = 20_000) -> tuple[Sim, list]:
        """Ten datanodes; the supervisor processes nothing for `stall_ms`; the first tick after it runs
        before the heartbeats that queued meanwhile (the worst order)."""
        sim = Sim(settings)
        warm(sim)
        sim.now += stall_ms
        return sim, sim.tick()

    def test_setting_default_is_cassandras_five_seconds(self):
        s = GuardSettings()
        assert s.max_local_pause_ms == 5000
        assert s.local_pause_hold_ms == 5000
        assert s.overload_queue_fraction == 0.9

    def test_stall_holds_convictions_then_a_really_dead_datanode_fails_over(self, logged):
        sim, effects = self.stalled(GuardSettings(**NO_MASS))
        # Every detector is 20 s late, but the supervisor was the one stalled.
        assert all(sim.phi(d) >= OPTS.threshold for d in ALL)
        assert jobs(effects) == []
        assert sim.hold("local_pause") == 1
        assert sim.skipped("local_pause") == 20  # 10 datanodes x 2 regions
        [line] = logged("failover_held_local_pause")
        assert line["datanodes"] == 10 and line["failed_regions"] == 20
        resumed = sim.now
        # The queued heartbeats land; datanode 9 really died during the stall.
        sim.alive.discard(9)
        for d in sim.alive:
            sim.beat(d)
        # Convictions stay held for local_pause_hold_ms: datanode 9 waits.
        assert jobs(sim.run_to(resumed + 4000)) == []
        assert sim.hold("local_pause") == 1
        assert sim.skipped("local_pause") == 20 + 4 * 2
        # Then it is failed over, and only it.
        effects = sim.step()
        assert sim.now == resumed + 5000
        assert selected(effects) == [9]
        assert sim.hold("local_pause") == 0

    def test_a_stall_is_not_taken_for_a_mass_failure(self):
        # The mass-failure guard on: after the stall every datanode looks silent until the queued
        # heartbeats land, but that silence is the supervisor's own; no mass-failure hold or alert.
        sim, effects = self.stalled(GuardSettings())
        assert jobs(effects) == []
        assert sim.hold("local_pause") == 1
        assert sim.hold("mass_failure") == 0 and sim.fraction() == 0
        for d in sim.alive:
            sim.beat(d)
        for _ in range(10):
            sim.step()
            assert sim.hold("mass_failure") == 0
        assert sim.selected_at() == []

    def test_a_real_mass_failure_during_a_stall_is_held_once_the_stall_hold_ends(self):
        sim, _ = self.stalled(GuardSettings())
        sim.alive.difference_update(range(1, 7))  # six died during the stall; their heartbeats never come
        for d in sim.alive:
            sim.beat(d)
        effects = sim.run(10_000)
        assert jobs(effects) == []
        assert sim.hold("local_pause") == 0 and sim.hold("mass_failure") == 1
        assert sim.fraction() == pytest.approx(0.6)

    def test_stall_with_every_datanode_back_fails_nothing_over(self):
        sim, effects = self.stalled(GuardSettings(**NO_MASS))
        assert jobs(effects) == []
        for d in sim.alive:
            sim.beat(d)
        assert jobs(sim.run(30_000)) == []
        assert sim.selected_at() == []

    def test_short_stall_is_not_a_pause(self):
        # A gap of 4 s beyond the tick interval is below max_local_pause_ms: nothing is held.
        sim, _ = self.stalled(GuardSettings(**NO_MASS), stall_ms=4000)
        assert sim.hold("local_pause") == 0

    @pytest.mark.parametrize(
        "settings",
        [GuardSettings(max_local_pause_ms=0, **NO_MASS), None],
        ids=["max_local_pause_ms=0", "guards=None"],
    )
    def test_off_the_stall_convicts_everyone(self, settings):
        sim, effects = self.stalled(settings)
        assert selected(effects) == list(ALL)
        assert sim.hold("local_pause") == 0

    def test_tick_lag_above_max_holds_too(self, logged):
        sim = Sim(GuardSettings())
        warm(sim)
        sim.alive.discard(9)
        crossing = sim.crossing(9)
        assert jobs(sim.run_to(crossing - TICK)) == []
        # The tick that first sees datanode 9 failed is processed 6 s late (lag measured by the runtime).
        effects = sim.step(lag_ms=6000)
        assert jobs(effects) == []
        assert sim.hold("local_pause") == 1
        assert sim.skipped("local_pause") == 2
        assert logged("failover_held_local_pause")
        assert jobs(sim.run_to(crossing + 4000)) == []
        assert selected(sim.step()) == [9]  # local_pause_hold_ms after the late tick
        assert sim.now == crossing + 5000

    def test_tick_lag_at_max_is_not_a_pause(self):
        sim = Sim(GuardSettings())
        warm(sim)
        sim.alive.discard(9)
        sim.run_to(sim.crossing(9) - TICK)
        assert selected(sim.step(lag_ms=5000)) == [9]

    def test_overload_holds_that_tick_only(self, logged):
        sim = Sim(GuardSettings())
        warm(sim)
        sim.alive.discard(9)
        sim.run_to(sim.crossing(9) - TICK)
        effects = sim.step(queue_fill=0.95)
        assert jobs(effects) == []
        assert sim.hold("overload") == 1
        assert sim.skipped("overload") == 2
        assert logged("failover_held_overload")
        effects = sim.step(queue_fill=0.5)
        assert selected(effects) == [9]
        assert sim.hold("overload") == 0

    def test_overload_off(self):
        sim = Sim(GuardSettings(overload_queue_fraction=1.0))
        warm(sim)
        sim.alive.discard(9)
        sim.run_to(sim.crossing(9) - TICK)
        assert selected(sim.step(queue_fill=1.0)) == [9]
        assert sim.hold("overload") == 0

    def test_guards_observe_tick_directly(self):
        g = Guards(GuardSettings(tick_interval_ms=1000, max_local_pause_ms=5000, local_pause_hold_ms=5000))
        assert g.observe_tick(1000, 0, 0) is None
        assert g.observe_tick(2000, 0, 0) is None
        assert g.observe_tick(8000, 0, 0) is None  # gap 5000 beyond the interval: not more than max
        assert g.observe_tick(14_001, 0, 0) == "local_pause"  # gap 5001
        assert g.local_pause_held(14_001)
        assert g.observe_tick(15_001, 0, 0) == "local_pause"  # still held
        assert g.observe_tick(19_000, 0, 0) == "local_pause"
        assert g.observe_tick(19_001, 0, 0) is None  # held until 14_001 + 5000
        assert not g.local_pause_held(19_001)
        assert g.observe_tick(20_001, 5001, 0) == "local_pause"  # lag alone
        busy = Guards(GuardSettings(overload_queue_fraction=0.9))
        assert busy.observe_tick(1000, 0, 0.91) == "overload"
        assert busy.observe_tick(2000, 0, 0.9) is None  # only while fuller than the fraction
        off = Guards(GuardSettings(max_local_pause_ms=0, overload_queue_fraction=1.0))
        assert off.observe_tick(0, 0, 0) is None
        assert off.observe_tick(100_000, 60_000, 1.0) is None


# ====================================================================== mass failure


class TestMassFailure:
    """More than half of the datanodes failing together: the supervisor is more likely the one cut off."""

    def cut(self, sim: Sim, datanodes) -> int:
        """Silence `datanodes` now; run to the tick at which they are all failed; returns that time."""
        sim.alive.difference_update(datanodes)
        crossing = max(sim.crossing(d) for d in datanodes)
        sim.run_to(crossing)
        return crossing

    def test_settings(self):
        s = GuardSettings()
        assert s.max_failed_datanode_fraction == 0.5  # Kubernetes: 0.55
        assert s.mass_failure_min_datanodes == 3
        # Silence counts before conviction: shorter than the default detection period (~11.5 s here).
        assert s.mass_failure_silence_ms < OPTS.acceptable_heartbeat_pause_ms

    def test_six_of_ten_at_once_hold_failover(self, logged):
        sim = Sim()
        warm(sim)
        self.cut(sim, range(1, 7))
        sim.run(10_000)
        assert sim.selected_at() == []
        assert sim.hold("mass_failure") == 1
        assert sim.fraction() == pytest.approx(0.6)
        assert sim.skipped("mass_failure") == 11 * 12  # 11 ticks x 6 datanodes x 2 regions
        [line] = logged("failover_held_mass_failure")  # once per log_interval_ms
        assert line["failed_fraction"] == pytest.approx(0.6)
        assert line["datanodes"] == 6
        assert "hold release" in line["release"]
        assert sim.sup.status.holds == ("mass_failure",)
        assert sim.handle(Dump(Future())).holds == ("mass_failure",)

    def test_one_of_ten_fails_over(self):
        sim = Sim()
        warm(sim)
        crossing = self.cut(sim, [4])
        assert sim.selected_at() == [(crossing, 4)]
        assert sim.hold("mass_failure") == 0
        assert sim.fraction() == pytest.approx(0.1)

    def test_fewer_than_min_datanodes_fail_over(self):
        # Two of three is above the fraction, but below mass_failure_min_datanodes (3).
        sim = Sim(datanodes=(1, 2, 3))
        warm(sim)
        crossing = self.cut(sim, [1, 2])
        assert sorted(sim.selected_at()) == [(crossing, 1), (crossing, 2)]
        assert sim.hold("mass_failure") == 0
        assert sim.fraction() == pytest.approx(2 / 3)

    def test_resumes_automatically_when_the_fraction_drops(self):
        sim = Sim()
        warm(sim)
        self.cut(sim, range(1, 7))
        sim.run(5000)
        assert sim.selected_at() == []
        sim.alive.update({1, 2, 3})  # three come back: 3/10 failed
        recovery = sim.guards.s.mass_failure_recovery_ms
        # Still held for mass_failure_recovery_ms after the last tick it tripped on: the others
        # cut off with them may be a moment away.
        tripped_last = sim.now
        assert selected(sim.step()) == []
        assert sim.hold("mass_failure") == 1
        assert sim.fraction() == pytest.approx(0.3)
        sim.run(recovery - 2000)
        assert sim.selected_at() == []
        effects = sim.step()
        assert sim.now - tripped_last == recovery
        assert selected(effects) == [4, 5, 6]
        assert sim.hold("mass_failure") == 0

    def test_cut_off_datanodes_coming_back_over_an_interval_are_not_failed_over(self):
        # Six cut off together come back over four ticks (within mass_failure_recovery_ms): the
        # first back drop the fraction below the limit while the others are still past the threshold.
        sim = Sim()
        warm(sim)
        self.cut(sim, range(1, 7))
        sim.run(5000)
        for back in ({1, 2}, {3}, {4, 5}, {6}):
            sim.alive.update(back)
            assert selected(sim.step()) == [], f"failed over while {back} came back"
        assert sim.hold("mass_failure") == 1  # the recovery hold, until every one had its chance
        sim.run(10_000)
        assert sim.hold("mass_failure") == 0 and sim.selected_at() == []

    def test_without_a_recovery_hold_the_first_back_let_the_rest_fail_over(self):
        sim = Sim(GuardSettings(mass_failure_recovery_ms=0))
        warm(sim)
        self.cut(sim, range(1, 7))
        sim.run(5000)
        sim.alive.update({1, 2, 3})
        assert selected(sim.step()) == [4, 5, 6]

    def test_operator_release_fails_over_and_lapses_when_the_condition_clears(self, logged):
        sim = Sim()
        warm(sim)
        self.cut(sim, range(1, 7))
        assert sim.selected_at() == []
        assert sim.handle(ReleaseHold()) is True
        assert logged("failover_hold_released") == [{"was_held": True}]
        effects = sim.step()
        assert selected(effects) == [1, 2, 3, 4, 5, 6]
        assert sim.hold("mass_failure") == 0
        # The selections fail; the six come back: the condition clears and the release with it.
        for job in jobs(effects):
            sim.fail_answer(job)
        sim.alive.update(range(1, 7))
        sim.run(30_000)
        assert not sim.guards.released_mass_failure
        # A new mass failure is held again.
        before = len(sim.selected_at())
        self.cut(sim, range(1, 7))
        sim.run(5000)
        assert len(sim.selected_at()) == before
        assert sim.hold("mass_failure") == 1

    def test_release_without_a_hold_reports_nothing_released(self, logged):
        sim = Sim()
        warm(sim)
        assert sim.handle(ReleaseHold()) is False
        assert logged("failover_hold_released") == [{"was_held": False}]

    def test_release_before_the_first_tick_does_not_crash(self):
        """`supervisor-service hold release` right after start (before any tick) must not kill the supervisor."""
        assert Guards(GuardSettings()).release() is False
        sim = Sim()
        assert sim.handle(ReleaseHold()) is False

    def test_hold_persists_while_the_datanodes_stay_failed(self):
        """The hold ends when the fraction drops or an operator releases it, not when the window slides past."""
        sim = Sim()
        warm(sim)
        self.cut(sim, range(1, 7))
        sim.run(120_000)
        assert sim.selected_at() == [], "six of ten still failed, nobody released the hold"
        assert sim.hold("mass_failure") == 1
        assert sim.fraction() == pytest.approx(0.6)

    def test_six_cut_at_once_with_heartbeats_at_different_phases(self):
        """A real cut: datanodes heartbeat at different phases, so six silenced at once cross over two ticks."""
        phases = {d: 97 * d for d in ALL}  # datanode d heartbeats 97*d ms into each second
        sim = Sim(phases=phases)
        warm(sim)
        sim.alive.difference_update(range(1, 7))
        crossings = {d: sim.crossing(d) for d in range(1, 7)}
        assert len(set(crossings.values())) > 1, "precondition: the six cross on different ticks"
        sim.run_to(max(crossings.values()) + 10_000)
        assert sim.selected_at() == [], "six of ten cut at once: nobody is failed over"
        assert sim.hold("mass_failure") == 1

    def test_fast_detector_settings_still_hold_a_cut(self):
        """A fast detector (3 s pause, 0.3 s heartbeats, 200 ms ticks), guards at their defaults.

        Silence must be counted before the first of the cut datanodes is
        convicted. Refusing settings under which it cannot be is a fix too.
        """
        try:
            s = load_settings(acceptable_heartbeat_pause_ms=3000.0, first_heartbeat_estimate_ms=500, tick_interval_ms=200)
        except ConfigError as exc:
            assert "mass_failure_silence_ms" in str(exc)
            return
        registry = CollectorRegistry()
        guards = Guards(s.guard_settings())
        sup = Supervisor(s.detector_options(), Metrics(registry), FailoverPolicy(), guards=guards)
        alive, picked = set(ALL), []
        for ms in range(0, 20_000):
            now = START + ms
            for d in sorted(alive):
                if ms % 300 == 29 * d:  # heartbeats spread over the 300 ms interval
                    sup.handle(Heartbeat(d, as_region_array(regions_of(d)), now), now)
            if ms % 200 == 0:
                sup.handle(Tick(), now)
                picked += [(ms, j.datanode_id) for j in jobs(sup.drain_outbox())]
            if ms == 5000:
                alive -= {1, 2, 3, 4, 5, 6}  # cut at once
        assert picked == [], (
            f"6 of 10 cut at once, failed over before the hold: {picked} "
            f"(mass_failure_silence_ms={s.mass_failure_silence_ms}, detection ~3.8 s)"
        )
        assert sup.status.holds == ("mass_failure",)

    def test_off(self):
        sim = Sim(GuardSettings(max_failed_datanode_fraction=1.0))
        warm(sim)
        crossing = self.cut(sim, range(1, 7))
        assert sorted(sim.selected_at()) == [(crossing, d) for d in range(1, 7)]
        assert sim.hold("mass_failure") == 0

    def test_guards_directly(self):
        g = Guards(GuardSettings())
        g.track(set(), 0, 10, 0)
        assert not g.mass_failure()
        g.track({1, 2, 3, 4, 5}, 5, 10, 1000)
        assert g.mass_failure_fraction == pytest.approx(0.5)
        assert not g.mass_failure()  # not more than 0.5
        g.track({1, 2, 3, 4, 5, 6}, 6, 10, 2000)
        assert g.mass_failure()
        assert g.release() is True
        assert not g.mass_failure()
        g.track({1, 2}, 2, 10, 3000)  # clears: the release lapses
        assert not g.mass_failure() and not g.released_mass_failure
        g.track(set(), 6, 10, 4000)  # six silent, none convicted yet: already held
        assert g.mass_failure()
        g.track(set(), 2, 10, 5000)  # cleared, but held for mass_failure_recovery_ms after 4000
        assert g.mass_failure()
        g.track(set(), 2, 10, 4000 + g.s.mass_failure_recovery_ms)
        assert not g.mass_failure()
        g.track(set(), 2, 3, 20_000)  # 2 of 3: below mass_failure_min_datanodes
        assert not g.mass_failure()


# ====================================================================== rate limits


class TestRateLimits:
    def test_settings(self):
        s = GuardSettings()
        assert (s.failover_rate_per_s, s.failover_burst) == (1.0, 10)
        assert (s.target_regions_per_s, s.target_burst_regions) == (200.0, 2000)

    def test_global_bucket_serves_oldest_failure_first(self, logged):
        sim = Sim(GuardSettings(failover_burst=2, failover_rate_per_s=1.0, **NO_MASS))
        warm(sim)
        # Datanodes 7, 8, 9 go silent; one second later 1 and 2 (lower ids, younger failures).
        sim.alive.difference_update({7, 8, 9})
        first = sim.crossing(7)
        sim.step()
        sim.alive.difference_update({1, 2})
        assert sim.crossing(1) == first + TICK
        sim.run_to(first + 5000)
        assert sim.selected_at() == [
            (first, 7), (first, 8),  # the burst
            (first + 1000, 9),  # then one per second, oldest failure first
            (first + 2000, 1),
            (first + 3000, 2),
        ]
        assert sim.skipped("rate_limited") == 2 + 4 + 2  # d9 at first; d1, d2; d2
        assert logged("failover_rate_limited")

    def test_global_bucket_off(self):
        sim = Sim(GuardSettings(failover_burst=2, failover_rate_per_s=0, **NO_MASS))
        warm(sim)
        sim.alive.difference_update({3, 4, 5, 6, 7})
        first = sim.crossing(3)
        sim.run_to(first)
        assert sorted(sim.selected_at()) == [(first, d) for d in (3, 4, 5, 6, 7)]
        assert sim.skipped("rate_limited") == 0

    def target_sim(self, **settings) -> tuple[Sim, object]:
        sim = Sim(GuardSettings(**settings))
        sim.regions[1] = regions_of(1, 10)
        warm(sim)
        sim.alive.discard(1)
        sim.run_to(sim.crossing(1))
        [(_, job)] = [(t, e.job) for t, e in sim.timeline if isinstance(e, SelectPeers)]
        return sim, job

    def test_per_target_bucket(self, logged):
        sim, job = self.target_sim(target_regions_per_s=2.0, target_burst_regions=4)
        assert len(job.region_ids) == 10
        [task] = sim.answer(job, 5)  # the Selector routes all ten to datanode 5
        assert task.to_peer.id == 5 and len(task.region_ids) == 4
        assert sim.skipped("rate_limited_target") == 6
        [line] = logged("failover_target_rate_limited")
        assert (line["to_peer"], line["granted"], line["wanted"]) == (5, 4, 10)
        sizes, moved = [4], set(task.region_ids)
        # The rest stay failed and are asked for again on later ticks, as the bucket refills (2/s).
        for _ in range(3):
            [job] = jobs(sim.step())
            assert not set(job.region_ids) & moved
            [task] = sim.answer(job, 5)
            sizes.append(len(task.region_ids))
            moved |= set(task.region_ids)
        assert sizes == [4, 2, 2, 2]
        assert moved == set(regions_of(1, 10))

    def test_per_target_bucket_is_per_target(self):
        sim, job = self.target_sim(target_regions_per_s=2.0, target_burst_regions=4)
        submitted = sim.answer(job, *([5, 6] * 5))
        assert sorted((t.to_peer.id, len(t.region_ids)) for t in submitted) == [(5, 4), (6, 4)]
        assert sim.skipped("rate_limited_target") == 2

    def test_per_target_bucket_off(self):
        sim, job = self.target_sim(target_regions_per_s=0, target_burst_regions=4)
        [task] = sim.answer(job, 5)
        assert len(task.region_ids) == 10
        assert sim.skipped("rate_limited_target") == 0

    def test_token_bucket(self):
        b = TokenBucket(1.0, 2, now=0)
        assert b.available(0) == 2
        assert b.take(1, 0) and b.take(1, 0)
        assert not b.take(1, 0)
        assert b.available(999) == 0
        assert b.available(1000) == 1
        assert not b.take(2, 1000)  # a failed take takes nothing
        assert b.take(1, 1000)
        assert b.available(100_000) == 2  # capped at the burst
        half = TokenBucket(0.5, 1, now=0)
        assert half.take(1, 0)
        assert not half.take(1, 1999)
        assert half.take(1, 2000)

    def test_guards_take_target_grants_what_is_available(self):
        g = Guards(GuardSettings(target_regions_per_s=2.0, target_burst_regions=4))
        assert g.take_target(5, 10, 0) == 4
        assert g.take_target(5, 10, 0) == 0
        assert g.take_target(6, 3, 0) == 3
        assert g.take_target(5, 10, 1500) == 3


# ====================================================================== flap damping


class TestFlapDamping:
    def test_settings(self):
        s = GuardSettings()
        assert s.target_holddown_ms == 30_000  # CockroachDB's suspect time
        assert (s.flap_threshold, s.flap_window_ms) == (3, 600_000)
        assert (s.flap_backoff_base_ms, s.flap_backoff_max_ms) == (10_000, 300_000)

    def fail(self, sim: Sim, d: int) -> tuple[int, object]:
        """Silence `d` and run until it is selected; returns (time, job)."""
        sim.alive.discard(d)
        deadline = sim.crossing(d) + 60_000
        while sim.now < deadline:
            for job in jobs(sim.step()):
                if job.datanode_id == d:
                    return sim.now, job
        raise AssertionError(f"datanode {d} never selected")

    def test_failed_over_datanode_is_not_a_target_for_the_holddown(self):
        sim = Sim(GuardSettings(target_holddown_ms=30_000))
        warm(sim)
        t1, job = self.fail(sim, 1)
        sim.failover(job, target=10)
        sim.alive.add(1)  # it restarts and is healthy again
        t2, job = self.fail(sim, 2)
        assert t2 < t1 + 30_000
        assert 1 in job.exclude_targets and 2 in job.exclude_targets
        sim.fail_answer(job)
        sim.alive.add(2)
        sim.run_to(t1 + 30_000)
        _, job = self.fail(sim, 3)
        assert job.exclude_targets == (3,)  # the holddown of 1 is over; 2 was never failed over

    def test_holddown_off(self):
        sim = Sim(GuardSettings(target_holddown_ms=0))
        warm(sim)
        _, job = self.fail(sim, 1)
        sim.failover(job, target=10)
        sim.alive.add(1)
        _, job = self.fail(sim, 2)
        assert job.exclude_targets == ()

    def test_flapping_datanode_is_not_a_target(self):
        sim = Sim(GuardSettings(flap_threshold=3, flap_window_ms=120_000))
        warm(sim)
        sim.handle(SetMaintenance(True, datanode_ids=(3,)))  # so its own failures are not failed over
        for _ in range(3):  # it comes and goes three times
            sim.alive.discard(3)
            sim.run_to(sim.crossing(3))
            sim.alive.add(3)
            sim.step()
        last_recovery = sim.now
        assert sim.guards.flapping() == {3}
        assert sim.selected_at() == []
        _, job = self.fail(sim, 2)
        assert 3 in job.exclude_targets
        sim.fail_answer(job)
        sim.alive.add(2)
        sim.run_to(last_recovery + 120_000)  # the recoveries slide out of the window
        assert sim.guards.flapping() == set()
        _, job = self.fail(sim, 4)
        assert 3 not in job.exclude_targets

    def test_backoff_second_episode_waits_base_third_twice(self, logged):
        sim = Sim(GuardSettings(flap_backoff_base_ms=10_000, flap_backoff_max_ms=300_000))
        warm(sim)
        # Episode 1: failed over at once.
        sim.alive.discard(1)
        c1 = sim.crossing(1)
        t1, job = self.fail(sim, 1)
        assert t1 == c1
        sim.failover(job)
        sim.alive.add(1)
        warm(sim)
        # Episode 2: waits flap_backoff_base_ms after failing.
        sim.alive.discard(1)
        c2 = sim.crossing(1)
        t2, job = self.fail(sim, 1)
        assert t2 == c2 + 10_000
        assert sim.skipped("flap_backoff") == 10 * 2  # ticks c2 .. c2+9000, two regions
        assert logged("failover_backoff")[0]["until_ms"] == c2 + 10_000
        sim.failover(job)
        sim.alive.add(1)
        warm(sim)
        # Episode 3: twice that.
        sim.alive.discard(1)
        c3 = sim.crossing(1)
        t3, _ = self.fail(sim, 1)
        assert t3 == c3 + 20_000

    def test_backoff_off(self):
        sim = Sim(GuardSettings(flap_backoff_base_ms=0))
        warm(sim)
        _, job = self.fail(sim, 1)
        sim.failover(job)
        sim.alive.add(1)
        warm(sim)
        sim.alive.discard(1)
        c2 = sim.crossing(1)
        t2, _ = self.fail(sim, 1)
        assert t2 == c2
        assert sim.skipped("flap_backoff") == 0

    def test_backoff_is_capped(self):
        g = Guards(GuardSettings(flap_backoff_base_ms=10_000, flap_backoff_max_ms=25_000))
        for episode in range(3):
            t = episode * 10_000
            g.track({7}, 1, 10, t)
            g.note_failover(7, t + 1)
            g.track(set(), 0, 10, t + 5000)
        g.track({7}, 1, 10, 50_000)
        assert g.backoff_until(7) == 50_000 + 25_000  # 10 s x 2^2 = 40 s, capped at 25 s
        assert g.backoff_until(8) == 0

    def test_selector_answer_naming_an_excluded_target_is_refused(self, logged):
        sim = Sim(GuardSettings())
        warm(sim)
        sim.alive.difference_update({1, 2})
        sim.run_to(sim.crossing(1))
        [job] = [j for j in jobs(e for _, e in sim.timeline) if j.datanode_id == 1]
        assert 2 in job.exclude_targets
        # A Selector that ignored exclude_peer_ids: one region to 2 (failed), one to 5. An answer
        # that ignores the request is not trusted in part: nothing is submitted, it is asked again.
        assert sim.answer(job, 2, 5) == []
        assert sim.value("supervisor_selector_invalid_answers_total", reason="excluded_peer") == 1
        [line] = logged("failover_selector_answer_invalid")
        assert (line["datanode_id"], line["reason"], line["peer_id"]) == (1, "excluded_peer", 2)
        assert 1 in selected(sim.step())

    def test_guards_flapping_directly(self):
        g = Guards(GuardSettings(flap_threshold=3, flap_window_ms=60_000, target_holddown_ms=30_000))
        for i in range(3):
            g.track({5}, 1, 10, i * 2000)
            g.track(set(), 0, 10, i * 2000 + 1000)
        assert g.flapping() == {5}
        assert 5 in g.excluded_targets(6000)
        g.track(set(), 0, 10, 65_001)  # the first recovery (1000) leaves the window
        assert g.flapping() == set()
        assert 5 not in g.excluded_targets(65_001)
        g.note_failover(8, 70_000)
        assert 8 in g.excluded_targets(99_999)
        assert 8 not in g.excluded_targets(100_000)


# ====================================================================== failover count decay


class TestFailoverCountDecay:
    DECAY = 60_000

    def failed_over_once(self, policy: FailoverPolicy) -> tuple[Sim, int]:
        """Datanode 1 fails, its regions are submitted (answer migrating: detectors and counts kept)."""
        sim = Sim(GuardSettings(), policy)
        warm(sim)
        sim.alive.discard(1)
        sim.run_to(sim.crossing(1))
        [job] = jobs(e for _, e in sim.timeline)
        sim.failover(job, target=5, category="migrating")
        assert sim.sup.failover_counts == {(1, r): 1 for r in sim.regions[1]}
        sim.sup.drain_changes()
        return sim, sim.now

    def test_setting(self):
        assert FailoverPolicy().failover_count_decay_ms == 0  # plain policy: never (the service sets 30 min)

    def test_counts_decay_after_a_healthy_period(self, logged):
        sim, tf = self.failed_over_once(FailoverPolicy(failover_count_decay_ms=self.DECAY))
        sim.alive.add(1)  # back and healthy
        sim.run_to(tf + self.DECAY - 1000)
        assert sim.sup.failover_counts == {(1, r): 1 for r in sim.regions[1]}
        sim.run_to(tf + self.DECAY + 10_000)  # checked every 10 s
        assert sim.sup.failover_counts == {}
        drops = [c for c in sim.sup.drain_changes() if isinstance(c, CountsDrop)]
        assert [sorted(c.keys) for c in drops] == [[(1, r) for r in sim.regions[1]]]
        assert logged("failover_counts_decayed") == [{"regions": 2}]

    def test_off(self):
        sim, tf = self.failed_over_once(FailoverPolicy(failover_count_decay_ms=0))
        sim.alive.add(1)
        sim.run_to(tf + 10 * self.DECAY)
        assert sim.sup.failover_counts == {(1, r): 1 for r in sim.regions[1]}

    def test_a_region_still_failed_keeps_its_count(self):
        sim, tf = self.failed_over_once(FailoverPolicy(failover_count_decay_ms=self.DECAY))
        sim.handle(SetMaintenance(True, datanode_ids=(1,)))  # stays down, not failed over again
        sim.run_to(tf + self.DECAY + 20_000)
        assert sim.phi(1) >= OPTS.threshold
        assert sim.sup.failover_counts == {(1, r): 1 for r in sim.regions[1]}

    def test_a_region_failed_at_the_horizon_still_decays_after_a_later_healthy_period(self):
        """Counts only grew before; they must decay once the region is healthy, even if it was down at a check."""
        sim, tf = self.failed_over_once(FailoverPolicy(failover_count_decay_ms=self.DECAY))
        sim.handle(SetMaintenance(True, datanode_ids=(1,)))
        sim.run_to(tf + self.DECAY + 20_000)  # down across the horizon
        back = sim.now
        sim.handle(SetMaintenance(False, datanode_ids=(1,)))
        sim.alive.add(1)
        sim.run_to(back + self.DECAY + 20_000)  # healthy for longer than the decay period
        assert sim.phi(1) < OPTS.threshold
        assert sim.sup.failover_counts == {}, "healthy for the whole decay period, the count should be forgotten"


# ====================================================================== scoped maintenance


class TestScopedMaintenance:
    def test_datanode_maintenance_skips_that_datanode_only(self, logged):
        sim = Sim()
        warm(sim)
        state = sim.handle(SetMaintenance(True, datanode_ids=(1,)))
        assert state == MaintenanceSet(False, 0, ((1, 0),))
        assert sim.value("supervisor_maintenance_datanodes") == 1
        assert logged("datanode_maintenance_changed")[0]["datanodes"] == "1"
        stored = [c for c in sim.sup.drain_changes() if isinstance(c, MaintenanceSet)]
        assert [dataclasses.replace(c, mark=None) for c in stored] == [state]
        assert stored[0].mark is not None and stored[0].mark.wall_ms == sim.now
        sim.alive.difference_update({1, 2})
        crossing = max(sim.crossing(1), sim.crossing(2))
        sim.run_to(crossing)
        assert sim.selected_at() == [(crossing, 2)]
        assert sim.skipped("maintenance_datanode") == 2
        assert sim.hold("maintenance") == 0

    def test_datanode_maintenance_ttl_expires(self, logged):
        sim = Sim()
        warm(sim)
        start = sim.now
        state = sim.handle(SetMaintenance(True, datanode_ids=(1,), ttl_ms=20_000))
        assert state.datanodes == ((1, start + 20_000),)
        sim.alive.discard(1)
        sim.run_to(start + 19_000)
        assert sim.selected_at() == []
        assert sim.skipped("maintenance_datanode") > 0
        sim.run_to(start + 20_000)
        assert sim.sup.datanode_maintenance == {}
        assert sim.value("supervisor_maintenance_datanodes") == 0
        assert logged("datanode_maintenance_expired") == [{"datanodes": "1"}]
        # Re-baselined at expiry: datanode 1 gets a fresh detection period, then is failed over.
        assert sim.phi(1) == 0.0
        crossing = sim.crossing(1)
        sim.run_to(crossing)
        assert sim.selected_at() == [(crossing, 1)], "no failover at the expiry tick, then one after detection"

    def test_datanode_maintenance_ttl_expiry_without_rebaseline_fails_over_at_once(self):
        sim = Sim(policy=FailoverPolicy(rebaseline_after_maintenance=False))
        warm(sim)
        start = sim.now
        sim.handle(SetMaintenance(True, datanode_ids=(1,), ttl_ms=20_000))
        sim.alive.discard(1)
        sim.run_to(start + 20_000)
        assert sim.selected_at() == [(start + 20_000, 1)]

    def test_datanode_maintenance_expiry_does_not_disturb_other_failures(self):
        """The tick on which one datanode's maintenance expires still sees the other failed datanodes."""
        sim = Sim()
        warm(sim)
        # Datanode 2 was failed over once; it fails again, so its next failover backs off 10 s.
        sim.alive.discard(2)
        sim.run_to(sim.crossing(2))
        [job] = jobs(e for _, e in sim.timeline)
        sim.failover(job)
        sim.alive.add(2)
        warm(sim)
        sim.alive.discard(2)
        c2 = sim.crossing(2)
        # Meanwhile datanode 1's maintenance expires, 5 s into datanode 2's backoff.
        sim.handle(SetMaintenance(True, datanode_ids=(1,), ttl_ms=c2 + 5000 - sim.now))
        sim.run_to(c2 + 5000)
        assert sim.sup.datanode_maintenance == {}
        assert sim.guards.failed_since(2, sim.now) == c2, "datanode 2 is still failed since c2"
        sim.run_to(c2 + 20_000)
        assert [t for t, d in sim.selected_at() if d == 2][-1] == c2 + 10_000

    def test_global_maintenance_holds_everything(self, logged):
        sim = Sim()
        warm(sim)
        sim.handle(SetMaintenance(True))
        assert sim.value("supervisor_maintenance_mode") == 1
        assert logged("maintenance_mode_changed") == [{"enabled": True, "until_ms": 0}]
        sim.alive.discard(1)
        sim.run_to(sim.crossing(1) + 5000)
        assert sim.selected_at() == []
        assert sim.hold("maintenance") == 1
        assert sim.skipped("maintenance") == 6 * 2

    def test_end_of_global_maintenance_rebaselines_no_burst(self, logged):
        sim = Sim()
        warm(sim)
        sim.handle(SetMaintenance(True))
        sim.alive.difference_update({1, 2})  # upgraded during the window
        sim.run(60_000)
        assert sim.phi(1) >= OPTS.threshold
        sim.handle(SetMaintenance(False))  # ended while 1 and 2 are still restarting
        assert sim.phi(1) == 0.0 and sim.phi(2) == 0.0 and sim.phi(5) == 0.0
        [line] = logged("detectors_rebaselined")
        assert line == {"detectors": 20, "scope": "all"}
        assert sim.hold("maintenance") == 1  # until the next tick publishes
        sim.run(5000)
        assert sim.hold("maintenance") == 0
        sim.alive.update({1, 2})  # back 5 s later
        sim.run(60_000)
        assert sim.selected_at() == []

    def test_end_of_global_maintenance_without_rebaseline_keeps_old_phi(self):
        sim = Sim(policy=FailoverPolicy(rebaseline_after_maintenance=False))
        warm(sim)
        sim.handle(SetMaintenance(True))
        sim.alive.difference_update({1, 2})
        sim.run(60_000)
        sim.handle(SetMaintenance(False))
        assert sim.phi(1) >= OPTS.threshold
        assert selected(sim.step()) == [1, 2]

    def test_end_of_datanode_maintenance_rebaselines_that_datanode_only(self, logged):
        sim = Sim(policy=FailoverPolicy(rebaseline_after_maintenance=True))
        warm(sim)
        sim.handle(SetMaintenance(True, datanode_ids=(1, 2)))
        sim.alive.difference_update({1, 2})
        sim.run(30_000)
        sim.handle(SetMaintenance(False, datanode_ids=(1,)))
        assert sim.phi(1) == 0.0
        assert sim.phi(2) >= OPTS.threshold
        assert logged("detectors_rebaselined") == [{"detectors": 2, "scope": "1"}]
        assert sim.sup.datanode_maintenance == {2: 0}

    def test_global_maintenance_ttl_expires_without_a_burst(self, logged):
        sim = Sim()
        warm(sim)
        start = sim.now
        state = sim.handle(SetMaintenance(True, ttl_ms=30_000))
        assert state.enabled and state.until_ms == start + 30_000
        sim.alive.difference_update({1, 2})
        sim.run_to(start + 30_000)
        assert not sim.sup.maintenance
        assert sim.value("supervisor_maintenance_mode") == 0
        assert logged("maintenance_mode_expired") == [{"until_ms": start + 30_000}]
        assert sim.phi(1) == 0.0
        assert sim.selected_at() == [], "the detectors were re-baselined at expiry: nothing to fail over yet"
        sim.alive.update({1, 2})
        sim.run(30_000)
        assert sim.selected_at() == []


# ====================================================================== warm-up


class TestWarmup:
    def leader(self, policy: FailoverPolicy, heard) -> tuple[Sim, int]:
        """A replica becomes leader with ten registered datanodes; only `heard` heartbeat afterwards."""
        sim = Sim(GuardSettings(), policy, is_leader=False)
        registry = {d: as_region_array(sim.regions[d]) for d in ALL}
        sim.handle(BecomeLeader(2, StoredState(registry=registry)))
        sim.alive = set(heard)
        return sim, sim.now

    def test_settings(self):
        p = FailoverPolicy()
        assert (p.warmup_grace_ms, p.warmup_fraction) == (30_000, 0.9)

    def test_no_failover_until_the_grace_period_ends(self, logged):
        sim, t0 = self.leader(FailoverPolicy(warmup_grace_ms=30_000, warmup_fraction=0.9), heard=range(1, 9))
        crossing = sim.crossing(9)
        assert crossing < t0 + 30_000
        sim.run_to(t0 + 29_000)
        assert sim.selected_at() == []
        assert sim.hold("warmup") == 1
        assert sim.skipped("warmup") > 0
        line = logged("failover_held_warmup")[0]
        assert (line["heard"], line["known"], line["until_ms"]) == (8, 10, t0 + 30_000)
        sim.step()
        assert sim.selected_at() == [(t0 + 30_000, 9), (t0 + 30_000, 10)]
        assert sim.hold("warmup") == 0

    def test_warmup_ends_early_when_enough_datanodes_reported(self):
        sim, t0 = self.leader(FailoverPolicy(warmup_grace_ms=30_000, warmup_fraction=0.9), heard=range(1, 10))
        crossing = sim.crossing(10)
        sim.run_to(crossing)
        assert sim.selected_at() == [(crossing, 10)]
        assert crossing < t0 + 30_000
        assert sim.hold("warmup") == 0

    def test_off(self):
        sim, t0 = self.leader(FailoverPolicy(warmup_grace_ms=0), heard=range(1, 9))
        crossing = max(sim.crossing(9), sim.crossing(10))
        sim.run_to(crossing)
        assert sorted(sim.selected_at()) == [(crossing, 9), (crossing, 10)]
        assert sim.skipped("warmup") == 0


def test_every_hold_reason_has_a_gauge():
    registry = CollectorRegistry()
    Metrics(registry)
    for reason in ("maintenance", "warmup", "local_pause", "overload", "mass_failure"):
        assert registry.get_sample_value("supervisor_failover_hold", {"reason": reason}) == 0
    assert np.isclose(registry.get_sample_value("supervisor_failed_datanode_fraction"), 0.0)


# ====================================================================== overload: refused heartbeats


def _refused_step(sim: Sim, refused: int, **tick_kw) -> list:
    """One tick interval in which the alive datanodes' heartbeats are refused by a full queue (never
    applied), and the tick learns of `refused` of them; the queue is empty again by the tick."""
    sim.now += TICK
    assert sim.sup.handle(Tick(heartbeats_refused=refused, **tick_kw), sim.now) is None
    return sim.drain()


def _beaten_step(sim: Sim, refused: int) -> list:
    """One tick interval in which every alive datanode is heard, and the tick learns of `refused`
    heartbeats refused meanwhile (of other datanodes, or extra ones of these)."""
    start, sim.now = sim.now, sim.now + TICK
    for d in sorted(sim.alive):
        sim.beat(d, max(start + 1, sim.now))
    assert sim.sup.handle(Tick(heartbeats_refused=refused), sim.now) is None
    return sim.drain()


class TestRefusedHeartbeats:
    """Heartbeats that found no room in the event queue hold convictions, not only a full queue.

    A heartbeat the queue refused is liveness evidence the table never saw: a tick that convicts its
    datanode afterwards convicts it on the supervisor's own overload. The queue may be far from full
    when that tick runs (a burst was refused and drained before it), so the overload guard holds
    convictions for `overload_hold_ms` after any tick that learnt of refused heartbeats
    (`Tick.heartbeats_refused`), whatever the queue's fill at that tick.
    """

    def test_setting_default_is_the_local_pause_hold(self):
        assert GuardSettings().overload_hold_ms == 5000
        assert GuardSettings().overload_hold_ms == GuardSettings().local_pause_hold_ms
        assert load_settings().overload_hold_ms == 5000
        assert load_settings(overload_hold_ms=0).guard_settings().overload_hold_ms == 0
        with pytest.raises(ConfigError, match="overload_hold_ms"):
            load_settings(overload_hold_ms=-1)

    def test_refused_heartbeats_of_live_datanodes_convict_nobody(self, logged):
        """Every datanode lives, but for 20 s the queue refuses their heartbeats (in bursts: it is empty at
        each tick). Without the hold every one of them would be failed over."""
        sim = Sim(GuardSettings(**NO_MASS))
        warm(sim)
        for _ in range(20):
            assert jobs(_refused_step(sim, refused=10)) == []
        assert all(sim.phi(d) >= OPTS.threshold for d in sim.alive)  # the table sees them all dead
        assert sim.hold("overload") == 1
        assert sim.skipped("overload") > 0
        [line, *_] = logged("failover_held_overload")
        assert line["heartbeats_refused"] == 10
        # The heartbeats get through again: each datanode is heard before the hold ends, nobody is convicted.
        for _ in range(10):
            assert jobs(sim.step()) == []
        assert sim.hold("overload") == 0

    def test_the_hold_lasts_overload_hold_ms_after_the_last_refusal_then_a_dead_datanode_fails_over(self):
        sim = Sim(GuardSettings(overload_hold_ms=5000, **NO_MASS))
        warm(sim)
        sim.alive.discard(9)  # really dead
        crossing = sim.crossing(9)
        sim.run_to(crossing - 2 * TICK)
        # The last refusals, seen by the tick before the crossing; the queue is empty at every tick.
        assert jobs(_beaten_step(sim, 3)) == []
        last_refusal = sim.now
        while sim.now < last_refusal + 5000 - TICK:
            assert jobs(sim.step()) == [], sim.now - last_refusal
            assert sim.hold("overload") == 1
        # The hold ends overload_hold_ms after the tick that saw the refusals.
        assert selected(sim.step()) == [9]
        assert sim.now == last_refusal + 5000
        assert sim.hold("overload") == 0

    def test_every_tick_that_sees_refusals_extends_the_hold(self):
        g = Guards(GuardSettings(overload_hold_ms=3000))
        assert g.observe_tick(1000, 0, 0.0) is None
        assert g.observe_tick(2000, 0, 0.0, 1) == "overload"
        assert g.observe_tick(4000, 0, 0.0) == "overload"
        assert g.observe_tick(4999, 0, 0.0) == "overload"
        assert g.observe_tick(5000, 0, 0.0) is None  # 3000 after the tick that saw them
        assert g.observe_tick(6000, 0, 0.0, 2) == "overload"
        assert g.observe_tick(8000, 0, 0.0, 1) == "overload"
        assert g.observe_tick(10_999, 0, 0.0) == "overload"
        assert g.observe_tick(11_000, 0, 0.0) is None

    def test_hold_off_keeps_only_the_fill_check(self):
        g = Guards(GuardSettings(overload_hold_ms=0))
        assert g.observe_tick(1000, 0, 0.0, 100) is None
        assert g.observe_tick(2000, 0, 0.95, 0) == "overload"
        off = Guards(GuardSettings(overload_queue_fraction=1.0, overload_hold_ms=0))
        assert off.observe_tick(1000, 0, 1.0, 100) is None

    def test_a_negative_or_absurd_count_holds_nothing_and_breaks_nothing(self):
        """The count comes from the runtime; a count that went backwards (a new queue) is not a refusal."""
        g = Guards(GuardSettings(overload_hold_ms=3000))
        assert g.observe_tick(1000, 0, 0.0, -5) is None
        assert g.observe_tick(2000, 0, 0.0, 2**63) == "overload"

    def test_a_leadership_change_does_not_forget_a_hold(self):
        """The refusals were this process's own overload: a new leadership of the same process starts
        with them still held (the datanodes refused were not heard by this replica either)."""
        g = Guards(GuardSettings(overload_hold_ms=3000))
        assert g.observe_tick(1000, 0, 0.0, 4) == "overload"
        g.reset()
        assert g.observe_tick(2000, 0, 0.0) == "overload"
        assert g.observe_tick(4000, 0, 0.0) is None

    def test_guards_off_ignore_refusals(self):
        sim = Sim(None)
        warm(sim)
        sim.alive.discard(9)
        sim.run_to(sim.crossing(9) - TICK)
        assert selected(_refused_step(sim, refused=5)) == [9]

    def test_refusals_seen_while_the_selector_answers_stop_the_submission(self):
        """A tick asked for targets; the next learnt of refused heartbeats before the answer came: the
        answer moves nothing (the evidence the table lacks may be the convicted datanode's)."""
        sim = Sim(GuardSettings(**NO_MASS))
        warm(sim)
        sim.alive.discard(9)
        sim.run_to(sim.crossing(9) - TICK)
        [job] = jobs(sim.step())
        assert job.datanode_id == 9
        assert jobs(_beaten_step(sim, 1)) == []
        assert sim.answer(job, 10) == []
        assert sim.skipped("overload") == 2 + 2  # the held tick's and the answer's
