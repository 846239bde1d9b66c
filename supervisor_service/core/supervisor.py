"""The supervisor's decisions: events in, state changes and effects out.

`Supervisor.handle(event, now_ms)` is called by the supervisor thread only.
It reads no clock and does no I/O: remote calls leave as effects in
`outbox` (run by `runtime.SupervisorRuntime` on worker threads) and their
results come back as events. Failover follows DESIGN.md section 4.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, assert_never

import numpy as np

from supervisor_service.core.changes import (
    AMBIGUOUS,
    INTENT,
    MIGRATING,
    SUBMITTED,
    Change,
    ClockMark,
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
from supervisor_service.core.clock import ClockBase
from supervisor_service.core.detector import PhiAccrualOptions
from supervisor_service.core.effects import Effect, PollMigration, SelectPeers, SubmitMigration
from supervisor_service.core.events import (
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    BecomeLeader,
    Clear,
    Deregister,
    Dump,
    Event,
    Heartbeat,
    LoseLeadership,
    Register,
    ReleaseHold,
    Reset,
    SelectionDone,
    SetMaintenance,
    StatusPolled,
    Stop,
    SubmissionDone,
    Tick,
)
from supervisor_service.core.guards import HOLD_REASONS, Guards
from supervisor_service.core.logs import log_event
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.table import DetectorTable, NodeSnapshot, as_region_array

if TYPE_CHECKING:
    from supervisor_service.app.metrics import Metrics  # replaced by a core protocol
from supervisor_service.core.types import (
    DONE_CATEGORIES,
    KEPT_CATEGORIES,
    DetectingRegion,
    MigrationState,
    MigrationTask,
    Peer,
    SelectJob,
)

log = logging.getLogger("supervisor_service.supervisor")

# Longest peer address taken from a remote answer (host:port is far shorter; a longer one is garbage).
MAX_PEER_ADDR_LEN = 512


# ---------------------------------------------------------------- effects


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
class _Submission:
    """One decision, from its intent to its end; the in-memory side of its InFlightRecord.

    intent / ambiguous: the regions are held (maybe submitted) and the call is retried, to the
    same target with the same request_id, until a definite answer; submitted / migrating: in
    flight until the procedure ends or `deadline_ms` passes.
    """

    sid: str  # its key in the store (the request_id, or request_id + ".m" for regions reported migrating)
    task: MigrationTask  # task_id is the attempt now out, or the last one
    state: str
    procedure_id: str = ""
    attempts: int = 0
    sending: bool = False
    retry_at_ms: int = 0
    rewrite: bool = False  # the record must be written again before the next call (its write failed)
    deadline_ms: int = 0
    mark: ClockMark | None = None

    @property
    def regions(self) -> tuple[int, ...]:
        return self.task.region_ids

    def record(self) -> InFlightRecord:
        t = self.task
        return InFlightRecord(t.request_id, t.datanode_id, t.from_peer, t.to_peer, t.region_ids, t.timeout_ms,
                              self.state, self.procedure_id, self.attempts, self.mark)


@dataclass(slots=True)
class _Procedure:
    sids: set[str] = field(default_factory=set)
    next_poll_ms: int = 0
    polling: bool = False


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
        clock_base: ClockBase | None = None,
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
        self._subs: dict[str, _Submission] = {}  # submission id -> decision not ended
        self._region_sub: dict[int, str] = {}  # region -> the submission holding it (in flight or maybe)
        self._procedures: dict[str, _Procedure] = {}
        # region -> times a decision of it ended unsettled (NOT_FOUND, FAILED, refused, peer_conflict)
        self._unsettled: dict[int, deque[int]] = {}
        self._resubmit_at: dict[int, int] = {}  # region -> no new submission before (after a NOT_FOUND)
        # Durations that outlive this process are stored with a mark of this clock (see ClockBase).
        self._clock = clock_base or ClockBase()
        self._last_checkpoint_ms = 0
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
            self._unsettled.pop(region_id, None)
            self._resubmit_at.pop(region_id, None)
            if self.failover_counts.pop(key, None) is not None:
                dropped.append(key)
        if dropped:
            self.changes.append(CountsDrop(tuple(dropped)))
        self.changes.append(RegistryRemove(datanode_id, region_ids))
        return self.table.deregister(datanode_id, region_ids)

    def maintenance_state(self, now: int | None = None) -> MaintenanceSet:
        """The maintenance switches; with `now`, marked with this clock so that a successor trusts only
        the time each expiry had left (never a wall-clock difference)."""
        return MaintenanceSet(
            self.maintenance, self.maintenance_until_ms, tuple(sorted(self.datanode_maintenance.items())),
            None if now is None else self._mark(now),
        )

    def _mark(self, now: int) -> ClockMark:
        return ClockMark(self._clock.boot_id, self._clock.monotonic_ms(now), now)

    def _elapsed_since(self, mark: ClockMark | None, now: int) -> int:
        """Time since `mark` as measured by the machine's monotonic clock, when it was written on this
        boot; 0 otherwise (another machine, a reboot: the elapsed time is unknowable, and assuming
        none can only extend what runs, never end it early)."""
        if mark is None or not mark.boot_id or mark.boot_id != self._clock.boot_id:
            return 0
        return max(0, self._clock.monotonic_ms(now) - mark.monotonic_ms)

    def _recover_expiry(self, until: int, mark: ClockMark | None, now: int) -> int:
        """A stored expiry (0: none) on this life's clock: the time it had left at its mark, less the
        time since (on this boot). The first format had no mark: its absolute time is kept."""
        if until <= 0:
            return 0
        if mark is None:
            return until
        left = until - mark.wall_ms - self._elapsed_since(mark, now)
        return now + max(left, 1)

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
        self._last_checkpoint_ms = now
        self.changes.append(self.maintenance_state(now))

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
            self._last_checkpoint_ms = now
            self.changes.append(self.maintenance_state(now))
        elif (self.maintenance_until_ms or any(self.datanode_maintenance.values())) and (
            now - self._last_checkpoint_ms >= self.policy.expiry_checkpoint_interval_ms
        ):
            # Checkpoint of the time left: a successor on another machine (or after a reboot) ends
            # the window at most this interval plus the time without a leader late, never early.
            self._last_checkpoint_ms = now
            self.changes.append(self.maintenance_state(now))

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
        submitted again; a decision that may not have reached RegionMigration
        (intent, ambiguous) is sent again at once, to the same target under the
        same request_id. Stored durations are measured against this clock's
        mark, never against the wall clock of another life.
        """
        self._forget_volatile_state()
        self.set_leadership(True, term)
        if self.guards is not None:
            self.guards.reset()  # what the previous leadership saw is not this one's evidence
        for datanode_id, region_ids in state.registry.items():
            self.table.register(datanode_id, region_ids, now)
        self.failover_counts = dict(state.failover_counts)
        self._count_touched = dict.fromkeys(self.failover_counts, now)  # decay counts from the recovery on
        self.maintenance = state.maintenance
        mark = state.maintenance_mark
        self.maintenance_until_ms = self._recover_expiry(state.maintenance_until_ms, mark, now)
        self.datanode_maintenance = {
            d: self._recover_expiry(until, mark, now) for d, until in state.datanode_maintenance.items()
        }
        self._last_checkpoint_ms = now
        if mark is not None or self.maintenance_until_ms or any(self.datanode_maintenance.values()):
            self.changes.append(self.maintenance_state(now))
        self._publish_maintenance()
        for sid, rec in state.inflight.items():
            self._load_submission(sid, rec, now)
        if state.legacy_inflight:
            self._upgrade_legacy(state, now)
        self._warmup_until_ms = now + self.policy.warmup_grace_ms
        self._warmup_known = set(state.registry)
        self._warmup_heard = set()
        self.metrics.detectors.set(len(self.table))
        self._publish_submissions()
        log_event(
            log, logging.WARNING, "leadership_started", term=term, datanodes=len(state.registry),
            regions=len(self.table), in_flight=len(self._region_sub), submissions=len(self._subs),
            unresolved=sum(1 for sub in self._subs.values() if sub.state in (INTENT, AMBIGUOUS)),
            maintenance=state.maintenance,
        )

    def _load_submission(self, sid: str, rec: InFlightRecord, now: int) -> None:
        task = MigrationTask(self._new_id(), rec.datanode_id, rec.from_peer, rec.to_peer, rec.region_ids,
                             rec.timeout_ms, self.leader_term, rec.request_id)
        sub = _Submission(sid, task, rec.state, rec.procedure_id, rec.attempts, mark=rec.mark)
        if rec.state in (INTENT, AMBIGUOUS):
            sub.retry_at_ms = now  # resolved at once: the same request to the same target
        else:
            # On this boot the monotonic clock says exactly how long it has run; elsewhere a full
            # timeout from now (status polls learn the real end; at most one timeout longer).
            sub.deadline_ms = now + max(rec.timeout_ms - self._elapsed_since(rec.mark, now), 1)
            if rec.procedure_id:
                self._procedures.setdefault(rec.procedure_id, _Procedure(next_poll_ms=now)).sids.add(sid)
        self._subs[sid] = sub
        for region_id in rec.region_ids:
            self._region_sub[region_id] = sid

    def _upgrade_legacy(self, state: StoredState, now: int) -> None:
        """Records of the first format (one key per region, an absolute deadline) become one record per
        (datanode, procedure), in flight for a full base timeout from now (polled at once when they
        have a procedure): the stored deadline was on another life's wall clock."""
        groups: dict[tuple[int, str], list[int]] = {}
        for ident, old in sorted(state.legacy_inflight.items()):
            self.changes.append(InFlightDrop(ident))
            if old.region_id not in self._region_sub:
                groups.setdefault((old.datanode_id, old.procedure_id), []).append(old.region_id)
        for (datanode_id, procedure_id), regions in groups.items():
            request_id = self._new_request_id()
            rec = InFlightRecord(request_id, datanode_id, Peer(datanode_id), Peer(0), tuple(regions),
                                 self.policy.base_timeout_ms, SUBMITTED if procedure_id else MIGRATING,
                                 procedure_id, 0, self._mark(now))
            self._load_submission(request_id, rec, now)
            self.changes.append(InFlightSet(request_id, rec))
        log_event(log, logging.WARNING, "inflight_records_upgraded", regions=len(state.legacy_inflight),
                  submissions=len(groups))

    def _lose_leadership(self) -> None:
        """Forget the table: the next leader rebuilds it from the store and the datanodes."""
        self.set_leadership(False, self.leader_term)
        self._forget_volatile_state()
        if self.guards is not None:
            self.guards.reset()
        log_event(log, logging.WARNING, "leadership_stopped", term=self.leader_term)

    def _forget_volatile_state(self) -> None:
        """Everything a leadership change rebuilds: the table and the failover work under way."""
        self.table.clear()
        self._prev_failed.clear()
        self._selecting.clear()
        self._subs.clear()
        self._region_sub.clear()
        self._procedures.clear()
        self._unsettled.clear()
        self._resubmit_at.clear()
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
                handled = self._region_sub.keys()
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
        region_holds: set[str] = set()
        for datanode_id in order:
            region_ids = failed[datanode_id]
            if datanode_id in self.datanode_maintenance:
                m.failover_skipped.labels(reason="maintenance_datanode").inc(region_ids.size)
                continue
            if datanode_id in self._selecting:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size)
                continue
            regions = [r for r in region_ids.tolist() if r not in self._region_sub]
            if len(regions) < region_ids.size:
                m.failover_skipped.labels(reason="in_flight").inc(region_ids.size - len(regions))
            if self._resubmit_at:
                regions = self._after_resubmit_backoff(datanode_id, regions, now, region_holds)
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
        if region_holds:  # regions held back one by one: shown with the holds (GetFailoverHolds, Dump)
            self._publish_holds(holds + tuple(sorted(region_holds)))

    def _after_resubmit_backoff(self, datanode_id: int, regions: list[int], now: int, holds: set[str]) -> list[int]:
        """The regions whose resubmission after a NOT_FOUND status is due; the rest are counted and held."""
        p = self.policy
        ready, backoff, limited = [], 0, 0
        for region_id in regions:
            until = self._resubmit_at.get(region_id, 0)
            if now >= until:
                self._resubmit_at.pop(region_id, None)
                ready.append(region_id)
            elif len(self._unsettled.get(region_id, ())) > p.max_resubmissions_per_window:
                limited += 1
            else:
                backoff += 1
        if backoff:
            self.metrics.failover_skipped.labels(reason="resubmit_backoff").inc(backoff)
            holds.add("resubmit_backoff")
        if limited:
            self.metrics.failover_skipped.labels(reason="resubmit_limit").inc(limited)
            holds.add("resubmit_limit")
            self._hold_log(now, "failover_resubmit_limited", datanode_id=datanode_id, regions=limited,
                           limit=p.max_resubmissions_per_window, window_ms=p.resubmit_window_ms)
        return ready

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

    def _hold_log(self, now: int, event: str, *, key: str | None = None, **fields: object) -> None:
        """Log a repeated condition at most once per log_interval_ms (per kind of line, or per `key`)."""
        key = key or event
        if now - self._last_hold_log_ms.get(key, -(10**18)) >= self.policy.log_interval_ms:
            self._last_hold_log_ms[key] = now
            log_event(log, logging.WARNING, event, **fields)

    def _expire_and_poll(self, now: int) -> None:
        """In-flight migrations past their deadline end; decisions not yet answered are sent again
        (backed off); procedures due are polled."""
        for sid in [sid for sid, sub in self._subs.items() if sub.deadline_ms and now >= sub.deadline_ms]:
            sub = self._end_submission(sid)
            log_event(
                log, logging.WARNING, "migration_timed_out", datanode_id=sub.task.datanode_id,
                regions=len(sub.regions), sample=_sample(list(sub.regions)), procedure_id=sub.procedure_id,
                timeout_ms=sub.task.timeout_ms,
            )
        for sub in self._subs.values():
            if sub.state in (INTENT, AMBIGUOUS) and not sub.sending and now >= sub.retry_at_ms:
                if self.maintenance or sub.task.datanode_id in self.datanode_maintenance:
                    # An operator said "no migration now": even one that may have started waits.
                    self._hold_log(now, "failover_retry_held_maintenance", datanode_id=sub.task.datanode_id,
                                   request_id=sub.task.request_id)
                    continue
                self.metrics.submit_retries.inc()
                log_event(log, logging.WARNING, "failover_submit_retried", datanode_id=sub.task.datanode_id,
                          to_peer=sub.task.to_peer.id, request_id=sub.task.request_id, state=sub.state,
                          attempts=sub.attempts, regions=len(sub.regions))
                self._send(sub)
        for procedure_id, proc in self._procedures.items():
            if not proc.polling and now >= proc.next_poll_ms:
                proc.polling = True
                self.outbox.append(PollMigration(procedure_id))
        if self._resubmit_at:  # backoffs that ran out: a region that recovered meanwhile keeps none
            for region_id in [r for r, until in self._resubmit_at.items() if until <= now]:
                del self._resubmit_at[region_id]
        if self._unsettled:
            horizon = now - self.policy.resubmit_window_ms
            for region_id in list(self._unsettled):
                times = self._unsettled[region_id]
                while times and times[0] <= horizon:
                    times.popleft()
                if not times and region_id not in self._resubmit_at:
                    del self._unsettled[region_id]
        self._publish_submissions()

    def _send(self, sub: _Submission) -> None:
        """One call of the decision: a fresh attempt id, the current term, the same request_id."""
        sub.task = dataclasses.replace(sub.task, task_id=self._new_id(), leader_term=self.leader_term)
        sub.sending = True
        if sub.rewrite:  # the runtime sends it once this is durable
            sub.rewrite = False
            self.changes.append(InFlightSet(sub.sid, sub.record()))
        self.outbox.append(SubmitMigration(sub.task))

    def _end_submission(self, sid: str) -> _Submission:
        """Forget a submission (its regions are free again) and drop its record."""
        sub = self._subs.pop(sid)
        for region_id in sub.regions:
            if self._region_sub.get(region_id) == sid:
                del self._region_sub[region_id]
        proc = self._procedures.get(sub.procedure_id) if sub.procedure_id else None
        if proc is not None:
            proc.sids.discard(sid)
            if not proc.sids:
                del self._procedures[sub.procedure_id]
        self.changes.append(InFlightDrop(sid))
        return sub

    def _publish_submissions(self) -> None:
        by_state = dict.fromkeys((INTENT, AMBIGUOUS, SUBMITTED, MIGRATING), 0)
        in_flight = 0
        for sub in self._subs.values():
            by_state[sub.state] += 1
            if sub.state in (SUBMITTED, MIGRATING):
                in_flight += len(sub.regions)
        for state, n in by_state.items():
            self.metrics.submissions.labels(state=state).set(n)
        self.metrics.inflight.set(in_flight)

    def _new_request_id(self) -> str:
        # Unique across leaders and lives (a term alone can repeat if a store is lost): an idempotency
        # key that two decisions share would make RegionMigration answer one with the other.
        return f"{self.leader_term}-{uuid.uuid4().hex}"

    # ------------------------------------------------------------ failover results

    def _on_selection(self, ev: SelectionDone, now: int) -> None:
        job = ev.job
        current = self._selecting.get(job.datanode_id)
        if current is not None and current.job_id == job.job_id:
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
        if current is None or current.job_id != job.job_id:
            # Asked under an earlier leadership (or superseded): its guards are not this one's.
            m.failover_skipped.labels(reason="stale_selection").inc(len(job.region_ids))
            return
        # What held failover at the tick holds it at the answer too: maintenance switched on, or a
        # guard raised, while the Selector was thinking stops the submission (README: "nothing").
        pause = "local_pause" if self.guards is not None and self.guards.stall_detected(now) else None
        held = self._holds(now, {}, pause)
        if not held and job.datanode_id in self.datanode_maintenance:
            held = ("maintenance_datanode",)
        if held:
            m.failover_skipped.labels(reason=held[0]).inc(len(job.region_ids))
            self._hold_log(now, f"failover_held_{held[0]}", failed_regions=len(job.region_ids), datanodes=1,
                           **self._hold_details(held[0]))
            return
        wanted = len(job.region_ids)
        if len(ev.peers) < wanted:
            m.failover_errors.labels(stage="insufficient_peers").inc()
            log_event(
                log, logging.ERROR, "failover_insufficient_peers", datanode_id=job.datanode_id,
                wanted=wanted, got=len(ev.peers),
            )
            return
        peers = ev.peers[:wanted]
        lookup = ev.from_peer
        if lookup is not None and (lookup.id != job.datanode_id or len(lookup.addr) > MAX_PEER_ADDR_LEN):
            m.failover_errors.labels(stage="invalid_lookup").inc()
            self._hold_log(now, "failover_lookup_answer_invalid", datanode_id=job.datanode_id, peer_id=lookup.id,
                           addr_len=len(lookup.addr), retry="next tick")
            return
        invalid = self._invalid_answer(job, peers)
        if invalid is not None:
            reason, peer = invalid
            m.failover_errors.labels(stage="invalid_selection").inc()
            m.selector_invalid.labels(reason=reason).inc()
            self._hold_log(now, "failover_selector_answer_invalid", key=f"selector_invalid/{reason}",
                           datanode_id=job.datanode_id, reason=reason, peer_id=peer.id, peer_addr=peer.addr[:200],
                           peers=len(peers), retry="next tick")
            return
        from_peer = ev.from_peer or Peer(job.datanode_id)
        # Re-check at answer time: a region that heartbeat meanwhile, or was deregistered, is not moved.
        phis = self.table.phis(job.datanode_id, as_region_array(job.region_ids), now)
        by_target: dict[Peer, list[int]] = {}
        recovered = same_peer = 0
        for region_id, to_peer in zip(job.region_ids, peers):
            phi = phis.get(region_id)
            if phi is None or phi < self.opts.threshold or region_id in self._region_sub:
                recovered += 1
                continue
            if to_peer.id == from_peer.id:
                same_peer += 1
                continue
            by_target.setdefault(to_peer, []).append(region_id)
        if recovered:
            m.failover_skipped.labels(reason="recovered").inc(recovered)
        if same_peer:
            m.failover_skipped.labels(reason="same_peer").inc(same_peer)
            log_event(log, logging.WARNING, "failover_same_peer_skipped", datanode_id=job.datanode_id,
                      regions=same_peer)
        if self.guards is not None:
            by_target = self._limit_targets(by_target, now)
            if by_target:
                self.guards.note_failover(job.datanode_id, now)
        p = self.policy
        for to_peer, regions in by_target.items():
            # The count grows when a migration is accepted; this one is the next.
            count = 1 + max(self.failover_counts.get((job.datanode_id, r), 0) for r in regions)
            task = MigrationTask(
                task_id=self._new_id(),
                datanode_id=job.datanode_id,
                from_peer=from_peer,
                to_peer=to_peer,
                region_ids=tuple(regions),
                timeout_ms=min(p.base_timeout_ms * count, max(p.max_failover_timeout_ms, p.base_timeout_ms)),
                leader_term=self.leader_term,
                request_id=self._new_request_id(),
            )
            sub = _Submission(task.request_id, task, INTENT, sending=True)
            self._subs[sub.sid] = sub
            for region_id in regions:
                self._region_sub[region_id] = sub.sid
            # The intent is stored before the call leaves (the runtime sends it once this is
            # durable): a successor that finds it sends the same request to the same target, so the
            # regions go to one place whatever happens to this leader or to the call. One key per
            # submission, whatever the number of regions: the step is one small write.
            self.changes.append(InFlightSet(sub.sid, sub.record()))
            self.outbox.append(SubmitMigration(task))
            log_event(
                log, logging.WARNING, "failover_submitting", datanode_id=job.datanode_id,
                from_peer=from_peer.id, to_peer=to_peer.id, regions=len(regions),
                timeout_ms=task.timeout_ms, request_id=task.request_id, sample=_sample(regions),
            )
        self._publish_submissions()

    def _invalid_answer(self, job: SelectJob, peers: tuple[Peer, ...]) -> tuple[str, Peer] | None:
        """Why the Selector's answer cannot be used (and the peer that shows it), or None.

        A target equal to the failed datanode is not invalid: it is skipped (DESIGN.md section 4).
        """
        excluded = set(job.exclude_targets) - {job.datanode_id}
        addrs: dict[int, str] = {}
        for peer in peers:
            if peer.id == 0:
                return "zero_id", peer
            if len(peer.addr) > MAX_PEER_ADDR_LEN:  # it would be stored in the decision's record
                return "address_too_long", peer
            if peer.id == job.datanode_id:
                continue
            if self.policy.require_target_addr and not peer.addr:
                return "no_address", peer
            if addrs.setdefault(peer.id, peer.addr) != peer.addr:
                return "conflicting_address", peer
            if peer.id in excluded:
                return "excluded_peer", peer
        return None

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

    def _retry_delay(self, attempts: int) -> int:
        p = self.policy
        return min(p.submit_retry_backoff_ms * 2 ** min(max(attempts - 1, 0), 30), p.submit_retry_backoff_max_ms)

    def _on_submission(self, ev: SubmissionDone, now: int) -> None:
        task = ev.task
        sub = self._subs.get(task.request_id)
        if sub is None or not sub.sending or sub.task.task_id != task.task_id:
            # An answer to an attempt no longer current (an earlier leadership of this replica):
            # the decision, if still open, is resolved by its own next attempt (same request_id).
            log_event(log, logging.INFO, "failover_submit_answer_ignored", datanode_id=task.datanode_id,
                      request_id=task.request_id, task_id=task.task_id)
            return
        sub.sending = False
        m = self.metrics
        d = task.datanode_id
        if ev.error is not None or ev.result is None:
            self._on_submit_error(sub, ev, now)
            self._publish_submissions()
            return
        result = ev.result
        asked = set(task.region_ids)
        categories: dict[int, list[str]] = {}
        for category in DONE_CATEGORIES + KEPT_CATEGORIES:
            for region_id in getattr(result, category):
                if region_id in asked and category not in categories.setdefault(region_id, []):
                    categories[region_id].append(category)
        procedure_id = result.procedure_id
        polled: list[int] = []  # in flight under the procedure
        migrating: list[int] = []  # in flight until the timeout (nothing of ours to poll)
        done: list[int] = []
        contradictory: list[int] = []
        conflicted: list[int] = []
        for region_id in task.region_ids:
            cats = categories.get(region_id)
            if not cats:
                # An answer that does not mention a region is no word that it was not moved (a
                # service may have started it all the same): in flight, like a contradictory one.
                (polled if procedure_id else migrating).append(region_id)
                continue
            if len(cats) > 1:
                # Two answers for one region: the service may be moving it; never drop it (or its
                # procedure id) on the word of one category.
                contradictory.append(region_id)
                (polled if procedure_id else migrating).append(region_id)
                continue
            category = cats[0]
            m.failover_regions.labels(result=category).inc()
            if category in DONE_CATEGORIES:
                done.append(region_id)
            elif category == "submitted" and procedure_id:
                polled.append(region_id)
            elif category in ("submitted", "migrating"):
                migrating.append(region_id)
            else:  # peer_conflict: not accepted; failed over again later (a new decision), backed off
                conflicted.append(region_id)
        if contradictory:
            m.failover_regions.labels(result="contradictory").inc(len(contradictory))
            log_event(log, logging.ERROR, "failover_result_contradictory", datanode_id=d, regions=len(contradictory),
                      sample=_sample(contradictory), procedure_id=procedure_id,
                      categories=",".join(sorted({c for r in contradictory for c in categories[r]})),
                      kept="polled under the procedure" if procedure_id else "in flight until the timeout")
        if done:
            self._deregister(d, as_region_array(done))
        if conflicted:
            self._back_off_resubmission(d, conflicted, "peer_conflict", now, procedure_id)
        # The step's record: the submission becomes its in-flight part, or ends. Counts of the
        # accepted regions go in the same write.
        self._subs.pop(sub.sid)
        for region_id in task.region_ids:
            if self._region_sub.get(region_id) == sub.sid:
                del self._region_sub[region_id]
        parts = [(sub.sid, SUBMITTED, polled, procedure_id), (sub.sid + ".m", MIGRATING, migrating, "")]
        if not polled:
            parts = [(sub.sid, MIGRATING, migrating, "")]
        kept_main = False
        for sid, state, regions, pid in parts:
            if not regions:
                continue
            kept_main |= sid == sub.sid
            flight = _Submission(sid, dataclasses.replace(task, region_ids=tuple(regions)), state, pid,
                                 sub.attempts, deadline_ms=now + task.timeout_ms, mark=self._mark(now))
            self._subs[sid] = flight
            for region_id in regions:
                self._region_sub[region_id] = sid
            self.changes.append(InFlightSet(sid, flight.record()))
            if pid:
                proc = self._procedures.setdefault(pid, _Procedure())
                proc.sids.add(sid)
                proc.next_poll_ms = now + self.policy.status_poll_interval_ms
        if not kept_main:
            self.changes.append(InFlightDrop(sub.sid))
        accepted = [r for r in polled + migrating if r in categories]  # an unanswered region is held, not counted
        if accepted:
            counts = []
            for region_id in accepted:
                key = (d, region_id)
                self.failover_counts[key] = self.failover_counts.get(key, 0) + 1
                self._count_touched[key] = now
                counts.append((key, self.failover_counts[key]))
            self.changes.append(CountsSet(tuple(counts)))
        unanswered = asked - categories.keys()
        if unanswered:
            m.failover_regions.labels(result="unanswered").inc(len(unanswered))
            log_event(log, logging.ERROR, "failover_regions_unanswered", datanode_id=d,
                      regions=len(unanswered), sample=_sample(sorted(unanswered)),
                      kept="polled under the procedure" if procedure_id else "in flight until the timeout")
        log_event(
            log, logging.WARNING, "failover_submitted", datanode_id=d, to_peer=task.to_peer.id,
            procedure_id=procedure_id, request_id=task.request_id,
            **{c: len(getattr(result, c)) for c in DONE_CATEGORIES + KEPT_CATEGORIES if getattr(result, c)},
        )
        self._publish_submissions()

    def _on_submit_error(self, sub: _Submission, ev: SubmissionDone, now: int) -> None:
        """A failed call. Refused: the decision ends (the regions may be failed over afresh). Not sent:
        sent again later. Ambiguous: it may have been carried out, so the regions stay held and the
        same request goes to the same target again, backed off, until a definite answer."""
        task = sub.task
        m = self.metrics
        m.failover_errors.labels(stage="submit").inc()
        fields = dict(datanode_id=task.datanode_id, to_peer=task.to_peer.id, regions=len(task.region_ids),
                      request_id=task.request_id, error=ev.error)
        if ev.error_kind == SUBMIT_REFUSED:
            m.failover_regions.labels(result="call_refused").inc(len(task.region_ids))
            self._end_submission(sub.sid)
            log_event(log, logging.ERROR, "failover_submit_refused", **fields)
            self._back_off_resubmission(task.datanode_id, task.region_ids, "refused", now)
            return
        sub.attempts += 1
        sub.retry_at_ms = now + self._retry_delay(sub.attempts)
        if ev.error_kind == SUBMIT_NOT_SENT:
            sub.rewrite = True  # its intent may not be durable: written again before the next call
            log_event(log, logging.WARNING, "failover_submit_not_sent", retry_in_ms=sub.retry_at_ms - now, **fields)
            return
        m.failover_regions.labels(result="call_failed").inc(len(task.region_ids))
        if sub.state == INTENT:
            sub.state = AMBIGUOUS  # a successor then knows the call may have been carried out
            self.changes.append(InFlightSet(sub.sid, sub.record()))
        log_event(log, logging.ERROR, "failover_submit_ambiguous", attempts=sub.attempts,
                  retry_in_ms=sub.retry_at_ms - now, **fields)

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
        ended = [self._end_submission(sid) for sid in sorted(proc.sids)]
        self._procedures.pop(ev.procedure_id, None)
        regions = sum(len(sub.regions) for sub in ended)
        for sub in ended:
            d = sub.task.datanode_id
            if state is MigrationState.SUCCEEDED:
                # The regions live elsewhere now: the old detectors would only fire again.
                self._deregister(d, as_region_array(list(sub.regions)))
            elif state is MigrationState.NOT_FOUND:
                self.metrics.migration_not_found.inc(len(sub.regions))
                self._back_off_resubmission(d, sub.regions, "not_found", now, sub.procedure_id)
            else:
                self._back_off_resubmission(d, sub.regions, state.name.lower(), now, sub.procedure_id)
        log_event(
            log,
            logging.INFO if state is MigrationState.SUCCEEDED else logging.WARNING,
            "migration_finished",
            procedure_id=ev.procedure_id,
            state=state.name,
            regions=regions,
            message=ev.message,
        )
        self._publish_submissions()

    def _back_off_resubmission(self, datanode_id: int, regions, why: str, now: int, procedure_id: str = "") -> None:
        """A decision ended without moving these regions (the procedure unknown or FAILED, the call
        refused, a peer_conflict): they are failed over again, but each no sooner than a backoff that
        doubles per such end, and at most `max_resubmissions_per_window` times per window, so that a
        RegionMigration that keeps saying no does not get a new migration, to a new target, every tick."""
        p = self.policy
        until_max = now
        for region_id in regions:
            times = self._unsettled.setdefault(region_id, deque())
            while times and times[0] <= now - p.resubmit_window_ms:
                times.popleft()
            times.append(now)
            if len(times) > p.max_resubmissions_per_window:
                until = times[0] + p.resubmit_window_ms
            else:
                until = now + min(p.resubmit_backoff_ms * 2 ** (len(times) - 1), p.resubmit_backoff_max_ms)
            self._resubmit_at[region_id] = until
            until_max = max(until_max, until)
        event = "migration_not_found" if why == "not_found" else "failover_resubmission_backed_off"
        log_event(log, logging.WARNING, event, datanode_id=datanode_id, reason=why, procedure_id=procedure_id,
                  regions=len(regions), sample=_sample(list(regions)), resubmit_after_ms=until_max - now)

    # ------------------------------------------------------------ dump

    def _snapshot(self, datanode_ids: frozenset[int] | None, now: int) -> DumpSnapshot:
        wanted = None if datanode_ids is None else set(datanode_ids)
        counts = {
            k: v for k, v in self.failover_counts.items() if wanted is None or k[0] in wanted
        }
        return DumpSnapshot(
            nodes=self.table.snapshot(wanted),
            failover_counts=counts,
            migrating=frozenset(self._region_sub),
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
