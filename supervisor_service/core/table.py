"""The detector table: every (datanode, region) detector, owned by the supervisor thread.

Why it is not a dict of detector objects: a datanode heartbeats all its regions
with one timestamp, so the detectors of regions that joined it together have
identical state (interval window and last heartbeat). The table keeps one
*history group* per distinct state and, per datanode, a sorted array of region
ids with the group each one points to. A heartbeat that names exactly the
regions of a single-group datanode (the steady state) costs one array compare
and one window update, whatever the number of regions. When a heartbeat names
only some members of a group, the named ones are split off into a copy;
groups whose states become identical again (once the divergent samples slide
out of the window) are merged back.

A group's state evolves exactly as the scalar reference detector
(`core.detector`): the same integer sums and the same `phi_from`,
so phi agrees bit for bit. The table is not thread-safe by design: only the
supervisor thread touches it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from supervisor_service.core.detector import PhiAccrualOptions, phi_from, stats_from_sums
from supervisor_service.core.types import RegionArray

GroupIds = npt.NDArray[np.int64]
"""Per region of a datanode (parallel to its sorted region ids), the id of its history group."""
Positions = npt.NDArray[np.intp]
"""Indexes into a datanode's sorted region ids."""

_EMPTY_U64: RegionArray = np.empty(0, dtype=np.uint64)
_EMPTY_I64: GroupIds = np.empty(0, dtype=np.int64)


class _Group:
    """The shared detector state of some regions of one datanode."""

    __slots__ = ("size", "intervals", "total", "total_sq", "last", "mean", "std")

    def __init__(self, size: int) -> None:
        self.size = size
        self.intervals: deque[int] = deque()
        self.total = 0
        self.total_sq = 0
        self.last = 0
        self.mean = 0.0  # mean interval + acceptable pause (what phi uses)
        self.std = 0.0  # floored standard deviation (what phi uses)

    @classmethod
    def fresh(cls, size: int, ts: int, opts: PhiAccrualOptions) -> _Group:
        grp = cls(size)
        for seed in opts.seed_intervals():
            grp._append(seed, opts.max_sample_size)
        grp.last = ts
        grp._refresh(opts)
        return grp

    def clone(self, size: int) -> _Group:
        grp = _Group(size)
        grp.intervals = self.intervals.copy()
        grp.total, grp.total_sq, grp.last = self.total, self.total_sq, self.last
        grp.mean, grp.std = self.mean, self.std
        return grp

    def _append(self, interval: int, cap: int) -> None:
        if len(self.intervals) >= cap:
            old = self.intervals.popleft()
            self.total -= old
            self.total_sq -= old * old
        self.intervals.append(interval)
        self.total += interval
        self.total_sq += interval * interval

    def _refresh(self, opts: PhiAccrualOptions) -> None:
        self.mean, self.std = stats_from_sums(len(self.intervals), self.total, self.total_sq, opts)

    def phi(self, ts: int) -> float:
        return phi_from(ts - self.last, self.mean, self.std)

    def heartbeat(self, ts: int, opts: PhiAccrualOptions) -> None:
        """The reference `heartbeat` for a group that already had one (callers skip ts < last)."""
        if self.phi(ts) < opts.threshold:
            self._append(ts - self.last, opts.max_sample_size)
            self._refresh(opts)
        self.last = ts

    def same_state(self, other: _Group) -> bool:
        return (
            self.last == other.last
            and self.total == other.total
            and self.total_sq == other.total_sq
            and self.intervals == other.intervals
        )

    def observed(self) -> tuple[int, float, float]:
        """(samples, observed mean interval, observed population std), without pause or floor."""
        n = len(self.intervals)
        mean = self.total / n
        return n, mean, math.sqrt((n * self.total_sq - self.total * self.total) / (n * n))


