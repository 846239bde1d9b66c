"""The detector table: every (datanode, region) detector, owned by the supervisor thread.

Per datanode, the detectors live as *history groups* over one shared interval log
(`core.history`): a heartbeat of a thousand regions is a few numpy operations over the groups it
touches, whatever the times the regions joined. A heartbeat naming exactly the datanode's regions
of last time, all aligned on the log and all certainly available, takes the steady path (one
append to the log and one vector update; plain Python numbers when the datanode is one group).

Per tick, nothing is computed for a detector that cannot have failed: each group keeps its *due*
time (the first millisecond at which phi could reach the threshold, `core.phivec`), each
datanode the minimum of its groups', and the table one array of those minimums by datanode slot,
so finding the failed is one comparison over datanodes plus exact phi for the few at or past due.
The same slot arrays hold each datanode's newest heartbeat and mean interval, for the silence
the mass-failure guard watches.

Everything agrees with the scalar reference (`core.detector`): the same windows and integer sums,
mean and std bit for bit, decisions exactly, phi values from `phi`/`phis` bit for bit and from
the vectorised paths within an ulp or so. Not thread-safe by design: only the supervisor thread
touches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from supervisor_service.core.detector import PhiAccrualOptions, phi_from
from supervisor_service.core.history import EMPTY_U64, Consts, Idx, NodeHistory
from supervisor_service.core.phivec import at_or_above, phi_array
from supervisor_service.core.types import RegionArray

SILENT_INTERVALS = 1.5
"""A datanode is never silent before this many of its mean heartbeat intervals have passed."""

MERGE_EVERY = 8
"""Steady heartbeats of a datanode between two looks for groups whose windows met (`NodeHistory.merge`)."""

PHI_SWEEP_GROUPS = 100_000
"""History groups whose phi one tick evaluates for the phi distribution metric; a bigger table
is swept over several ticks and the distribution published when a sweep completes."""

_NEVER = 2**62


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


class GroupSnapshot:
    """One history group's state as of a snapshot, enough for phi and the Dump columns."""

    __slots__ = ("last", "mean", "std", "samples", "observed_mean", "observed_std")

    def __init__(self, last: int, mean: float, std: float, samples: int, total: int, total_sq: int) -> None:
        self.last, self.mean, self.std, self.samples = last, mean, std, samples
        self.observed_mean = total / samples
        self.observed_std = math.sqrt((samples * total_sq - total * total) / (samples * samples))

    def phi(self, ts: int) -> float:
        return phi_from(ts - self.last, self.mean, self.std)


