"""The Selector's answer: checked, re-checked against now, turned into migration tasks (docs/design.md §4, §5).

What held failover at the tick holds it at the answer too; an answer that cannot be used
(a zero id, a conflicting address, an excluded peer...) is refused whole and asked again at
the next tick; a region that heartbeat meanwhile is not moved; a target's budget limits the
regions it gets. The regions left become one task per target, handed to `Migrations`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from supervisor_service.core.events import SelectionDone
from supervisor_service.core.guards import Guards
from supervisor_service.core.holds import HoldLog, Holds
from supervisor_service.core.ids import Ids
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.leadership import LeaderState
from supervisor_service.core.logs import log_event
from supervisor_service.core.maintenance import Maintenance
from supervisor_service.core.migrations import Migrations
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.ports import CoreMetrics
from supervisor_service.core.registry import Registry
from supervisor_service.core.table import as_region_array
from supervisor_service.core.types import MigrationTask, Peer, SelectJob

log = logging.getLogger("supervisor_service.supervisor")

# Longest peer address taken from a remote answer (host:port is far shorter; a longer one is garbage).
MAX_PEER_ADDR_LEN = 512


class TargetSelection:
    """SelectionDone: from the Selector's peers to the migration tasks of one datanode."""

    def __init__(
        self,
        policy: FailoverPolicy,
        metrics: CoreMetrics,
        registry: Registry,
        maintenance: Maintenance,
        holds: Holds,
        guards: Guards | None,
        inflight: InFlight,
        migrations: Migrations,
        leadership: LeaderState,
        ids: Ids,
        held_log: HoldLog,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._registry = registry
        self._table = registry.table
        self._maintenance = maintenance
        self._holds = holds
        self._guards = guards
        self._inflight = inflight
        self._migrations = migrations
        self._leadership = leadership
        self._ids = ids
        self._held_log = held_log
        self.on_decision: Callable[[SelectionDone, dict[int, int], list[MigrationTask], int], None] | None = None
        """Called with each decision before it is submitted (the answer, regions wanted per target, tasks, now)."""

    def failed(self, ev: SelectionDone) -> None:
        """PeerLookup or Selector failed (or the job's state could not be stored): asked again next tick."""
        stage = ev.error_stage or "select"
        self._metrics.failover_errors.labels(stage=stage).inc()
        log_event(log, logging.ERROR, "failover_select_failed", datanode_id=ev.job.datanode_id, stage=stage,
                  error=ev.error)

    def answer(self, ev: SelectionDone, current: bool, now: int) -> None:
        """A leader's answer to the job asked for at a tick (`current`: not superseded since)."""
        job = ev.job
        m = self._metrics
        if not current:
            # Asked under an earlier leadership (or superseded): its guards are not this one's.
            m.failover_skipped.labels(reason="stale_selection").inc(len(job.region_ids))
            return
        # What held failover at the tick holds it at the answer too: maintenance switched on, or a
        # guard raised, while the Selector was thinking stops the submission (README: "nothing").
        guards = self._guards
        pause = None
        if guards is not None:
            if guards.local_pause_held(now):
                pause = "local_pause"
            elif guards.overload_held(now):
                pause = "overload"
        held = self._holds.compute(now, pause)
        if not held and job.datanode_id in self._maintenance.datanodes:
            held = ("maintenance_datanode",)
        if held:
            m.failover_skipped.labels(reason=held[0]).inc(len(job.region_ids))
            self._held_log(now, f"failover_held_{held[0]}", failed_regions=len(job.region_ids), datanodes=1,
                           **self._holds.details(held[0], now))
            return
        wanted = len(job.region_ids)
        if len(ev.peers) < wanted:
            m.failover_errors.labels(stage="insufficient_peers").inc()
            log_event(log, logging.ERROR, "failover_insufficient_peers", datanode_id=job.datanode_id,
                      wanted=wanted, got=len(ev.peers))
            return
        peers = ev.peers[:wanted]
        lookup = ev.from_peer
        if lookup is not None and (lookup.id != job.datanode_id or len(lookup.addr) > MAX_PEER_ADDR_LEN):
            m.failover_errors.labels(stage="invalid_lookup").inc()
            self._held_log(now, "failover_lookup_answer_invalid", datanode_id=job.datanode_id, peer_id=lookup.id,
                           addr_len=len(lookup.addr), retry="next tick")
            return
        invalid = self.invalid_answer(job, peers)
        if invalid is not None:
            reason, peer = invalid
            m.failover_errors.labels(stage="invalid_selection").inc()
            m.selector_invalid.labels(reason=reason).inc()
            self._held_log.keyed(now, f"selector_invalid/{reason}", "failover_selector_answer_invalid",
                                 datanode_id=job.datanode_id, reason=reason, peer_id=peer.id,
                                 peer_addr=peer.addr[:200], peers=len(peers), retry="next tick")
            return
        from_peer = ev.from_peer or Peer(job.datanode_id)
        by_target = self._by_target(job, from_peer, peers, now)
        per_target = {p.id: len(r) for p, r in by_target.items()}
        guards = self._guards
        if guards is not None:
            by_target = self.limit_targets(guards, by_target, now)
            if by_target:
                guards.note_failover(job.datanode_id, now)
        tasks = [self._task(job.datanode_id, from_peer, to_peer, regions) for to_peer, regions in by_target.items()]
        if self.on_decision is not None and tasks:  # the failover history (core/insight.py)
            self.on_decision(ev, per_target, tasks, now)
        self._migrations.submit(tasks)

    def _by_target(self, job: SelectJob, from_peer: Peer, peers: tuple[Peer, ...], now: int) -> dict[Peer, list[int]]:
        """The regions still to move, by target. Re-checked at answer time: a region that heartbeat
        meanwhile, or was deregistered, or is held by a submission, is not moved."""
        m = self._metrics
        phis = self._table.phis(job.datanode_id, as_region_array(job.region_ids), now)
        threshold = self._table.opts.threshold
        by_target: dict[Peer, list[int]] = {}
        recovered = same_peer = 0
        for region_id, to_peer in zip(job.region_ids, peers):
            phi = phis.get(region_id)
            if phi is None or phi < threshold or self._inflight.holds(region_id):
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
        return by_target

    def _task(self, datanode_id: int, from_peer: Peer, to_peer: Peer, regions: list[int]) -> MigrationTask:
        p = self._policy
        # The count grows when a migration is accepted; this one is the next.
        count = self._registry.next_count(datanode_id, regions)
        return MigrationTask(
            task_id=self._ids.next(),
            datanode_id=datanode_id,
            from_peer=from_peer,
            to_peer=to_peer,
            region_ids=tuple(regions),
            timeout_ms=p.failover_timeout_ms(count),
            leader_term=self._leadership.term,
            request_id=self._ids.request_id(self._leadership.term),
        )

    def invalid_answer(self, job: SelectJob, peers: tuple[Peer, ...]) -> tuple[str, Peer] | None:
        """Why the Selector's answer cannot be used (and the peer that shows it), or None.

        A target equal to the failed datanode is not invalid: it is skipped (docs/design.md §4).
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
            if self._policy.require_target_addr and not peer.addr:
                return "no_address", peer
            if addrs.setdefault(peer.id, peer.addr) != peer.addr:
                return "conflicting_address", peer
            if peer.id in excluded:
                return "excluded_peer", peer
        return None

    def limit_targets(self, guards: Guards, by_target: dict[Peer, list[int]], now: int) -> dict[Peer, list[int]]:
        """Per-target budget: regions beyond it wait for a later tick (they are still failed then)."""
        allowed = {}
        for to_peer, regions in by_target.items():
            granted = guards.take_target(to_peer.id, len(regions), now)
            if granted < len(regions):
                self._metrics.failover_skipped.labels(reason="rate_limited_target").inc(len(regions) - granted)
                self._held_log(now, "failover_target_rate_limited", to_peer=to_peer.id,
                               granted=granted, wanted=len(regions))
            if granted:
                allowed[to_peer] = regions[:granted]
        return allowed