class _Node:
    """The detectors of one datanode: sorted region ids and the group of each."""

    __slots__ = ("regions", "gids", "groups", "next_gid")

    def __init__(self) -> None:
        self.regions: RegionArray = _EMPTY_U64
        self.gids: GroupIds = _EMPTY_I64
        self.groups: dict[int, _Group] = {}
        self.next_gid = 0

    def add_group(self, grp: _Group) -> int:
        gid = self.next_gid
        self.next_gid += 1
        self.groups[gid] = grp
        return gid

    def locate(self, region_ids: RegionArray) -> tuple[Positions, npt.NDArray[np.bool_]]:
        """Positions in `regions` of the sorted ids, and a mask of which are present."""
        pos = np.searchsorted(self.regions, region_ids)
        if self.regions.size == 0:
            return pos, np.zeros(region_ids.size, dtype=bool)
        present = self.regions[np.minimum(pos, self.regions.size - 1)] == region_ids
        return pos, present

    def insert_fresh(self, pos: Positions, region_ids: RegionArray, ts: int, opts: PhiAccrualOptions) -> int:
        """Insert absent regions (sorted, with their insertion positions) as one fresh group."""
        gid = self.add_group(_Group.fresh(int(region_ids.size), ts, opts))
        self.regions = np.insert(self.regions, pos, region_ids)
        self.gids = np.insert(self.gids, pos, gid)
        return gid

    def remove_at(self, idx: Positions) -> None:
        gids, counts = np.unique(self.gids[idx], return_counts=True)
        for gid, count in zip(gids.tolist(), counts.tolist()):
            grp = self.groups[gid]
            grp.size -= count
            if grp.size == 0:
                del self.groups[gid]
        self.regions = np.delete(self.regions, idx)
        self.gids = np.delete(self.gids, idx)

    def merge_identical(self, ts: int) -> None:
        """Fold groups whose state became identical (all of them heartbeat at `ts`)."""
        candidates = [(gid, grp) for gid, grp in self.groups.items() if grp.last == ts]
        if len(candidates) < 2:
            return
        for i, (gid, grp) in enumerate(candidates):
            if gid not in self.groups:
                continue
            for other_gid, other in candidates[i + 1 :]:
                if other_gid in self.groups and grp.same_state(other):
                    self.gids[self.gids == other_gid] = gid
                    grp.size += other.size
                    del self.groups[other_gid]


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """Immutable copy of one group's state, enough to compute phi and the Dump columns."""

    last: int
    mean: float  # what phi uses: observed mean + acceptable pause
    std: float  # what phi uses: floored std
    samples: int
    observed_mean: float
    observed_std: float

    def phi(self, ts: int) -> float:
        return phi_from(ts - self.last, self.mean, self.std)


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    datanode_id: int
    regions: RegionArray  # sorted, a copy
    gids: GroupIds  # parallel to regions, a copy
    groups: dict[int, GroupSnapshot]


