"""The detectors of one datanode: history groups as arrays over a shared interval log (docs/design.md §2.3).

A datanode heartbeats all its regions with one timestamp, so their detectors mostly take the same
intervals; they differ in *when they joined* (table creation, failover targets, rebalancing) and,
rarely, in an interval one of them skipped or missed. So the datanode keeps one append-only
**log** of the intervals its detectors take together, and each **history group** (the regions
whose detector state is identical; one per join time, a few more after a divergence) is a row of
parallel arrays that says which part of the log is its window:

    window (oldest first) = the seeds still in it, an older log segment, its private prefix,
                            log[start:end]

with the window's count `n` and exact integer sums `s1`, `s2` kept up to date, and from them the
`mean`, `std` and `due` that phi needs (`core.phivec`). A group is *aligned* when its last
heartbeat is the log's (`last == tail`) and its window reaches the log's end: its next interval is
the log's next entry, so a heartbeat of any number of aligned groups is a few numpy operations.
A group that skips an interval the others take (phi at or above the threshold), misses a
heartbeat, or joined between two heartbeats takes its own interval into a private prefix and is
aligned again from the next heartbeat; what it had on the log stays there as its older segment
(copied into the private prefix only when it diverges again within one window). Private prefixes
live in one int64 buffer per datanode, written once and consumed from the front as the window
slides. Groups whose windows become identical (all on the log from the same start) merge.

Exactness: the window is the reference's element for element, so the sums are equal integers. In
int64, mean and variance are the reference's bits while `cap^2 * interval^2 < 2^53` (numerator and
denominator exactly representable, one rounding each, as in Python's int division); a datanode
that meets a larger interval switches its sums to Python ints (object arrays): exact, slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from supervisor_service.core.detector import PhiAccrualOptions, stats_from_sums
from supervisor_service.core.phivec import at_or_above, safe_y
from supervisor_service.core.types import RegionArray

Ints = npt.NDArray[np.int64]
Idx = npt.NDArray[np.intp]

EMPTY_U64: RegionArray = np.empty(0, dtype=np.uint64)
_FAR = float(2**62)
SCALAR_DROPS = 6
"""Up to this many full windows drop their oldest interval one by one: cheaper than the vector path."""
_STATE = ("start", "end", "ostart", "oend", "seeds", "plen", "pstart", "n", "s1", "s2", "last", "mean", "std", "due", "size")


@dataclass(frozen=True, slots=True)
class Consts:
    """What every datanode's groups share: the options, and the numbers derived from them once."""

    opts: PhiAccrualOptions
    lo: int
    hi: int
    safe_y: float
    exact_limit: int  # the largest interval for which int64 sums keep mean and variance exact

    @classmethod
    def of(cls, opts: PhiAccrualOptions) -> Consts:
        lo, hi = opts.seed_intervals()
        cap = opts.max_sample_size
        return cls(opts, lo, hi, safe_y(opts.threshold), int((2**53 // (cap * cap)) ** 0.5) - 1)


class IntervalLog:
    """A datanode's shared intervals: absolute indexes, the ones no window needs dropped."""

    __slots__ = ("buf", "base", "size")

    def __init__(self) -> None:
        self.buf: Ints = np.empty(64, dtype=np.int64)
        self.base = 0  # absolute index of buf[0]
        self.size = 0  # absolute index one past the last entry

    def full(self) -> bool:
        return self.size - self.base == self.buf.size

    def append(self, x: int) -> None:
        self.buf[self.size - self.base] = x
        self.size += 1

    def at(self, idx: Ints) -> Ints:
        return self.buf[idx - self.base]

    def keep_from(self, first: int) -> None:
        """Drop entries before absolute index `first`, and make room for at least as many again."""
        kept = self.buf[first - self.base : self.size - self.base]
        room = kept.size + max(64, kept.size // 2)
        if room != self.buf.size:
            self.buf = np.empty(room, dtype=np.int64)
        self.buf[: kept.size] = kept.copy()
        self.base = first


class PrivateLog:
    """The private prefixes of a datanode's diverged groups: each a contiguous slice of one int64
    buffer, written once (a group and its split copies may share one) and consumed from the front."""

    __slots__ = ("buf", "used")

    def __init__(self) -> None:
        self.buf: Ints = np.empty(0, dtype=np.int64)
        self.used = 0

    def write(self, values: Ints) -> int:
        """Store `values` as a new slice; returns where it starts."""
        k = int(values.size)
        if self.used + k > self.buf.size:
            grown = np.empty(max(256, 2 * (self.used + k)), dtype=np.int64)
            grown[: self.used] = self.buf[: self.used]
            self.buf = grown
        at = self.used
        self.buf[at : at + k] = values
        self.used += k
        return at

    def rebuild(self, pstart: Ints, plen: Ints, live: npt.NDArray[np.bool_]) -> None:
        """Keep only the slices of `live` groups (most of the buffer is consumed): rewrites `pstart`."""
        old, self.buf, self.used = self.buf, np.empty(0, dtype=np.int64), 0
        for g in np.flatnonzero(live & (plen > 0)).tolist():
            pstart[g] = self.write(old[pstart[g] : pstart[g] + plen[g]])


class GroupArrays:
    """The state of one datanode's detectors: sorted region ids, each one's group, the groups'
    arrays, the log and the private prefixes; and the bookkeeping of groups (split, merge, compact)."""

    __slots__ = (
        "c", "regions", "key", "gids", "log", "tail", "priv", "wide", "dead", "min_due", "beats", "synced",
        "longest", "counted", "solo", "interval",
    ) + _STATE

    def __init__(self, consts: Consts) -> None:
        self.c = consts
        self.regions: RegionArray = EMPTY_U64
        self.key = b""  # the bytes of `regions`: a heartbeat naming them all is recognised by them
        self.gids: Idx = np.empty(0, dtype=np.intp)
        self.log = IntervalLog()
        self.tail: int | None = None  # the time of the heartbeat all aligned groups took last
        self.priv = PrivateLog()  # the private prefixes: group g's is priv.buf[pstart:pstart + plen]
        self.wide = max(consts.lo, consts.hi) > consts.exact_limit
        self.dead = 0  # groups of size 0 not yet compacted away
        self.min_due = 2**62
        self.beats = 0
        self.synced = False  # known to be all aligned (set by the steady path, cleared by any other)
        self.counted = 0  # groups as the table last counted them
        # A lone converged group's [start, end, s1, s2] as Python ints (the arrays hold the same),
        # kept by the steady path and dropped by every other change; and its observed mean interval.
        self.solo: list[int] | None = None
        self.interval = 0.0
        self.longest = 0.0  # the longest observed mean interval of all groups, as of the last steady path
        sums: Any = object if self.wide else np.int64
        self.start, self.end, self.ostart, self.oend = (np.empty(0, dtype=np.int64) for _ in range(4))
        self.plen, self.pstart, self.n = (np.empty(0, dtype=np.int64) for _ in range(3))
        self.last, self.due, self.size = (np.empty(0, dtype=np.int64) for _ in range(3))
        self.seeds = np.empty(0, dtype=np.int8)
        self.s1, self.s2 = np.empty(0, dtype=sums), np.empty(0, dtype=sums)
        self.mean, self.std = np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)

    def set_regions(self, regions: RegionArray, gids: Idx) -> None:
        self.regions, self.gids, self.key = regions, gids, regions.tobytes()

    @property
    def groups(self) -> int:
        return int(self.size.size) - self.dead

    def locate(self, region_ids: RegionArray) -> tuple[Idx, npt.NDArray[np.bool_]]:
        """Positions in `regions` of the sorted ids, and a mask of which are present."""
        pos = np.searchsorted(self.regions, region_ids)
        if self.regions.size == 0:
            return pos, np.zeros(region_ids.size, dtype=bool)
        present = self.regions[np.minimum(pos, self.regions.size - 1)] == region_ids
        return pos, present

    # ------------------------------------------------------------ group rows

    def _new_groups(self, count: int) -> Idx:
        """Append `count` group rows (uninitialised) and return their indexes."""
        g = self.size.size
        for name in _STATE:
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros(count, dtype=arr.dtype)]))
        return np.arange(g, g + count, dtype=np.intp)

    def _make_wide(self) -> None:
        self.solo = None
        if not self.wide:
            self.wide = True
            self.s1 = np.array(self.s1.tolist(), dtype=object)
            self.s2 = np.array(self.s2.tolist(), dtype=object)

    def split(self, groups: Idx, counts: Ints) -> Idx:
        """Copies of `groups` for `counts` of their members each (the copies' indexes)."""
        self.solo = None
        self.synced = False
        copies = self._new_groups(int(groups.size))
        for name in _STATE:
            arr = getattr(self, name)
            arr[copies] = arr[groups]
        self.size[copies] = counts
        self.size[groups] -= counts
        return copies

    def shrink(self, groups: Idx, counts: Ints) -> None:
        """`counts` members left each of `groups`."""
        self.solo = None
        self.size[groups] -= counts
        gone = groups[self.size[groups] == 0]
        self.dead += int(gone.size)
        self.due[gone] = 2**62

    def compact(self) -> None:
        """Forget the groups nobody is in, and renumber the rest."""
        self.solo = None
        live = np.flatnonzero(self.size > 0)
        remap = np.full(self.size.size, -1, dtype=np.intp)
        remap[live] = np.arange(live.size, dtype=np.intp)
        for name in _STATE:
            setattr(self, name, getattr(self, name)[live])
        self.gids = remap[self.gids]
        self.dead = 0

    def join_twin(self, g: int) -> int:
        """The newest group `g`, or an older group with the very same window it joins (then `g`,
        the last row, is removed): fresh regions registered or heartbeat together in several calls."""
        self.solo = None
        twin = np.flatnonzero(
            (self.start == self.start[g]) & (self.end == self.end[g]) & (self.seeds == self.seeds[g])
            & (self.last == self.last[g]) & (self.plen == 0) & (self.oend == self.ostart) & (self.size > 0)
        )
        into = int(twin[0])
        if into == g:
            return g
        self.size[into] += self.size[g]
        for name in _STATE:
            setattr(self, name, getattr(self, name)[:g])
        return into

    def refresh(self, g: Idx | slice) -> None:
        """mean, std and due of groups `g` from their sums (the reference's `stats_from_sums`, the
        same operations in the same order). For all groups (`g` a slice), also `longest`."""
        opts = self.c.opts
        if isinstance(g, slice) and not self.wide:
            self._refresh_all()
            return
        n, s1, s2 = self.n[g], self.s1[g], self.s2[g]
        if self.wide:
            mean = np.array([a / b for a, b in zip(s1.tolist(), n.tolist())], dtype=np.float64)
            wide = [k * b - a * a for k, a, b in zip(n.tolist(), s1.tolist(), s2.tolist())]
            var = np.array([v / (k * k) for v, k in zip(wide, n.tolist())], dtype=np.float64)
        else:
            mean = s1 / n
            num = n * s2
            num -= s1 * s1
            var = num / (n * n)
        if isinstance(g, slice):
            self.longest = float(mean.max())
        mean += opts.acceptable_heartbeat_pause_ms
        std = np.sqrt(var, out=var)
        np.maximum(std, opts.min_std_deviation_ms, out=std)
        self.mean[g] = mean
        self.std[g] = std
        self._set_due(g, mean, std)

    def _refresh_all(self) -> None:
        """`refresh` of every group (int64 sums), written in place: the steady path's."""
        opts = self.c.opts
        n, s1, s2 = self.n, self.s1, self.s2
        mean = np.divide(s1, n, out=self.mean)
        self.longest = float(mean.max())
        num = n * s2
        num -= s1 * s1
        std = np.divide(num, n * n, out=self.std)
        mean += opts.acceptable_heartbeat_pause_ms
        np.sqrt(std, out=std)
        np.maximum(std, opts.min_std_deviation_ms, out=std)
        self._set_due(slice(None), mean, std)

    def _set_due(self, g: Idx | slice, mean: npt.NDArray[np.float64], std: npt.NDArray[np.float64]) -> None:
        """due of groups `g` from their mean and std: ts < due proves phi(ts) < threshold
        (core.phivec); 2 ms below the bound, for the rounding."""
        reach = std * self.c.safe_y
        reach += mean
        reach += self.last[g]
        np.clip(reach, -_FAR, _FAR, out=reach)
        self.due[g] = np.floor(reach, out=reach)
        self.due[g] -= 2

    def due_at(self, last: int, mean: float, std: float) -> int:
        """`_set_due` of one group, in Python numbers."""
        reach = min(last + (mean + self.c.safe_y * std), _FAR)
        return int(max(math.floor(reach), -_FAR)) - 2

    def refresh_one(self, g: int) -> None:
        """`refresh` of one group, in Python numbers (the reference's own function)."""
        n, s1, s2 = int(self.n[g]), int(self.s1[g]), int(self.s2[g])
        mean, std = stats_from_sums(n, s1, s2, self.c.opts)
        self.mean[g], self.std[g] = mean, std
        self.due[g] = self.due_at(int(self.last[g]), mean, std)

    def tidy_private(self) -> None:
        """Rebuild the private buffer once most of it has been consumed."""
        if self.priv.used > 4096:
            live = self.size > 0
            if self.priv.used > 4 * int(self.plen[live].sum()):
                self.priv.rebuild(self.pstart, self.plen, live)

    def merge(self) -> None:
        """Fold the aligned groups without a private prefix whose windows start at the same place:
        their windows are the same seeds and the same log slice, so their states are identical
        (how groups that joined apart meet once their windows are full, and fresh groups join)."""
        self.solo = None
        if self.size.size < 2:
            return
        cand = np.flatnonzero(
            (self.plen == 0) & (self.oend == self.ostart) & (self.end == self.log.size) & (self.last == self.tail)
            & (self.size > 0)
        )
        if cand.size < 2:
            return
        key = self.start[cand] * 3 + self.seeds[cand]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if first.size == cand.size:
            return
        into = cand[first][inverse.reshape(-1)]  # each candidate -> the first group with its window
        moved = into != cand
        np.add.at(self.size, into[moved], self.size[cand[moved]])
        self.size[cand[moved]] = 0
        self.due[cand[moved]] = 2**62
        self.dead += int(np.count_nonzero(moved))
        remap = np.arange(self.size.size, dtype=np.intp)
        remap[cand] = into
        self.gids = remap[self.gids]


