"""The watched regions and their failover counts (docs/design.md §4).

Register, Reset and Deregister change the detector table; every change of who is watched is
also handed to the store (RegistryAdd, RegistryRemove), so that a successor watches the same
regions. A region's failover count grows when a migration of it is accepted, sets the next
migration's timeout, and decays after `failover_count_decay_ms` healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from supervisor_service.core.backoff import ResubmitBackoff
from supervisor_service.core.changes import CountsDrop, CountsSet, RegistryAdd, RegistryRemove
from supervisor_service.core.logs import log_event
from supervisor_service.core.options import FailoverPolicy
from supervisor_service.core.outbox import Outbox
from supervisor_service.core.table import DetectorTable, as_region_array
from supervisor_service.core.types import DetectingRegion, RegionArray

log = logging.getLogger("supervisor_service.supervisor")

# The decay of failover counts is looked at no more often than this (it walks every count).
_DECAY_CHECK_INTERVAL_MS = 10_000


class Registry:
    """Who is watched (the table) and how often each region was failed over."""

    def __init__(self, table: DetectorTable, policy: FailoverPolicy, out: Outbox, backoff: ResubmitBackoff) -> None:
        self.table = table
        self._policy = policy
        self._out = out
        self._backoff = backoff
        self.failover_counts: dict[DetectingRegion, int] = {}
        self._count_touched: dict[DetectingRegion, int] = {}  # region -> its count's last change (or check)
        self._last_decay_ms = -(10**18)

    # ------------------------------------------------------------ who is watched

    def heartbeat(self, datanode_id: int, region_ids: RegionArray, ts: int, create: bool) -> int:
        created = self.table.heartbeat(datanode_id, region_ids, ts, create=create)
        if created.size:
            self._out.changes.append(RegistryAdd(datanode_id, created))
        return int(created.size)

    def register(self, regions: tuple[DetectingRegion, ...], now: int) -> int:
        return self._for_each_datanode(regions, self._register, now)

    def reset(self, regions: tuple[DetectingRegion, ...], now: int) -> int:
        return self._for_each_datanode(regions, self._reset, now)

    def deregister(self, regions: tuple[DetectingRegion, ...], now: int) -> int:
        return self._for_each_datanode(regions, lambda d, r, _: self.drop(d, r), now)

    def drop(self, datanode_id: int, region_ids: RegionArray) -> int:
        """Stop watching the regions (deregistered, or moved elsewhere): their detectors, failover
        counts and resubmission back-off go. Returns how many detectors existed."""
        dropped = []
        for region_id in region_ids.tolist():
            key = (datanode_id, region_id)
            self._count_touched.pop(key, None)
            self._backoff.forget(region_id)
            if self.failover_counts.pop(key, None) is not None:
                dropped.append(key)
        if dropped:
            self._out.changes.append(CountsDrop(tuple(dropped)))
        self._out.changes.append(RegistryRemove(datanode_id, region_ids))
        return self.table.deregister(datanode_id, region_ids)

    def watch_target(self, source_id: int, target_id: int, region_ids: Iterable[int], now: int) -> None:
        """A migration of the regions to `target_id` succeeded: watch them there from a fresh heartbeat
        at `now`, whether a detector exists (it may be stale) or not (the target may die before its
        first heartbeat carrying them)."""
        if target_id and target_id != source_id:
            self._reset(target_id, as_region_array(list(region_ids)), now)

    def drop_candidate(self, source_id: int, target_id: int, region_ids: Iterable[int]) -> None:
        """A migration of the regions to `target_id` failed: any detector made for them there (the
        candidate reported them while it was being moved) goes, with its count; the regions' own
        back-off, which is the source's, stays."""
        if not target_id or target_id == source_id:
            return
        ids = as_region_array(list(region_ids))
        keys = tuple((target_id, r) for r in ids.tolist() if self.failover_counts.pop((target_id, r), None) is not None)
        for key in keys:
            self._count_touched.pop(key, None)
        if keys:
            self._out.changes.append(CountsDrop(keys))
        if self.table.deregister(target_id, ids):
            self._out.changes.append(RegistryRemove(target_id, ids))

    def _register(self, datanode_id: int, region_ids: RegionArray, now: int) -> int:
        self._out.changes.append(RegistryAdd(datanode_id, region_ids))
        return self.table.register(datanode_id, region_ids, now)

    def _reset(self, datanode_id: int, region_ids: RegionArray, now: int) -> int:
        self._out.changes.append(RegistryAdd(datanode_id, region_ids))
        return self.table.reset(datanode_id, region_ids, now)

    @staticmethod
    def _for_each_datanode(
        regions: tuple[DetectingRegion, ...], apply: Callable[[int, RegionArray, int], int], now: int
    ) -> int:
        grouped: dict[int, list[int]] = {}
        for datanode_id, region_id in regions:
            grouped.setdefault(datanode_id, []).append(region_id)
        return sum(apply(d, as_region_array(r), now) for d, r in grouped.items())

    def load(self, registry: dict[int, RegionArray], counts: dict[DetectingRegion, int], now: int) -> None:
        """A leader's recovery: every stored region is watched from a heartbeat at `now`, and its count
        decays from then on."""
        for datanode_id, region_ids in registry.items():
            self.table.register(datanode_id, region_ids, now)
        self.failover_counts = dict(counts)
        self._count_touched = dict.fromkeys(self.failover_counts, now)

    # ------------------------------------------------------------ failover counts

    def next_count(self, datanode_id: int, region_ids: Iterable[int]) -> int:
        """The count the regions' next failover has (the highest of them, plus one)."""
        return 1 + max(self.failover_counts.get((datanode_id, r), 0) for r in region_ids)

    def count_accepted(self, datanode_id: int, region_ids: list[int], now: int) -> None:
        """A migration of these regions was accepted: their counts grow (in the same write as the step)."""
        counts = []
        for region_id in region_ids:
            key = (datanode_id, region_id)
            self.failover_counts[key] = self.failover_counts.get(key, 0) + 1
            self._count_touched[key] = now
            counts.append((key, self.failover_counts[key]))
        self._out.changes.append(CountsSet(tuple(counts)))

    def decay_counts(self, now: int) -> None:
        """Failover counts of regions healthy for `failover_count_decay_ms` are forgotten."""
        decay = self._policy.failover_count_decay_ms
        if decay <= 0 or now - self._last_decay_ms < _DECAY_CHECK_INTERVAL_MS:
            return
        self._last_decay_ms = now
        stale = [k for k, t in self._count_touched.items() if now - t >= decay]
        dropped = []
        threshold = self.table.opts.threshold
        for key in stale:
            phi = self.table.phis(key[0], as_region_array([key[1]]), now).get(key[1])
            if phi is not None and phi >= threshold:
                self._count_touched[key] = now  # still failed: the healthy period starts later
                continue
            del self._count_touched[key]
            if self.failover_counts.pop(key, None) is not None:
                dropped.append(key)
        if dropped:
            self._out.changes.append(CountsDrop(tuple(dropped)))
            log_event(log, logging.INFO, "failover_counts_decayed", regions=len(dropped))