def as_region_array(region_ids: object) -> RegionArray:
    """Sorted, de-duplicated uint64 array of region ids.

    Datanodes send their region ids sorted and unique, so that case is checked
    first (one vectorized compare, ~2 us for 1,000 ids) and `np.unique` (a sort,
    ~60 us) runs only on input that needs it. An input that already is a sorted
    unique uint64 array is returned as is, not copied.
    """
    arr = np.asarray(region_ids, dtype=np.uint64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size > 1 and not (arr[1:] > arr[:-1]).all():
        return np.unique(arr)
    return arr


def _same_regions(a: RegionArray, b: RegionArray) -> bool:
    """`np.array_equal` for two uint64 region arrays, without its overhead (the steady-state check)."""
    if a.size != b.size:
        return False
    if a.dtype == b.dtype:
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


SILENT_INTERVALS = 1.5
"""A datanode is never silent before this many of its mean heartbeat intervals have passed."""


class DetectorTable:
    """All detectors, grouped by datanode and shared history. Supervisor thread only."""

    def __init__(self, opts: PhiAccrualOptions) -> None:
        self.opts = opts
        self._nodes: dict[int, _Node] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def group_count(self) -> int:
        return sum(len(node.groups) for node in self._nodes.values())

    def datanode_ids(self) -> list[int]:
        return list(self._nodes)

    def clear(self) -> None:
        self._nodes.clear()
        self._count = 0

    # ------------------------------------------------------------ updates

    def heartbeat(self, datanode_id: int, region_ids: RegionArray, ts: int, create: bool = True) -> RegionArray:
        """Apply one heartbeat of `datanode_id` naming the sorted unique `region_ids` at `ts`.

        Creates missing detectors (unless `create` is false: then only the existing ones are
        refreshed). Returns the region ids created (usually none).
        """
        ts = int(ts)
        node = self._nodes.get(datanode_id)
        if node is None:
            if not create:
                return _EMPTY_U64
            node = self._nodes[datanode_id] = _Node()
        # Steady state: one group, the same region set as last time.
        if len(node.groups) == 1 and _same_regions(node.regions, region_ids):
            grp = next(iter(node.groups.values()))
            if ts >= grp.last:
                grp.heartbeat(ts, self.opts)
            return _EMPTY_U64
        pos, present = node.locate(region_ids)
        hit = pos[present]
        if hit.size:
            hit_gids = node.gids[hit]
            gids, counts = np.unique(hit_gids, return_counts=True)
            for gid, count in zip(gids.tolist(), counts.tolist()):
                grp = node.groups[gid]
                if ts < grp.last:
                    continue  # the reference ignores it: no change, no split
                if count < grp.size:
                    # Only some members heartbeat: they get a state of their own.
                    split = grp.clone(count)
                    grp.size -= count
                    node.gids[hit[hit_gids == gid]] = node.add_group(split)
                    grp = split
                grp.heartbeat(ts, self.opts)
        created = region_ids[~present] if create else _EMPTY_U64
        if created.size:
            node.insert_fresh(pos[~present], created, ts, self.opts)
            self._count += created.size
        node.merge_identical(ts)
        if not node.groups:
            del self._nodes[datanode_id]
        return created

    def register(self, datanode_id: int, region_ids: RegionArray, ts: int) -> int:
        """Create the missing detectors with a heartbeat at `ts`; existing ones are untouched."""
        node = self._nodes.get(datanode_id)
        if node is None:
            node = self._nodes[datanode_id] = _Node()
        pos, present = node.locate(region_ids)
        created = int(region_ids.size - np.count_nonzero(present))
        if created:
            node.insert_fresh(pos[~present], region_ids[~present], int(ts), self.opts)
            node.merge_identical(int(ts))
            self._count += created
        elif not node.groups:
            del self._nodes[datanode_id]
        return created

    def deregister(self, datanode_id: int, region_ids: RegionArray) -> int:
        """Remove the named detectors; returns how many existed."""
        node = self._nodes.get(datanode_id)
        if node is None:
            return 0
        pos, present = node.locate(region_ids)
        removed = int(np.count_nonzero(present))
        if removed:
            node.remove_at(pos[present])
            self._count -= removed
            if not node.groups:
                del self._nodes[datanode_id]
        return removed

    def reset(self, datanode_id: int, region_ids: RegionArray, ts: int) -> int:
        """Replace each named detector with a fresh one heartbeat at `ts` (creating absent ones)."""
        self.deregister(datanode_id, region_ids)
        return self.register(datanode_id, region_ids, ts)

    def rebaseline(self, datanode_ids: list[int] | None, ts: int) -> int:
        """Give every detector of the datanodes (all: None) a fresh state heartbeat at `ts`."""
        count = 0
        for datanode_id in list(self._nodes) if datanode_ids is None else datanode_ids:
            node = self._nodes.get(datanode_id)
            if node is None:
                continue
            node.groups.clear()
            gid = node.add_group(_Group.fresh(int(node.regions.size), int(ts), self.opts))
            node.gids = np.full(node.regions.size, gid, dtype=np.int64)
            count += int(node.regions.size)
        return count

    # ------------------------------------------------------------ queries

    def contains(self, datanode_id: int, region_id: int) -> bool:
        node = self._nodes.get(datanode_id)
        if node is None:
            return False
        _, present = node.locate(np.array([region_id], dtype=np.uint64))
        return bool(present[0])

    def regions_of(self, datanode_id: int) -> RegionArray:
        node = self._nodes.get(datanode_id)
        return _EMPTY_U64 if node is None else node.regions

    def phi(self, datanode_id: int, region_id: int, ts: int) -> float:
        """phi of one detector; KeyError if it does not exist."""
        node = self._nodes.get(datanode_id)
        if node is not None:
            pos, present = node.locate(np.array([region_id], dtype=np.uint64))
            if present[0]:
                return node.groups[int(node.gids[pos[0]])].phi(int(ts))
        raise KeyError((datanode_id, region_id))

    def phis(self, datanode_id: int, region_ids: RegionArray, ts: int) -> dict[int, float]:
        """phi of each named detector that exists (absent ones are left out)."""
        node = self._nodes.get(datanode_id)
        if node is None:
            return {}
        pos, present = node.locate(region_ids)
        by_group = {gid: grp.phi(int(ts)) for gid, grp in node.groups.items()}
        gids = node.gids[pos[present]].tolist()
        return {r: by_group[g] for r, g in zip(region_ids[present].tolist(), gids)}

    def failed(self, ts: int) -> Iterator[tuple[int, RegionArray]]:
        """(datanode, sorted failed region ids) for every datanode with phi >= threshold somewhere."""
        threshold = self.opts.threshold
        for datanode_id, node in self._nodes.items():
            bad = [gid for gid, grp in node.groups.items() if grp.phi(ts) >= threshold]
            if not bad:
                continue
            if len(bad) == len(node.groups):
                yield datanode_id, node.regions.copy()
            else:
                yield datanode_id, node.regions[np.isin(node.gids, bad)]

    def phi_sizes(self, ts: int) -> Iterator[tuple[float, int]]:
        """(phi, number of detectors sharing it) for every group: the phi distribution."""
        for node in self._nodes.values():
            for grp in node.groups.values():
                yield grp.phi(ts), grp.size

    def silent_datanodes(self, ts: int, silence_ms: int) -> list[int]:
        """Datanodes none of whose detectors heard a heartbeat within `silence_ms` of `ts`, nor within
        `SILENT_INTERVALS` of the datanode's own mean heartbeat interval (so a short `silence_ms`
        never makes a datanode between two regular heartbeats look silent)."""
        silent = []
        for datanode_id, node in self._nodes.items():
            newest = max(node.groups.values(), key=lambda g: g.last)
            quiet = ts - newest.last
            if quiet > silence_ms and quiet > SILENT_INTERVALS * newest.total / len(newest.intervals):
                silent.append(datanode_id)
        return silent

    def snapshot(self, datanode_ids: set[int] | None = None) -> list[NodeSnapshot]:
        """A consistent copy of (part of) the table; cheap: arrays are copied, rows are not built."""
        out = []
        for datanode_id, node in self._nodes.items():
            if datanode_ids is not None and datanode_id not in datanode_ids:
                continue
            groups = {}
            for gid, grp in node.groups.items():
                n, observed_mean, observed_std = grp.observed()
                groups[gid] = GroupSnapshot(grp.last, grp.mean, grp.std, n, observed_mean, observed_std)
            out.append(NodeSnapshot(datanode_id, node.regions.copy(), node.gids.copy(), groups))
        return out