class NodeHistory(GroupArrays):
    """The detectors of one datanode: the window arithmetic and the heartbeats."""

    __slots__ = ()

    def fresh_group(self, size: int, ts: int) -> int:
        """A new group of `size` detectors heartbeat at `ts` for the first time (window: the seeds)."""
        self.solo = None
        self.synced = False
        (g,) = self._new_groups(1).tolist()
        lo, hi, m = self.c.lo, self.c.hi, self.log.size
        self.start[g] = self.end[g] = m
        self.seeds[g], self.plen[g], self.n[g] = 2, 0, 2
        self.s1[g], self.s2[g] = lo + hi, lo * lo + hi * hi
        self.last[g], self.size[g] = ts, size
        if self.tail is None:
            self.tail = ts
        self.refresh_one(g)
        return int(g)

    # ------------------------------------------------------------ window arithmetic

    def drop_oldest(self, g: int) -> None:
        """Remove group g's oldest interval (its window is full); the scalar path."""
        self.solo = None
        k = int(self.seeds[g])
        if k:
            old = self.c.lo if k == 2 else self.c.hi
            self.seeds[g] = k - 1
        elif self.oend[g] > self.ostart[g]:
            o = int(self.ostart[g])
            old = int(self.log.buf[o - self.log.base])
            self.ostart[g] = o + 1
        elif self.plen[g]:
            p = int(self.pstart[g])
            old = int(self.priv.buf[p])
            self.pstart[g] = p + 1
            self.plen[g] -= 1
        else:
            s = int(self.start[g])
            old = int(self.log.buf[s - self.log.base])
            self.start[g] = s + 1
        self.n[g] -= 1
        self.s1[g] -= old
        self.s2[g] -= old * old

    def take_own(self, g: int, interval: int | None, copy: bool = False) -> None:
        """Group g leaves the log: it takes `interval` alone (None: it skips this heartbeat's
        interval) and continues on the log from its current end. Its window so far stays where it
        is when it can: its log slice becomes its older segment if it had none (the usual case: one
        missed or skipped interval, no copy); otherwise, or with `copy`, the older segment, private
        prefix and log slice are copied into one new private prefix."""
        self.solo = None
        self.synced = False
        a, b = int(self.start[g]), int(self.end[g])
        self.start[g] = self.end[g] = self.log.size
        if b == a and interval is None and not copy:
            return
        oa, ob = int(self.ostart[g]), int(self.oend[g])
        p, k = int(self.pstart[g]), int(self.plen[g])
        base = self.log.base
        if not copy and ob == oa and k == 0:
            self.ostart[g], self.oend[g] = a, b
            own = np.empty(0, dtype=np.int64)
        else:
            own = np.concatenate([self.log.buf[oa - base : ob - base], self.priv.buf[p : p + k],
                                  self.log.buf[a - base : b - base]])
            self.ostart[g] = self.oend[g] = self.log.size
        if interval is not None:
            if interval > self.c.exact_limit:
                self._make_wide()
            if self.n[g] >= self.c.opts.max_sample_size:  # the oldest interval leaves the window
                seeds, oa = int(self.seeds[g]), int(self.ostart[g])
                if seeds:
                    old = self.c.lo if seeds == 2 else self.c.hi
                    self.seeds[g] = seeds - 1
                elif self.oend[g] > oa:
                    old = int(self.log.buf[oa - base])
                    self.ostart[g] = oa + 1
                else:
                    old, own = int(own[0]), own[1:]
                self.n[g] -= 1
                self.s1[g] -= old
                self.s2[g] -= old * old
            own = np.append(own, interval)
            self.n[g] += 1
            self.s1[g] += interval
            self.s2[g] += interval * interval
        self.pstart[g] = self.priv.write(own) if own.size else 0
        self.plen[g] = own.size
        self.tidy_private()

    def extend(self, g: Idx | slice, x: int) -> None:
        """Aligned groups `g` take log entry `x`, the newest, already appended."""
        self.solo = None
        n = self.n[g]
        full = np.flatnonzero(n >= self.c.opts.max_sample_size)
        f = full if isinstance(g, slice) else g[full]
        if 0 < f.size <= SCALAR_DROPS:  # a few full windows (joined apart: the met ones): one by one
            for r in f.tolist():
                self.drop_oldest(r)
        elif f.size:
            seeds, plen = self.seeds[f], self.plen[f]
            older = self.oend[f] > self.ostart[f]
            plain = f[(seeds == 0) & ~older & (plen == 0)]
            if plain.size:  # the common case: the log entry at start leaves the window
                old: Any = self.log.at(self.start[plain])
                if self.wide:
                    old = old.astype(object)
                self.start[plain] += 1
                self.s1[plain] -= old
                self.s2[plain] -= old * old
                self.n[plain] -= 1
            seeded = f[seeds > 0]
            if seeded.size:
                k = self.seeds[seeded]
                old = np.where(k == 2, self.c.lo, self.c.hi).astype(object if self.wide else np.int64)
                self.seeds[seeded] = k - 1
                self.s1[seeded] -= old
                self.s2[seeded] -= old * old
                self.n[seeded] -= 1
            aged = f[(seeds == 0) & older]
            if aged.size:  # the oldest entry of the older log segment leaves the window
                old = self.log.at(self.ostart[aged])
                if self.wide:
                    old = old.astype(object)
                self.ostart[aged] += 1
                self.s1[aged] -= old
                self.s2[aged] -= old * old
                self.n[aged] -= 1
            own = f[(seeds == 0) & ~older & (plen > 0)]
            if own.size:  # the oldest entry of the private prefix leaves the window
                old = self.priv.buf[self.pstart[own]]
                if self.wide:
                    old = old.astype(object)
                self.pstart[own] += 1
                self.plen[own] -= 1
                self.s1[own] -= old
                self.s2[own] -= old * old
                self.n[own] -= 1
        self.end[g] += 1
        self.n[g] += 1
        self.s1[g] += x
        self.s2[g] += x * x

    # ------------------------------------------------------------ heartbeats

    def beat(self, groups: Idx, ts: int) -> None:
        """Every member of `groups` heartbeats at `ts` (groups whose last is later are skipped)."""
        self.solo = None
        self.synced = False
        groups = groups[self.last[groups] <= ts]  # the reference ignores a heartbeat older than the last
        if groups.size == 0:
            return
        if self.log.full():
            self._trim()
        tail, m = self.tail, self.log.size
        assert tail is not None
        aligned = (self.last[groups] == tail) & (self.end[groups] == m)
        due = self.due[groups]
        avail = ts < due
        unsure = ~avail
        if unsure.any():
            u = groups[unsure]
            avail[unsure] = ~at_or_above(
                (ts - self.last[u]).astype(np.float64), self.mean[u], self.std[u], self.c.opts.threshold
            )
        take = groups[aligned & avail]
        if take.size:
            x = ts - tail
            if x > self.c.exact_limit:
                self._make_wide()
            self.log.append(x)
            self.extend(take, x)
        for g in groups[aligned & ~avail].tolist():
            self.take_own(g, None)  # it skips the interval the others take
        lag = ~aligned
        for g, ok in zip(groups[lag].tolist(), avail[lag].tolist()):
            self.take_own(g, ts - int(self.last[g]) if ok else None)
        self.last[groups] = ts
        if ts >= tail:
            self.tail = ts
        self.refresh(groups)

    def beat_all(self, ts: int) -> bool:
        """The steady state: every group aligned, all available, ts not behind. False if not so."""
        tail = self.tail
        if tail is None or ts < tail or ts >= self.min_due or self.dead:
            return False
        if self.synced:
            pass
        elif self.size.size == 1:
            if self.last[0] != tail or self.end[0] != self.log.size:
                return False
        elif not ((self.last == tail).all() and (self.end == self.log.size).all()):
            return False
        x = ts - tail
        if x > self.c.exact_limit:
            return False
        if self.log.full():
            self._trim()  # every group is aligned: nothing is copied, the log only shrinks or grows
        self.log.append(x)
        self.tail = ts
        self.synced = True
        if self.size.size == 1:
            self._take_one(x, ts)
            return True
        self.extend(slice(None), x)
        self.last[:] = ts
        self.refresh(slice(None))
        return True

    def _take_one(self, x: int, ts: int) -> None:
        """`extend` and `refresh` of a datanode with one group, in Python numbers (the best case).
        Once the group is converged (full window, all on the log) its state is kept in `solo`."""
        cap = self.c.opts.max_sample_size
        solo = self.solo
        if solo is None:
            if self.seeds[0] or self.plen[0] or self.oend[0] > self.ostart[0] or self.n[0] < cap:
                if self.n[0] >= cap:
                    self.drop_oldest(0)
                self.end[0] += 1
                self.n[0] += 1
                self.s1[0] += x
                self.s2[0] += x * x
                self.last[0] = ts
                self.refresh_one(0)
                self.min_due = int(self.due[0])
                self.interval = float(self.s1[0] / self.n[0])
                return
            solo = self.solo = [int(self.start[0]), int(self.end[0]), int(self.s1[0]), int(self.s2[0])]
        start, end, s1, s2 = solo
        old = int(self.log.buf[start - self.log.base])
        s1 += x - old
        s2 += x * x - old * old
        solo[:] = start + 1, end + 1, s1, s2
        self.start[0], self.end[0], self.s1[0], self.s2[0], self.last[0] = start + 1, end + 1, s1, s2, ts
        mean, std = stats_from_sums(cap, s1, s2, self.c.opts)
        self.mean[0], self.std[0] = mean, std
        self.due[0] = self.min_due = self.due_at(ts, mean, std)
        self.interval = s1 / cap

    def _trim(self) -> None:
        """The log's buffer is full: drop what no window needs (groups pinning entries two windows
        old get their window copied into a private prefix first), and grow if still needed."""
        m, cap = self.log.size, self.c.opts.max_sample_size
        live = self.size > 0
        cur = live & (self.end > self.start)
        old = live & (self.oend > self.ostart)
        behind = np.flatnonzero((cur & (self.start < m - 2 * cap)) | (old & (self.ostart < m - 2 * cap)))
        for g in behind.tolist():  # not heartbeat for two windows: off the log for good
            self.take_own(g, None, copy=True)
        if behind.size:
            cur = live & (self.end > self.start)
            old = live & (self.oend > self.ostart)
        firsts = [m]
        if cur.any():
            firsts.append(int(self.start[cur].min()))
        if old.any():
            firsts.append(int(self.ostart[old].min()))
        self.log.keep_from(min(firsts))
