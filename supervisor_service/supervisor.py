"""The supervisor's decisions: events in, state changes and effects out.

`Supervisor.handle(event, now_ms)` is called by the supervisor thread only.
It reads no clock and does no I/O: remote calls leave as effects in
`outbox` (run by `runtime.SupervisorRuntime` on worker threads) and their
results come back as events. Failover follows DESIGN.md section 4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import assert_never

import numpy as np

from supervisor_service._log import log_event
from supervisor_service.detector import PhiAccrualOptions
from supervisor_service.events import (
    DONE_CATEGORIES,
    KEPT_CATEGORIES,
    Clear,
    Deregister,
    DetectingRegion,
    Dump,
    BecomeLeader,
    Event,
    Heartbeat,
    LoseLeadership,
    MigrationState,
    MigrationTask,
    Peer,
    Register,
    ReleaseHold,
    Reset,
    SelectionDone,
    SelectJob,
    SetMaintenance,
    StatusPolled,
    Stop,
    SubmissionDone,
    Tick,
)
from supervisor_service.guards import Guards
from supervisor_service.metrics import HOLD_REASONS, Metrics
from supervisor_service.store import (
    Change,
    CountsDrop,
    CountsSet,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    MaintenanceSet,
    RegistryAdd,
    RegistryRemove,
    StoredState,
)
from supervisor_service.table import DetectorTable, NodeSnapshot, as_region_array

log = logging.getLogger("supervisor_service.supervisor")


# ---------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class SelectPeers:
    """Run PeerLookup(datanode) and Selector.Select for the job; answer with SelectionDone."""

    job: SelectJob


@dataclass(frozen=True, slots=True)
class SubmitMigration:
    """Run RegionMigration.SubmitRegionMigration; answer with SubmissionDone."""

    task: MigrationTask


@dataclass(frozen=True, slots=True)
class PollMigration:
    """Run RegionMigration.GetMigrationStatus; answer with StatusPolled."""

    procedure_id: str


Effect = SelectPeers | SubmitMigration | PollMigration


@dataclass(frozen=True, slots=True)
class DumpSnapshot:
    """What Dump returns: a consistent copy, turned into rows off the supervisor thread."""

    nodes: list[NodeSnapshot]
    failover_counts: dict[DetectingRegion, int]
    migrating: frozenset[int]
    is_leader: bool
    maintenance: bool
    maintenance_datanodes: dict[int, int]
    holds: tuple[str, ...]
    threshold: float
    taken_at_ms: int


@dataclass(slots=True)
class _InFlight:
    datanode_id: int
    procedure_id: str  # empty when reported `migrating` without a procedure of ours
    deadline_ms: int


@dataclass(slots=True)
class _Procedure:
    regions: set[int] = field(default_factory=set)
    next_poll_ms: int = 0
    polling: bool = False


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Failover parameters (plain values, so tests build them directly)."""

    base_timeout_ms: int = 120_000
    """Migration timeout per failover count: `timeout = base * max(count)` (GreptimeDB: 120 s)."""
    status_poll_interval_ms: int = 5_000
    """How often an in-flight migration's status is asked for."""
    log_interval_ms: int = 60_000
    """Minimum interval between repeated 'failover held' log lines."""
    warmup_grace_ms: int = 30_000
    """After becoming leader, no failover for this long ..."""
    warmup_fraction: float = 0.9
    """... or until this fraction of the known datanodes has been heard from, whichever comes first."""
    failover_count_decay_ms: int = 0
    """A region healthy this long after its last failover forgets its failover count (0: never)."""
    rebaseline_after_maintenance: bool = True
    """When maintenance ends, every detector it covered gets a fresh heartbeat at now."""