class NodeSnapshot:
    """A copy of one datanode's detectors: sorted regions, each one's group, the groups' state.
    Taken on the supervisor thread (array copies only); the groups are built when first read."""

    __slots__ = ("datanode_id", "regions", "gids", "_state", "_groups")

    def __init__(self, datanode_id: int, node: NodeHistory) -> None:
        self.datanode_id = datanode_id
        self.regions: RegionArray = node.regions.copy()
        self.gids: Idx = node.gids.copy()
        self._state = (node.last.copy(), node.mean.copy(), node.std.copy(), node.n.copy(),
                       node.s1.copy(), node.s2.copy())
        self._groups: dict[int, GroupSnapshot] | None = None

    @property
    def groups(self) -> dict[int, GroupSnapshot]:
        if self._groups is None:
            columns = [a.tolist() for a in self._state]
            self._groups = {g: GroupSnapshot(*row) for g, row in enumerate(zip(*columns))}
        return self._groups

    @property
    def last(self) -> npt.NDArray[np.int64]:
        """Per group: its last heartbeat."""
        return self._state[0]

    def phis(self, at: int) -> npt.NDArray[np.float64]:
        """Per group: phi at `at`, the reference's bits."""
        last, mean, std = (a.tolist() for a in self._state[:3])
        return np.array([phi_from(at - x, m, s) for x, m, s in zip(last, mean, std)], dtype=np.float64)

    def observed(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Per group: samples, observed mean interval and population std (no pause, no floor),
        the bits `GroupSnapshot` has."""
        n, s1, s2 = self._state[3:]
        if s1.dtype == object:  # wide sums: Python ints
            g = self.groups
            return (n.copy(), np.array([g[i].observed_mean for i in range(n.size)], dtype=np.float64),
                    np.array([g[i].observed_std for i in range(n.size)], dtype=np.float64))
        num = n * s2
        num -= s1 * s1
        return n.copy(), s1 / n, np.sqrt(num / (n * n))


class DetectorTable:
    """All detectors, by datanode, as history groups over shared interval logs. Supervisor thread only."""

    def __init__(self, opts: PhiAccrualOptions) -> None:
        self.opts = opts
        self._consts = Consts.of(opts)
        self._sweep = _PhiSweep()
        self.clear()

    def clear(self) -> None:
        """Forget every detector."""
        self._nodes: dict[int, NodeHistory] = {}
        self._count = 0
        self._groups = 0  # the sum of every datanode's groups, as of its last publish
        # Per datanode slot: the minimum due of its groups, its newest heartbeat, and the observed
        # mean interval it is silent against.
        self._slot_of: dict[int, int] = {}
        self._slot_ids: list[int] = []
        self._free: list[int] = []
        self._due = np.empty(0, dtype=np.int64)
        self._newest = np.empty(0, dtype=np.int64)
        self._interval = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        return self._count

    @property
    def group_count(self) -> int:
        return self._groups

    @property
    def datanode_count(self) -> int:
        return len(self._nodes)

    def datanode_ids(self) -> list[int]:
        return list(self._nodes)

    # ------------------------------------------------------------ datanode slots

    def _node(self, datanode_id: int) -> NodeHistory:
        node = self._nodes.get(datanode_id)
        if node is None:
            node = self._nodes[datanode_id] = NodeHistory(self._consts)
            if self._free:
                slot = self._free.pop()
                self._slot_ids[slot] = datanode_id
            else:
                slot = len(self._slot_ids)
                self._slot_ids.append(datanode_id)
                if slot >= self._due.size:
                    grow = max(64, self._due.size)
                    self._due = np.concatenate([self._due, np.full(grow, _NEVER, dtype=np.int64)])
                    self._newest = np.concatenate([self._newest, np.zeros(grow, dtype=np.int64)])
                    self._interval = np.concatenate([self._interval, np.zeros(grow, dtype=np.float64)])
            self._slot_of[datanode_id] = slot
        return node

    def _drop_if_empty(self, datanode_id: int, node: NodeHistory) -> None:
        if node.regions.size == 0:
            self._groups -= node.counted
            del self._nodes[datanode_id]
            slot = self._slot_of.pop(datanode_id)
            self._due[slot] = _NEVER
            self._free.append(slot)

    def _publish(self, datanode_id: int, node: NodeHistory, steady: bool = False) -> None:
        """Copy the node's minimum due, newest heartbeat and its interval to the slot arrays."""
        slot = self._slot_of[datanode_id]
        if node.dead:
            node.compact()
        groups = int(node.size.size)
        self._groups += groups - node.counted
        node.counted = groups
        if node.size.size == 0:
            self._due[slot] = _NEVER
            return
        if steady and node.size.size == 1 and node.tail is not None:  # `_take_one` left them in Python numbers
            due, newest, interval = node.min_due, node.tail, node.interval
        elif node.size.size == 1:
            due, newest, interval = int(node.due[0]), int(node.last[0]), node.s1[0] / node.n[0]
        else:
            # Of the groups that heard the newest heartbeat, the longest mean interval: the datanode
            # is not silent before the slowest of its current histories expects it.
            due = int(node.due.min())
            if steady and node.tail is not None:  # the steady path: every group heard the newest heartbeat
                newest, interval = node.tail, node.longest
            else:
                newest = int(node.last.max())
                at = node.last == newest
                interval = float(np.max(node.s1[at] / node.n[at]))
        node.min_due = self._due[slot] = due
        self._newest[slot] = newest
        self._interval[slot] = interval

    # ------------------------------------------------------------ updates

    def heartbeat(self, datanode_id: int, region_ids: RegionArray, ts: int, create: bool = True) -> RegionArray:
        """Apply one heartbeat of `datanode_id` naming the sorted unique `region_ids` at `ts`.

        Creates missing detectors (unless `create` is false: then only the existing ones are
        refreshed). Returns the region ids created (usually none).
        """
        ts = int(ts)
        node = self._nodes.get(datanode_id)
        if node is None:
            if not create or region_ids.size == 0:
                return EMPTY_U64
            node = self._node(datanode_id)
        node.beats += 1
        if node.key == region_ids.tobytes() and node.beat_all(ts):
            if node.size.size > 1 and node.beats % MERGE_EVERY == 0:
                node.merge()
            self._publish(datanode_id, node, steady=True)
            return EMPTY_U64
        pos, present = node.locate(region_ids)
        hit = pos[present]
        if hit.size == node.regions.size and hit.size and node.beat_all(ts):
            pass  # it names every region it had: the steady update, then the new ones join
        elif hit.size:
            self._beat_members(node, hit, ts)
        created = region_ids[~present] if create else EMPTY_U64
        if created.size:
            self._insert(node, pos[~present], created, ts)
        if node.beats % MERGE_EVERY == 0:
            node.merge()
        if node.regions.size:
            self._publish(datanode_id, node)
        self._drop_if_empty(datanode_id, node)
        return created

    def _beat_members(self, node: NodeHistory, hit: Idx, ts: int) -> None:
        """The detectors at positions `hit` heartbeat at `ts`: groups only partly named split first."""
        hit_gids = node.gids[hit]
        counts = np.bincount(hit_gids, minlength=node.size.size)
        touched = np.flatnonzero(counts)
        partial = touched[(counts[touched] < node.size[touched]) & (node.last[touched] <= ts)]
        if partial.size:
            copies = node.split(partial, counts[partial])
            remap = np.arange(node.size.size, dtype=np.intp)
            remap[partial] = copies
            node.gids[hit] = remap[hit_gids]
            whole = np.ones(touched.size, dtype=bool)
            whole[np.searchsorted(touched, partial)] = False
            touched = np.concatenate([touched[whole], copies])
        node.beat(touched, ts)

    def _insert(self, node: NodeHistory, pos: Idx, region_ids: RegionArray, ts: int) -> None:
        g = node.fresh_group(int(region_ids.size), ts)
        g = node.join_twin(g)
        node.set_regions(np.insert(node.regions, pos, region_ids), np.insert(node.gids, pos, g))
        self._count += int(region_ids.size)

    def register(self, datanode_id: int, region_ids: RegionArray, ts: int) -> int:
        """Create the missing detectors with a heartbeat at `ts`; existing ones are untouched."""
        if region_ids.size == 0:
            return 0
        node = self._node(datanode_id)
        pos, present = node.locate(region_ids)
        created = int(region_ids.size - np.count_nonzero(present))
        if created:
            self._insert(node, pos[~present], region_ids[~present], int(ts))
            self._publish(datanode_id, node)
        self._drop_if_empty(datanode_id, node)
        return created

    def deregister(self, datanode_id: int, region_ids: RegionArray) -> int:
        """Remove the named detectors; returns how many existed."""
        node = self._nodes.get(datanode_id)
        if node is None:
            return 0
        pos, present = node.locate(region_ids)
        idx = pos[present]
        if idx.size == 0:
            return 0
        counts = np.bincount(node.gids[idx], minlength=node.size.size)
        groups = np.flatnonzero(counts)
        node.shrink(groups, counts[groups])
        node.set_regions(np.delete(node.regions, idx), np.delete(node.gids, idx))
        self._count -= int(idx.size)
        self._publish(datanode_id, node)
        self._drop_if_empty(datanode_id, node)
        return int(idx.size)

    def reset(self, datanode_id: int, region_ids: RegionArray, ts: int) -> int:
        """Replace each named detector with a fresh one heartbeat at `ts` (creating absent ones)."""
        self.deregister(datanode_id, region_ids)
        return self.register(datanode_id, region_ids, ts)

    def rebaseline(self, datanode_ids: list[int] | None, ts: int) -> int:
        """Give every detector of the datanodes (all: None) a fresh state heartbeat at `ts`."""
        count = 0
        for datanode_id in list(self._nodes) if datanode_ids is None else datanode_ids:
            old = self._nodes.get(datanode_id)
            if old is None:
                continue
            self._groups -= old.counted
            node = self._nodes[datanode_id] = NodeHistory(self._consts)
            node.set_regions(old.regions, np.zeros(old.regions.size, dtype=np.intp))
            node.fresh_group(int(old.regions.size), int(ts))
            self._publish(datanode_id, node)
            count += int(old.regions.size)
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
        return EMPTY_U64 if node is None else node.regions

    def phi(self, datanode_id: int, region_id: int, ts: int) -> float:
        """phi of one detector (the reference's bits); KeyError if it does not exist."""
        node = self._nodes.get(datanode_id)
        if node is not None:
            pos, present = node.locate(np.array([region_id], dtype=np.uint64))
            if present[0]:
                g = int(node.gids[pos[0]])
                return phi_from(int(ts) - int(node.last[g]), float(node.mean[g]), float(node.std[g]))
        raise KeyError((datanode_id, region_id))

    def phis(self, datanode_id: int, region_ids: RegionArray, ts: int) -> dict[int, float]:
        """phi of each named detector that exists (absent ones are left out), the reference's bits."""
        node = self._nodes.get(datanode_id)
        if node is None:
            return {}
        pos, present = node.locate(region_ids)
        gids = node.gids[pos[present]]
        wanted = np.unique(gids)
        by_group = {
            g: phi_from(int(ts) - last, mean, std)
            for g, last, mean, std in zip(wanted.tolist(), node.last[wanted].tolist(),
                                          node.mean[wanted].tolist(), node.std[wanted].tolist())
        }
        return {r: by_group[g] for r, g in zip(region_ids[present].tolist(), gids.tolist())}

    def failed(self, ts: int) -> Iterator[tuple[int, RegionArray]]:
        """(datanode, sorted failed region ids) for every datanode with phi >= threshold somewhere,
        in the order the datanodes joined the table."""
        ts = int(ts)
        slots = np.flatnonzero(self._due[: len(self._slot_ids)] <= ts)
        found = []
        for slot in slots.tolist():
            datanode_id = self._slot_ids[slot]
            node = self._nodes[datanode_id]
            g = np.flatnonzero(node.due <= ts)
            bad = g[at_or_above((ts - node.last[g]).astype(np.float64), node.mean[g], node.std[g],
                                self.opts.threshold)]
            if bad.size == 0:
                continue
            if bad.size == node.groups:
                found.append((datanode_id, node.regions.copy()))
            else:
                mask = np.zeros(node.size.size, dtype=bool)
                mask[bad] = True
                found.append((datanode_id, node.regions[mask[node.gids]]))
        order = {d: i for i, d in enumerate(self._nodes)} if len(found) > 1 else {}
        yield from sorted(found, key=lambda item: order.get(item[0], 0))

    def phi_sizes(self, ts: int) -> Iterator[tuple[float, int]]:
        """(phi, number of detectors sharing it) for every group, the reference's bits (for tools
        and tests: the metric uses `phi_distribution`)."""
        for node in self._nodes.values():
            for last, mean, std, size in zip(node.last.tolist(), node.mean.tolist(), node.std.tolist(),
                                              node.size.tolist()):
                if size:
                    yield phi_from(int(ts) - last, mean, std), size

    def phi_distribution(self, ts: int, bounds: tuple[float, ...]) -> tuple[list[int], int, float]:
        """(detectors per bucket `phi <= bound` first match, detectors, sum of finite phi) as of the
        last completed sweep; a sweep covers at most `PHI_SWEEP_GROUPS` groups per call."""
        return self._sweep.advance(self._nodes, int(ts), bounds)

    def silent_datanodes(self, ts: int, silence_ms: int) -> list[int]:
        """Datanodes none of whose detectors heard a heartbeat within `silence_ms` of `ts`, nor within
        `SILENT_INTERVALS` of the datanode's own mean heartbeat interval (so a short `silence_ms`
        never makes a datanode between two regular heartbeats look silent)."""
        used = len(self._slot_ids)
        quiet = int(ts) - self._newest[:used]
        live = self._due[:used] < _NEVER  # a free slot, or a datanode without groups
        hits = np.flatnonzero(live & (quiet > silence_ms) & (quiet > SILENT_INTERVALS * self._interval[:used]))
        silent = {self._slot_ids[s] for s in hits.tolist()}
        return [d for d in self._nodes if d in silent] if silent else []

    def snapshot(self, datanode_ids: set[int] | None = None) -> list[NodeSnapshot]:
        """A consistent copy of (part of) the table; cheap: arrays are copied, rows are not built."""
        out = []
        for datanode_id, node in self._nodes.items():
            if datanode_ids is not None and datanode_id not in datanode_ids:
                continue
            if node.dead:
                node.compact()
            out.append(NodeSnapshot(datanode_id, node))
        return out


class _PhiSweep:
    """The phi distribution, evaluated over a bounded number of groups per tick: the groups of a
    run of datanodes are gathered into one set of arrays, and phi computed in one numpy pass."""

    NODE_COST = 32  # one datanode's Python overhead, in groups

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._cursor = 0
        self._acc: tuple[np.ndarray, int, float] | None = None
        self._done: tuple[list[int], int, float] | None = None

    def advance(self, nodes: dict[int, NodeHistory], ts: int, bounds: tuple[float, ...]) -> tuple[list[int], int, float]:
        edges = np.asarray(bounds, dtype=np.float64)
        if self._acc is None:
            self._ids, self._cursor = list(nodes), 0
            self._acc = (np.zeros(edges.size, dtype=np.int64), 0, 0.0)
        parts: list[tuple[np.ndarray, ...]] = []
        budget = PHI_SWEEP_GROUPS
        while self._cursor < len(self._ids) and budget > 0:
            node = nodes.get(self._ids[self._cursor])
            self._cursor += 1
            if node is not None:
                parts.append((node.last, node.mean, node.std, node.size))
                budget -= int(node.size.size) + self.NODE_COST
        buckets, count, total = self._acc
        if parts:
            last, mean, std, size = (np.concatenate(column) for column in zip(*parts))
            phi = phi_array((ts - last).astype(np.float64), mean, std)
            where = np.minimum(np.searchsorted(edges, phi, side="left"), edges.size - 1)
            buckets = buckets + np.bincount(where, weights=size, minlength=edges.size).astype(np.int64)
            count += int(size.sum())
            shown = np.isfinite(phi) & (size > 0)
            total += float((phi[shown] * size[shown]).sum())
        self._acc = (buckets, count, total)
        if self._cursor >= len(self._ids):
            self._done = (buckets.tolist(), count, total)
            self._acc = None
        return self._done if self._done is not None else ([0] * edges.size, 0, 0.0)


def newest_heartbeats(table: DetectorTable) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """(datanode ids, the newest heartbeat of each) of every datanode with detectors: one read of
    the slot arrays, O(datanodes) in numpy, for the heartbeat age summary (`core.heartbeat_ages`).
    A function of this module rather than a method: it reads the slot arrays the class keeps."""
    used = len(table._slot_ids)
    live = np.flatnonzero(table._due[:used] < _NEVER)
    ids = np.fromiter(table._slot_ids, dtype=np.uint64, count=used)[live]
    return ids, table._newest[live]
