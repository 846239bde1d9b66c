"""How long ago each datanode was last heard, as a bounded summary published at each tick
(docs/design.md §15): a histogram over datanodes and the few oldest by datanode id.

Never a series per region, nor one per datanode: a thousand datanodes are 14 histogram series and
`OLDEST_HEARTBEATS_REPORTED` gauges. Computed by the supervisor thread from its own table (the
metrics thread only reads what was published).
"""

from __future__ import annotations

import numpy as np

from supervisor_service.core.table import DetectorTable, newest_heartbeats

AGE_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))
"""Upper bounds, in seconds, of the age histogram: around the default 10 s pause, plus the tails."""

OLDEST_HEARTBEATS_REPORTED = 5
"""The oldest this many datanodes are reported by id: who is silent, without a series per datanode."""

AgeSummary = tuple[list[int], int, float, list[tuple[int, float]]]
"""(datanodes per bucket of `AGE_BUCKETS_S`, datanodes, sum of ages, (datanode, age) oldest first)."""


def heartbeat_ages(table: DetectorTable, now: int) -> AgeSummary:
    """The age summary at `now` (ms). A heartbeat stamped after `now` (a client clock ahead) is age 0."""
    ids, newest = newest_heartbeats(table)
    if ids.size == 0:
        return [0] * len(AGE_BUCKETS_S), 0, 0.0, []
    ages = np.maximum(int(now) - newest, 0).astype(np.float64) / 1000.0
    edges = np.asarray(AGE_BUCKETS_S, dtype=np.float64)
    where = np.minimum(np.searchsorted(edges, ages, side="left"), edges.size - 1)
    buckets = np.bincount(where, minlength=edges.size).tolist()
    n = min(OLDEST_HEARTBEATS_REPORTED, ids.size)
    top = np.argpartition(-ages, n - 1)[:n] if ids.size > n else np.arange(ids.size)
    top = top[np.argsort(-ages[top], kind="stable")]
    oldest = [(int(ids[i]), float(ages[i])) for i in top.tolist()]
    return buckets, int(ids.size), float(ages.sum()), oldest