class Supervisor:
    """Owns the detector table, the failover counts and the in-flight migrations."""

    def __init__(
        self,
        opts: PhiAccrualOptions,
        metrics: Metrics,
        policy: FailoverPolicy | None = None,
        *,
        is_leader: bool = True,
        leader_term: int = 1,
        maintenance: bool = False,
        guards: Guards | None = None,
    ) -> None:
        self.opts = opts
        self.metrics = metrics
        self.policy = policy or FailoverPolicy()
        self.table = DetectorTable(opts)
        self.failover_counts: dict[DetectingRegion, int] = {}
        # Read by other threads (Get RPCs, health) as plain attribute loads; written only here.
        self.maintenance = maintenance
        self.is_leader = is_leader
        self.leader_term = leader_term
        self.outbox: list[Effect] = []
        self.changes: list[Change] = []  # for the state store, in order
        self._selecting: dict[int, SelectJob] = {}  # datanode -> job in PeerLookup/Selector
        self._submitting: dict[int, MigrationTask] = {}  # task id -> task in SubmitRegionMigration
        self._busy: set[int] = set()  # regions in either of the two calls above
        self._inflight: dict[int, _InFlight] = {}  # region -> migration we know is running
        self._procedures: dict[str, _Procedure] = {}
        self._prev_failed: dict[int, np.ndarray] = {}
        self._next_id = 1
        self._last_hold_log_ms: dict[str, int] = {}
        self.guards = guards
        self.datanode_maintenance: dict[int, int] = {}  # datanode -> expiry (0: none)
        self.maintenance_until_ms = 0  # expiry of the global switch (0: none)
        self._count_touched: dict[DetectingRegion, int] = {}
        self._last_decay_ms = -(10**18)
        self._warmup_until_ms = 0
        self._warmup_known: set[int] = set()
        self._warmup_heard: set[int] = set()
        metrics.maintenance.set(int(maintenance))
        metrics.leader.set(int(is_leader))

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event, now: int) -> object:
        """Apply one event at `now` (ms). Returns the reply value for events that carry one."""
        match event:
            case Heartbeat(datanode_id, region_ids, ts):
                created = self.table.heartbeat(datanode_id, region_ids, ts, create=not event.known_only)
                if created.size:
                    self.changes.append(RegistryAdd(datanode_id, created))
                if self._warmup_known:
                    self._warmup_heard.add(datanode_id)
                return created.size
            case Register(regions):
                return self._for_each_datanode(regions, self._register, now)
            case Reset(regions):
                return self._for_each_datanode(regions, self._reset, now)
            case Deregister(regions):
                return self._for_each_datanode(regions, self._deregister, now)
            case Clear():
                self.table.clear()
                self._prev_failed.clear()
                return len(self.table)
            case Tick(lag_ms=lag_ms, queue_fill=queue_fill):
                self._tick(now, lag_ms, queue_fill)
                return None
            case Dump(datanode_ids=datanode_ids):
                return self._snapshot(datanode_ids, now)
            case SetMaintenance(enabled, _, datanode_ids, ttl_ms):
                self._set_maintenance(enabled, datanode_ids, ttl_ms, now)
                return self.maintenance_state()
            case ReleaseHold():
                released = self.guards.release() if self.guards is not None else False
                log_event(log, logging.WARNING, "failover_hold_released", was_held=released)
                return released
            case SelectionDone():
                self._on_selection(event, now)
                return None
            case SubmissionDone():
                self._on_submission(event, now)
                return None
            case StatusPolled():
                self._on_status(event, now)
                return None
            case BecomeLeader(term, state):
                self._become_leader(term, state, now)
                return None
            case LoseLeadership():
                self._lose_leadership()
                return None
            case Stop():
                return None
            case _:
                assert_never(event)

    @property
    def last_failed(self) -> dict[int, np.ndarray]:
        """The datanodes (and their regions) the last tick found at or above the threshold; do not modify."""
        return self._prev_failed

    def drain_outbox(self) -> list[Effect]:
        out, self.outbox = self.outbox, []
        return out

    def drain_changes(self) -> list[Change]:
        out, self.changes = self.changes, []
        return out

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # ------------------------------------------------------------ registry

    @staticmethod
    def _by_datanode(regions: tuple[DetectingRegion, ...]) -> dict[int, np.ndarray]:
        grouped: dict[int, list[int]] = {}
        for datanode_id, region_id in regions:
            grouped.setdefault(datanode_id, []).append(region_id)
        return {d: as_region_array(r) for d, r in grouped.items()}

    def _for_each_datanode(self, regions, apply, now: int) -> int:
        return sum(apply(d, r, now) for d, r in self._by_datanode(regions).items())

    def _register(self, datanode_id: int, region_ids: np.ndarray, now: int) -> int:
        self.changes.append(RegistryAdd(datanode_id, region_ids))
        return self.table.register(datanode_id, region_ids, now)

    def _reset(self, datanode_id: int, region_ids: np.ndarray, now: int) -> int:
        self.changes.append(RegistryAdd(datanode_id, region_ids))
        return self.table.reset(datanode_id, region_ids, now)

    def _deregister(self, datanode_id: int, region_ids: np.ndarray, now: int = 0) -> int:
        dropped = []
        for region_id in region_ids.tolist():
            key = (datanode_id, region_id)
            self._count_touched.pop(key, None)
            if self.failover_counts.pop(key, None) is not None:
                dropped.append(key)
        if dropped:
            self.changes.append(CountsDrop(tuple(dropped)))
        self.changes.append(RegistryRemove(datanode_id, region_ids))
        return self.table.deregister(datanode_id, region_ids)

    def maintenance_state(self) -> MaintenanceSet:
        return MaintenanceSet(
            self.maintenance, self.maintenance_until_ms, tuple(sorted(self.datanode_maintenance.items()))
        )

    def _set_maintenance(self, enabled: bool, datanode_ids: tuple[int, ...], ttl_ms: int, now: int) -> None:
        until = now + ttl_ms if enabled and ttl_ms > 0 else 0
        if datanode_ids:
            ended = []
            for d in datanode_ids:
                if enabled:
                    self.datanode_maintenance[d] = until
                elif self.datanode_maintenance.pop(d, None) is not None:
                    ended.append(d)
            log_event(log, logging.WARNING, "datanode_maintenance_changed", enabled=enabled,
                      datanodes=",".join(map(str, datanode_ids)), until_ms=until)
            self._end_maintenance(ended, now)
        else:
            was = self.maintenance
            if enabled != was or until != self.maintenance_until_ms:
                log_event(log, logging.WARNING, "maintenance_mode_changed", enabled=enabled, until_ms=until)
            self.maintenance, self.maintenance_until_ms = enabled, until
            if was and not enabled:
                self._end_maintenance(None, now)
        self._publish_maintenance()
        self.changes.append(self.maintenance_state())

    def _end_maintenance(self, datanode_ids: list[int] | None, now: int) -> None:
        """Re-baseline what maintenance covered, so an upgrade window does not end in a burst of failovers."""
        if datanode_ids == [] or not self.policy.rebaseline_after_maintenance:
            return
        count = self.table.rebaseline(datanode_ids, now)
        self._prev_failed = {}
        log_event(log, logging.WARNING, "detectors_rebaselined", detectors=count,
                  scope="all" if datanode_ids is None else ",".join(map(str, datanode_ids)))

    def _expire_maintenance(self, now: int) -> None:
        changed = False
        if self.maintenance and 0 < self.maintenance_until_ms <= now:
            log_event(log, logging.WARNING, "maintenance_mode_expired", until_ms=self.maintenance_until_ms)
            self.maintenance, self.maintenance_until_ms = False, 0
            self._end_maintenance(None, now)
            changed = True
        expired = [d for d, until in self.datanode_maintenance.items() if 0 < until <= now]
        if expired:
            for d in expired:
                del self.datanode_maintenance[d]
            log_event(log, logging.WARNING, "datanode_maintenance_expired", datanodes=",".join(map(str, expired)))
            self._end_maintenance(expired, now)
            changed = True
        if changed:
            self._publish_maintenance()
            self.changes.append(self.maintenance_state())

    def _publish_maintenance(self) -> None:
        self.metrics.maintenance.set(int(self.maintenance))
        self.metrics.maintenance_datanodes.set(len(self.datanode_maintenance))

    def set_leadership(self, is_leader: bool, term: int) -> None:
        self.is_leader, self.leader_term = is_leader, term
        self.metrics.leader.set(int(is_leader))

    def _become_leader(self, term: int, state: StoredState, now: int) -> None:
        """Recovery (GreptimeDB's InitializeAllRegions): every registered region gets a heartbeat at now.

        A datanode that died while no leader was running is then failed over
        one detection period later. Migrations in flight are reloaded, not
        submitted again.
        """
        self._forget_volatile_state()
        for datanode_id, region_ids in state.registry.items():
            self.table.register(datanode_id, region_ids, now)
        self.failover_counts = dict(state.failover_counts)
        self._count_touched = dict.fromkeys(self.failover_counts, now)  # decay counts from the recovery on
        self.maintenance = state.maintenance
        self.maintenance_until_ms = state.maintenance_until_ms
        self.datanode_maintenance = dict(state.datanode_maintenance)
        self._publish_maintenance()
        self._inflight = {
            r: _InFlight(rec.datanode_id, rec.procedure_id, rec.deadline_ms) for r, rec in state.inflight.items()
        }
        for region_id, flight in self._inflight.items():
            if flight.procedure_id:
                proc = self._procedures.setdefault(flight.procedure_id, _Procedure(next_poll_ms=now))
                proc.regions.add(region_id)
        self._warmup_until_ms = now + self.policy.warmup_grace_ms
        self._warmup_known = set(state.registry)
        self._warmup_heard = set()
        self.set_leadership(True, term)
        self.metrics.detectors.set(len(self.table))
        self.metrics.inflight.set(len(self._inflight))
        log_event(
            log, logging.WARNING, "leadership_started", term=term, datanodes=len(state.registry),
            regions=len(self.table), in_flight=len(self._inflight), maintenance=state.maintenance,
        )

    def _lose_leadership(self) -> None:
        """Forget the table: the next leader rebuilds it from the store and the datanodes."""
        self.set_leadership(False, self.leader_term)
        self._forget_volatile_state()
        log_event(log, logging.WARNING, "leadership_stopped", term=self.leader_term)

    def _forget_volatile_state(self) -> None:
        """Everything a leadership change rebuilds: the table and the failover work under way."""
        self.table.clear()
        self._prev_failed.clear()
        self._selecting.clear()
        self._submitting.clear()
        self._busy.clear()
        self._inflight.clear()
        self._procedures.clear()
        self._warmup_known = set()

    def _warming_up(self, now: int) -> bool:
        if not self._warmup_known or now >= self._warmup_until_ms:
            self._warmup_known = set()
            return False
        heard = len(self._warmup_known & self._warmup_heard) / len(self._warmup_known)
        if heard >= self.policy.warmup_fraction:
            self._warmup_known = set()
            return False
        return True

    # ------------------------------------------------------------ tick

    def _tick(self, now: int, lag_ms: float = 0.0, queue_fill: float = 0.0) -> None:
        m = self.metrics
        m.detectors.set(len(self.table))
        m.detector_groups.set(self.table.group_count)
        m.phi.set(self.table.phi_sizes(now))
        # Expiring maintenance re-baselines detectors: do it before reading who failed.
        self._expire_maintenance(now)
        failed = dict(self.table.failed(now))
        self._count_new_failures(failed)
        guards = self.guards
        pause = guards.observe_tick(now, lag_ms, queue_fill) if guards is not None else None
        if guards is not None:
            silent: list[int] = []
            # While a stall or an overload holds convictions, the silence is the supervisor's own
            # doing (the heartbeats wait in its queue): it is not a mass failure, nor an alert.
            if pause is None:
                # A datanode whose regions are all being migrated is dead and handled: not a new silence.
                handled = self._inflight.keys() | self._busy
                silent = [
                    d for d in self.table.silent_datanodes(now, guards.s.mass_failure_silence_ms)
                    if not handled or not set(self.table.regions_of(d).tolist()) <= handled
                ]
            guards.track(set(failed), len(silent), len(self.table.datanode_ids()), now)
            self._decay_counts(now)
        if not self.is_leader:
            self._publish_holds(())
            return
        self._expire_and_poll(now)
        holds = self._holds(now, failed, pause)
        self._publish_holds(holds)
        if not failed:
            return
        total = sum(r.size for r in failed.values())
        if holds:
            reason = holds[0]
            m.failover_skipped.labels(reason=reason).inc(total)
            self._hold_log(now, f"failover_held_{reason}", failed_regions=total, datanodes=len(failed),
                           **self._hold_details(reason))
            return
        # Oldest failure first: under a rate limit, the longest-waiting datanode goes first.
        order = sorted(failed, key=lambda d: (guards.failed_since(d, now) if guards else 0, d))
        exclude_targets = tuple(sorted(guards.excluded_targets(now))) if guards is not None else ()
        for datanode_id in order:
            region_ids = failed[datanode_id]
            if datanode_id in self.datanode_maintenance:
                m.failover_skipped.labels(reason="maintenance_datanode").inc(region_ids.size)
                continue
            if datanode_id in self._selecting:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size)
                continue
            regions = [r for r in region_ids.tolist() if r not in self._busy and r not in self._inflight]
            if len(regions) < region_ids.size:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size - len(regions))
            if not regions:
                continue
            if guards is not None:
                if now < guards.backoff_until(datanode_id):
                    m.failover_skipped.labels(reason="flap_backoff").inc(len(regions))
                    self._hold_log(now, "failover_backoff", datanode_id=datanode_id,
                                   until_ms=guards.backoff_until(datanode_id))
                    continue
                if not guards.take_global(now):
                    m.failover_skipped.labels(reason="rate_limited").inc(len(regions))
                    self._hold_log(now, "failover_rate_limited", datanode_id=datanode_id, regions=len(regions))
                    continue
            job = SelectJob(self._new_id(), datanode_id, tuple(regions), exclude_targets)
            self._selecting[datanode_id] = job
            self.outbox.append(SelectPeers(job))
            log_event(
                log,
                logging.WARNING,
                "region_failures_detected",
                datanode_id=datanode_id,
                regions=len(regions),
                sample=_sample(regions),
            )

    def _holds(self, now: int, failed: dict[int, np.ndarray], pause: str | None) -> tuple[str, ...]:
        """Every reason to hold all failover right now, most fundamental first."""
        holds = []
        if self.maintenance:
            holds.append("maintenance")
        if self._warming_up(now):
            holds.append("warmup")
        if pause is not None:
            holds.append(pause)
        if self.guards is not None and self.guards.mass_failure():
            holds.append("mass_failure")
        return tuple(holds)

    def _hold_details(self, reason: str) -> dict[str, object]:
        if reason == "warmup":
            return {"heard": len(self._warmup_heard & self._warmup_known), "known": len(self._warmup_known),
                    "until_ms": self._warmup_until_ms}
        if reason == "mass_failure" and self.guards is not None:
            return {"failed_fraction": round(self.guards.mass_failure_fraction, 3),
                    "release": "supervisor-service hold release"}
        return {}

    def _publish_holds(self, holds: tuple[str, ...]) -> None:
        if self.guards is not None:
            self.guards.active_holds = holds
        m = self.metrics
        for reason in HOLD_REASONS:
            m.failover_hold.labels(reason=reason).set(int(reason in holds))
        if self.guards is not None:
            m.failed_datanode_fraction.set(self.guards.mass_failure_fraction)

    def _decay_counts(self, now: int) -> None:
        """Failover counts of regions healthy for `failover_count_decay_ms` are forgotten."""
        decay = self.policy.failover_count_decay_ms
        if decay <= 0 or now - self._last_decay_ms < 10_000:
            return
        self._last_decay_ms = now
        stale = [k for k, t in self._count_touched.items() if now - t >= decay]
        dropped = []
        for key in stale:
            phi = self.table.phis(key[0], as_region_array([key[1]]), now).get(key[1])
            if phi is not None and phi >= self.opts.threshold:
                self._count_touched[key] = now  # still failed: the healthy period starts later
                continue
            del self._count_touched[key]
            if self.failover_counts.pop(key, None) is not None:
                dropped.append(key)
        if dropped:
            self.changes.append(CountsDrop(tuple(dropped)))
            log_event(log, logging.INFO, "failover_counts_decayed", regions=len(dropped))

    def _count_new_failures(self, failed: dict[int, np.ndarray]) -> None:
        new = 0
        for datanode_id, region_ids in failed.items():
            before = self._prev_failed.get(datanode_id)
            new += region_ids.size if before is None else np.setdiff1d(region_ids, before).size
        if new:
            self.metrics.failures_detected.inc(new)
        self._prev_failed = failed

    def _hold_log(self, now: int, event: str, **fields: object) -> None:
        """Log a repeated condition at most once per log_interval_ms (per kind of line)."""
        if now - self._last_hold_log_ms.get(event, -(10**18)) >= self.policy.log_interval_ms:
            self._last_hold_log_ms[event] = now
            log_event(log, logging.WARNING, event, **fields)

    def _expire_and_poll(self, now: int) -> None:
        expired = [r for r, f in self._inflight.items() if now >= f.deadline_ms]
        for region_id in expired:
            flight = self._inflight.pop(region_id)
            self.changes.append(InFlightDrop(region_id))
            self._forget_procedure_region(flight.procedure_id, region_id)
            log_event(
                log,
                logging.WARNING,
                "migration_timed_out",
                datanode_id=flight.datanode_id,
                region_id=region_id,
                procedure_id=flight.procedure_id,
            )
        for procedure_id, proc in self._procedures.items():
            if not proc.polling and now >= proc.next_poll_ms:
                proc.polling = True
                self.outbox.append(PollMigration(procedure_id))
        self.metrics.inflight.set(len(self._inflight))

    def _forget_procedure_region(self, procedure_id: str, region_id: int) -> None:
        proc = self._procedures.get(procedure_id)
        if proc is not None:
            proc.regions.discard(region_id)
            if not proc.regions:
                del self._procedures[procedure_id]

    # ------------------------------------------------------------ failover results

    def _on_selection(self, ev: SelectionDone, now: int) -> None:
        job = ev.job
        if self._selecting.get(job.datanode_id) == job:
            del self._selecting[job.datanode_id]
        m = self.metrics
        if ev.error is not None:
            m.failover_errors.labels(stage=ev.error_stage or "select").inc()
            log_event(
                log, logging.ERROR, "failover_select_failed", datanode_id=job.datanode_id,
                stage=ev.error_stage or "select", error=ev.error,
            )
            return
        if not self.is_leader:
            return
        wanted = len(job.region_ids)
        if len(ev.peers) < wanted:
            m.failover_errors.labels(stage="insufficient_peers").inc()
            log_event(
                log, logging.ERROR, "failover_insufficient_peers", datanode_id=job.datanode_id,
                wanted=wanted, got=len(ev.peers),
            )
            return
        from_peer = ev.from_peer or Peer(job.datanode_id)
        # Re-check at answer time: a region that heartbeat meanwhile, or was deregistered, is not moved.
        phis = self.table.phis(job.datanode_id, as_region_array(job.region_ids), now)
        by_target: dict[Peer, list[int]] = {}
        recovered = same_peer = damped = 0
        excluded = set(job.exclude_targets)
        for region_id, to_peer in zip(job.region_ids, ev.peers):
            phi = phis.get(region_id)
            if phi is None or phi < self.opts.threshold or region_id in self._inflight:
                recovered += 1
                continue
            if to_peer.id == from_peer.id:
                same_peer += 1
                continue
            if to_peer.id in excluded:  # the Selector ignored exclude_peer_ids
                damped += 1
                continue
            by_target.setdefault(to_peer, []).append(region_id)
        if recovered:
            m.failover_skipped.labels(reason="recovered").inc(recovered)
        if same_peer:
            m.failover_skipped.labels(reason="same_peer").inc(same_peer)
            log_event(log, logging.WARNING, "failover_same_peer_skipped", datanode_id=job.datanode_id,
                      regions=same_peer)
        if damped:
            m.failover_skipped.labels(reason="damped_target").inc(damped)
            log_event(log, logging.WARNING, "failover_damped_target_skipped", datanode_id=job.datanode_id,
                      regions=damped)
        if self.guards is not None:
            by_target = self._limit_targets(by_target, now)
            if by_target:
                self.guards.note_failover(job.datanode_id, now)
        for to_peer, regions in by_target.items():
            counts = []
            for region_id in regions:
                key = (job.datanode_id, region_id)
                self.failover_counts[key] = self.failover_counts.get(key, 0) + 1
                self._count_touched[key] = now
                counts.append(self.failover_counts[key])
            self.changes.append(
                CountsSet(tuple(((job.datanode_id, r), c) for r, c in zip(regions, counts)))
            )
            task = MigrationTask(
                task_id=self._new_id(),
                datanode_id=job.datanode_id,
                from_peer=from_peer,
                to_peer=to_peer,
                region_ids=tuple(regions),
                timeout_ms=self.policy.base_timeout_ms * max(counts),
                leader_term=self.leader_term,
            )
            self._submitting[task.task_id] = task
            self._busy.update(regions)
            # The intent is stored before the call leaves (the runtime sends it once this is
            # durable): a successor that finds it treats the regions as in flight until the
            # timeout, rather than failing them over a second time.
            intent = InFlightRecord(job.datanode_id, "", now + task.timeout_ms)
            self.changes.extend(InFlightSet(r, intent) for r in regions)
            self.outbox.append(SubmitMigration(task))
            log_event(
                log, logging.WARNING, "failover_submitting", datanode_id=job.datanode_id,
                from_peer=from_peer.id, to_peer=to_peer.id, regions=len(regions),
                timeout_ms=task.timeout_ms, sample=_sample(regions),
            )

    def _limit_targets(self, by_target: dict[Peer, list[int]], now: int) -> dict[Peer, list[int]]:
        """Per-target budget: regions beyond it wait for a later tick (they are still failed then)."""
        allowed = {}
        for to_peer, regions in by_target.items():
            granted = self.guards.take_target(to_peer.id, len(regions), now)
            if granted < len(regions):
                self.metrics.failover_skipped.labels(reason="rate_limited_target").inc(len(regions) - granted)
                self._hold_log(now, "failover_target_rate_limited", to_peer=to_peer.id,
                               granted=granted, wanted=len(regions))
            if granted:
                allowed[to_peer] = regions[:granted]
        return allowed

    def _on_submission(self, ev: SubmissionDone, now: int) -> None:
        task = self._submitting.pop(ev.task.task_id, ev.task)
        self._busy.difference_update(task.region_ids)
        self.changes.extend(InFlightDrop(r) for r in task.region_ids)  # the intent; re-set below if in flight
        m = self.metrics
        if ev.error is not None or ev.result is None:
            m.failover_errors.labels(stage="submit").inc()
            m.failover_regions.labels(result="call_failed").inc(len(task.region_ids))
            log_event(log, logging.ERROR, "failover_submit_failed", datanode_id=task.datanode_id,
                      to_peer=task.to_peer.id, regions=len(task.region_ids), error=ev.error)
            return
        result = ev.result
        asked = set(task.region_ids)
        answered: set[int] = set()
        d = task.datanode_id
        for category in DONE_CATEGORIES + KEPT_CATEGORIES:
            regions = [r for r in getattr(result, category) if r in asked and r not in answered]
            if not regions:
                continue
            answered.update(regions)
            m.failover_regions.labels(result=category).inc(len(regions))
            if category in DONE_CATEGORIES:
                self._deregister(d, as_region_array(regions))
            elif category == "submitted" or category == "migrating":
                procedure_id = result.procedure_id if category == "submitted" else ""
                for region_id in regions:
                    self._inflight[region_id] = _InFlight(d, procedure_id, now + task.timeout_ms)
                    self.changes.append(
                        InFlightSet(region_id, InFlightRecord(d, procedure_id, now + task.timeout_ms))
                    )
                if procedure_id:
                    proc = self._procedures.setdefault(procedure_id, _Procedure())
                    proc.regions.update(regions)
                    proc.next_poll_ms = now + self.policy.status_poll_interval_ms
        unanswered = asked - answered
        if unanswered:
            m.failover_regions.labels(result="unanswered").inc(len(unanswered))
            log_event(log, logging.ERROR, "failover_regions_unanswered", datanode_id=d,
                      regions=len(unanswered), sample=_sample(sorted(unanswered)))
        log_event(
            log, logging.WARNING, "failover_submitted", datanode_id=d, to_peer=task.to_peer.id,
            procedure_id=result.procedure_id,
            **{c: len(getattr(result, c)) for c in DONE_CATEGORIES + KEPT_CATEGORIES if getattr(result, c)},
        )
        self.metrics.inflight.set(len(self._inflight))

    def _on_status(self, ev: StatusPolled, now: int) -> None:
        proc = self._procedures.get(ev.procedure_id)
        if proc is None:
            return
        proc.polling = False
        state = ev.state
        if ev.error is not None or state in (None, MigrationState.RUNNING, MigrationState.UNSPECIFIED):
            proc.next_poll_ms = now + self.policy.status_poll_interval_ms
            if ev.error is not None:
                self.metrics.failover_errors.labels(stage="status").inc()
            return
        del self._procedures[ev.procedure_id]
        flights = {r: self._inflight.pop(r) for r in proc.regions if r in self._inflight}
        self.changes.extend(InFlightDrop(r) for r in flights)
        if state is MigrationState.SUCCEEDED:
            # The regions live elsewhere now: the old detectors would only fire again.
            for region_id, flight in flights.items():
                self._deregister(flight.datanode_id, as_region_array([region_id]))
        log_event(
            log,
            logging.INFO if state is MigrationState.SUCCEEDED else logging.WARNING,
            "migration_finished",
            procedure_id=ev.procedure_id,
            state=state.name,
            regions=len(flights),
            message=ev.message,
        )
        self.metrics.inflight.set(len(self._inflight))

    # ------------------------------------------------------------ dump

    def _snapshot(self, datanode_ids: frozenset[int] | None, now: int) -> DumpSnapshot:
        wanted = None if datanode_ids is None else set(datanode_ids)
        counts = {
            k: v for k, v in self.failover_counts.items() if wanted is None or k[0] in wanted
        }
        return DumpSnapshot(
            nodes=self.table.snapshot(wanted),
            failover_counts=counts,
            migrating=frozenset(self._inflight) | frozenset(self._busy),
            is_leader=self.is_leader,
            maintenance=self.maintenance,
            maintenance_datanodes=dict(self.datanode_maintenance),
            holds=self.guards.active_holds if self.guards is not None else (),
            threshold=self.opts.threshold,
            taken_at_ms=now,
        )


def _sample(regions: list[int], limit: int = 5) -> str:
    shown = ",".join(str(r) for r in regions[:limit])
    return shown + (f",... ({len(regions)} in all)" if len(regions) > limit else "")
