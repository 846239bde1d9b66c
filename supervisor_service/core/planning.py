"""The tick's failover planning: what failed, what holds it, which datanodes to ask targets for (docs/design.md §4, §5).

`observe` runs on every tick, leader or not (the guards measure gaps between ticks, counts
decay); `plan` runs on a leader's tick, and asks the Selector for targets (SelectPeers) for
each failed datanode that no hold, maintenance, submission, backoff or budget keeps back,
the longest-failed first. The answer is `targets.TargetSelection`'s.
"""

from __future__ import annotations

import logging

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.detection import Detection
from supervisor_service.core.effects import SelectPeers
from supervisor_service.core.guards import Guards
from supervisor_service.core.heartbeat_ages import heartbeat_ages
from supervisor_service.core.holds import HoldLog, Holds
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.logs import log_event, sample
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.ports import PHI_BUCKETS, CoreMetrics
from supervisor_service.core.registry import Registry
from supervisor_service.core.types import RegionArray, SelectJob

log = logging.getLogger("supervisor_service.supervisor")


class Planner:
    """From the table's failures to SelectPeers jobs; owns the jobs asked for (one per datanode)."""

    def __init__(
        self,
        metrics: CoreMetrics,
        out: Outbox,
        registry: Registry,
        detection: Detection,
        maintenance: Maintenance,
        holds: Holds,
        guards: Guards | None,
        inflight: InFlight,
        backoff: ResubmitBackoff,
        ids: Ids,
        held_log: HoldLog,
    ) -> None:
        self._metrics = metrics
        self._out = out
        self._registry = registry
        self._table = registry.table
        self._detection = detection
        self._maintenance = maintenance
        self._holds = holds
        self._guards = guards
        self._inflight = inflight
        self._backoff = backoff
        self._ids = ids
        self._held_log = held_log
        self._selecting: dict[int, SelectJob] = {}  # datanode -> job in PeerLookup/Selector

    def answered(self, job: SelectJob) -> bool:
        """The Selector answered `job`: it is no longer asked for. True if it was the one asked for."""
        current = self._selecting.get(job.datanode_id)
        if current is None or current.job_id != job.job_id:
            return False
        del self._selecting[job.datanode_id]
        return True

    def forget(self) -> None:
        """A leadership changed: the jobs asked for are not this one's, and the ages of the last
        tick are no longer anyone's (a follower does not tick: they would stay, looking silent)."""
        self._selecting.clear()
        self._metrics.heartbeat_ages.set(*heartbeat_ages(self._table, 0))

    def observe(
        self, now: int, lag_ms: float, queue_fill: float, heartbeats_refused: int = 0
    ) -> tuple[dict[int, RegionArray], str | None]:
        """Every tick: the table's gauges, maintenance expiry, the failures, what the guards see.
        Returns the failed regions by datanode, and the guards' local_pause or overload (or None)."""
        m, table = self._metrics, self._table
        m.detectors.set(len(table))
        m.detector_groups.set(table.group_count)
        m.phi.set(*table.phi_distribution(now, PHI_BUCKETS))
        m.heartbeat_ages.set(*heartbeat_ages(table, now))
        # Expiring maintenance re-baselines detectors: do it before reading who failed.
        self._maintenance.expire(now)
        failed = self._detection.failed(now)
        guards = self._guards
        if guards is None:
            return failed, None
        pause = guards.observe_tick(now, lag_ms, queue_fill, heartbeats_refused)
        silent: list[int] = []
        # While a stall or an overload holds convictions, the silence is the supervisor's own
        # doing (the heartbeats wait in its queue): it is not a mass failure, nor an alert.
        if pause is None:
            # A datanode whose regions are all being migrated is dead and handled: not a new silence.
            handled = self._inflight.regions
            silent = [
                d for d in table.silent_datanodes(now, guards.s.mass_failure_silence_ms)
                if not handled or not set(table.regions_of(d).tolist()) <= handled
            ]
        guards.track(set(failed), len(silent), table.datanode_count, now)
        self._registry.decay_counts(now)
        return failed, pause

    def plan(self, now: int, failed: dict[int, RegionArray], pause: str | None) -> None:
        """A leader's tick: publish the holds; unless one holds all failover, ask for targets."""
        holds = self._holds.compute(now, pause)
        self._holds.publish(holds)
        if not failed:
            return
        m = self._metrics
        if holds:
            reason = holds[0]
            total = sum(r.size for r in failed.values())
            m.failover_skipped.labels(reason=reason).inc(total)
            self._held_log(now, f"failover_held_{reason}", failed_regions=total, datanodes=len(failed),
                           **self._holds.details(reason, now))
            return
        guards = self._guards
        # Oldest failure first: under a rate limit, the longest-waiting datanode goes first.
        order = sorted(failed, key=lambda d: (guards.failed_since(d, now) if guards else 0, d))
        exclude_targets = tuple(sorted(guards.excluded_targets(now))) if guards is not None else ()
        region_holds: set[str] = set()
        for datanode_id in order:
            region_ids = failed[datanode_id]
            if datanode_id in self._maintenance.datanodes:
                m.failover_skipped.labels(reason="maintenance_datanode").inc(region_ids.size)
                continue
            if datanode_id in self._selecting:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size)
                continue
            regions = [r for r in region_ids.tolist() if not self._inflight.holds(r)]
            if len(regions) < region_ids.size:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size - len(regions))
            if self._backoff:
                regions = self._after_resubmit_backoff(datanode_id, regions, now, region_holds)
            if not regions:
                continue
            if guards is not None:
                if now < guards.backoff_until(datanode_id):
                    m.failover_skipped.labels(reason="flap_backoff").inc(len(regions))
                    self._held_log(now, "failover_backoff", datanode_id=datanode_id,
                                   until_ms=guards.backoff_until(datanode_id))
                    continue
                if not guards.take_global(now):
                    m.failover_skipped.labels(reason="rate_limited").inc(len(regions))
                    self._held_log(now, "failover_rate_limited", datanode_id=datanode_id, regions=len(regions))
                    continue
            job = SelectJob(self._ids.next(), datanode_id, tuple(regions), exclude_targets)
            self._selecting[datanode_id] = job
            self._out.effects.append(SelectPeers(job))
            log_event(log, logging.WARNING, "region_failures_detected", datanode_id=datanode_id,
                      regions=len(regions), sample=sample(regions))
        if region_holds:  # regions held back one by one: shown with the holds (GetFailoverHolds, Dump)
            self._holds.publish(holds + tuple(sorted(region_holds)))

    def _after_resubmit_backoff(self, datanode_id: int, regions: list[int], now: int, holds: set[str]) -> list[int]:
        """The regions whose resubmission is due; the rest are counted and held."""
        ready, backoff, limited = self._backoff.due(regions, now)
        if backoff:
            self._metrics.failover_skipped.labels(reason="resubmit_backoff").inc(backoff)
            holds.add("resubmit_backoff")
        if limited:
            self._metrics.failover_skipped.labels(reason="resubmit_limit").inc(limited)
            holds.add("resubmit_limit")
            p = self._backoff.policy
            self._held_log(now, "failover_resubmit_limited", datanode_id=datanode_id, regions=limited,
                           limit=p.max_resubmissions_per_window, window_ms=p.resubmit_window_ms)
        return ready
