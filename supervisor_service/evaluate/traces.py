"""Heartbeat traces to replay: generated from a seed (`TRACE_KINDS`) or read from a CSV.

A `Trace` is the heartbeat arrivals at the supervisor (stamped at arrival, as
the service stamps them with its own clock) and the truth the scoring needs:
which datanode was down when, when the supervisor itself stalled, when an
operator moved regions back.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from supervisor_service.core import as_region_array

HOUR_MS = 3_600_000
NEVER = 2**62
Window = tuple[int, int]  # [start, end) in ms


class TraceError(ValueError):
    """A recorded trace that cannot be replayed; the message names the line."""


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """The shape of generated traces: fleet size, heartbeat interval, length and seed."""

    datanodes: int = 20
    regions: int = 10
    interval_ms: int = 3000
    hours: float = 1.0
    seed: int = 1

    @property
    def duration_ms(self) -> int:
        return int(self.hours * HOUR_MS)


@dataclass(slots=True)
class Trace:
    """Heartbeat arrivals at the supervisor, and the truth about which datanode was down when."""

    name: str
    description: str
    duration_ms: int
    arrivals: list[tuple[int, int]]  # (arrival ms, datanode), sorted by time
    regions: dict[int, np.ndarray]  # datanode -> the regions it holds at the start
    down: dict[int, list[Window]] = field(default_factory=dict)  # datanode -> crash windows
    stalls: list[Window] = field(default_factory=list)  # the supervisor itself stopped
    recorded: dict[int, list[np.ndarray]] | None = None  # CSV traces: the regions of each arrival
    rebalances: list[tuple[int, int]] = field(default_factory=list)  # (ms, datanode): regions moved back
    no_failover_expected: bool = False  # nothing is really gone: any failover is a mistake
    detection_scored: bool = True  # its crashes count towards T_D (not so for flapping: damped on purpose)

    @property
    def datanodes(self) -> int:
        return len(self.regions)

    def is_down(self, datanode_id: int, at_ms: int, grace_ms: int = 0) -> bool:
        return any(start <= at_ms < end + grace_ms for start, end in self.down.get(datanode_id, ()))


def _poisson_windows(rng, duration_ms: int, per_hour: float, lengths_ms: tuple[int, int]) -> list[Window]:
    """Non-overlapping windows starting at Poisson times, lengths uniform in `lengths_ms`."""
    windows, t = [], 0.0
    while per_hour > 0:
        t += rng.exponential(HOUR_MS / per_hour)
        start = int(t)
        length = int(rng.uniform(*lengths_ms))
        if start + length >= duration_ms:
            break
        windows.append((start, start + length))
        t = start + length
    return windows


def inside(windows: Sequence[Window], t: int) -> Window | None:
    """The window of `windows` that holds `t`, or None."""
    for window in windows:
        if window[0] <= t < window[1]:
            return window
    return None


@dataclass(slots=True)
class _Node:
    """One generated datanode's troubles: stopped (paused, crashed), delayed, cut off."""

    pauses: list[Window] = field(default_factory=list)  # sends nothing, sends at once on resume
    down: list[Window] = field(default_factory=list)  # crashed: nothing until restart
    delays: list[Window] = field(default_factory=list)  # sent messages arrive at the window's end
    cut: list[Window] = field(default_factory=list)  # sent messages are lost
    rebalances: list[int] = field(default_factory=list)  # its original regions are moved back to it


def _arrivals(rng, cfg: TraceConfig, node: _Node, stalls: list[Window]) -> list[int]:
    """One datanode's heartbeat arrival times at the supervisor."""
    interval, end = cfg.interval_ms, cfg.duration_ms
    sends, t = [], float(rng.uniform(0, interval))
    while t < end:
        sends.append(int(t))
        t += max(interval / 2, rng.normal(interval, 0.05 * interval))  # 5% jitter
    stopped = sorted(node.pauses + node.down)
    sends = [s for s in sends if inside(stopped, s) is None]
    sends += [e for _, e in stopped if e < end]  # a resumed or restarted datanode reports at once
    arrivals, last = [], 0
    for sent in sorted(sends):
        if inside(node.cut, sent) is not None:
            continue
        at = sent + 1 + int(rng.exponential(2.0))  # loopback-to-LAN delay
        spike = inside(node.delays, sent)
        if spike is not None:
            at = max(at, spike[1] + int(rng.uniform(0, 50)))
        stall = inside(stalls, at)
        if stall is not None:
            # Stamped when the supervisor runs again, as it drains the backlog of every stream.
            at = stall[1] + int(rng.uniform(0, 500))
        last = max(last, at)  # one stream: in order
        if last < end:
            arrivals.append(last)
    return arrivals


def _initial_regions(cfg: TraceConfig) -> dict[int, np.ndarray]:
    return {
        d: np.array([((1024 + d) << 32) | n for n in range(cfg.regions)], dtype=np.uint64)
        for d in range(1, cfg.datanodes + 1)
    }


def _build(name: str, description: str, cfg: TraceConfig, shape: Callable, *, no_failover: bool) -> Trace:
    """A trace whose troubles `shape(rng, cfg, nodes, stalls)` fills in."""
    rng = np.random.default_rng([cfg.seed, sum(name.encode())])
    nodes = {d: _Node() for d in range(1, cfg.datanodes + 1)}
    stalls: list[Window] = []
    shape(rng, cfg, nodes, stalls)
    arrivals = sorted((t, d) for d, node in nodes.items() for t in _arrivals(rng, cfg, node, stalls))
    return Trace(
        name=name,
        description=description,
        duration_ms=cfg.duration_ms,
        arrivals=arrivals,
        regions=_initial_regions(cfg),
        down={d: node.down for d, node in nodes.items() if node.down},
        stalls=stalls,
        rebalances=sorted((t, d) for d, node in nodes.items() for t in node.rebalances),
        no_failover_expected=no_failover,
        detection_scored=name != "flapping",
    )


def _steady(rng, cfg, nodes, stalls) -> None:
    pass


def _delay_spikes(rng, cfg, nodes, stalls) -> None:
    shared = _poisson_windows(rng, cfg.duration_ms, 3, (1000, 8000))  # the supervisor's own link
    for node in nodes.values():
        node.delays = sorted(_poisson_windows(rng, cfg.duration_ms, 4, (1000, 8000)) + shared)


def _datanode_pauses(rng, cfg, nodes, stalls) -> None:
    for node in nodes.values():
        node.pauses = _poisson_windows(rng, cfg.duration_ms, 4, (1000, 9000))


def _long_pauses(rng, cfg, nodes, stalls) -> None:
    for node in nodes.values():
        node.pauses = _poisson_windows(rng, cfg.duration_ms, 1, (10_000, 30_000))


def _supervisor_stalls(rng, cfg, nodes, stalls) -> None:
    stalls.extend(_poisson_windows(rng, cfg.duration_ms, 6, (5000, 30_000)))


def _partition(rng, cfg, nodes, stalls) -> None:
    ids = sorted(nodes)
    for start, end in _poisson_windows(rng, cfg.duration_ms, 3, (20_000, 90_000)):
        # Alternately the whole fleet and 60% of it is cut off from the supervisor.
        cut = ids if rng.random() < 0.5 else list(rng.choice(ids, size=math.ceil(0.6 * len(ids)), replace=False))
        for d in cut:
            nodes[int(d)].cut.append((start, end))


def _spread_times(rng, cfg: TraceConfig, count: int, gap_ms: int) -> list[int]:
    """`count` crash times in the middle of the trace, at least `gap_ms` apart."""
    span = (cfg.duration_ms // 10, cfg.duration_ms * 9 // 10)
    slots = max(1, (span[1] - span[0]) // gap_ms)
    picks = rng.choice(slots, size=min(count, slots), replace=False)
    return sorted(span[0] + int(p) * gap_ms + int(rng.uniform(0, gap_ms // 2)) for p in picks)


def _crashes(rng, cfg, nodes, stalls) -> None:
    count = max(1, cfg.datanodes // 4)
    victims = rng.choice(sorted(nodes), size=count, replace=False)
    for d, at in zip(victims, _spread_times(rng, cfg, count, 120_000)):
        nodes[int(d)].down.append((at, NEVER))


def _flapping(rng, cfg, nodes, stalls) -> None:
    for d in rng.choice(sorted(nodes), size=min(2, len(nodes)), replace=False):
        node, t = nodes[int(d)], float(rng.uniform(60_000, 300_000))
        while True:
            down = int(rng.uniform(20_000, 60_000))
            if t + down >= cfg.duration_ms:
                break
            node.down.append((int(t), int(t) + down))
            node.rebalances.append(int(t) + down + 60_000)  # the operator moves its regions back
            t += down + rng.uniform(120_000, 300_000)


def _mixed(rng, cfg, nodes, stalls) -> None:
    _delay_spikes(rng, cfg, nodes, stalls)
    _datanode_pauses(rng, cfg, nodes, stalls)
    count = max(1, cfg.datanodes // 6)
    victims = rng.choice(sorted(nodes), size=count, replace=False)
    for d, at in zip(victims, _spread_times(rng, cfg, count, 180_000)):
        node = nodes[int(d)]
        node.pauses = [w for w in node.pauses if w[1] <= at]
        node.down.append((at, NEVER))


TRACE_KINDS: dict[str, tuple[Callable, bool, str]] = {
    "steady": (_steady, True, "heartbeats every interval with 5% jitter"),
    "delay_spikes": (_delay_spikes, True, "network delay spikes of 1-8 s, per datanode and at the supervisor"),
    "datanode_pauses": (_datanode_pauses, True, "datanode GC pauses of 1-9 s (below acceptable_heartbeat_pause)"),
    "supervisor_stalls": (_supervisor_stalls, True, "the supervisor itself stalls for 5-30 s"),
    "partition": (_partition, True, "the supervisor cut off from all or 60% of the datanodes for 20-90 s"),
    "long_pauses": (_long_pauses, False, "datanode GC pauses of 10-30 s (beyond acceptable_heartbeat_pause)"),
    "crashes": (_crashes, False, "a quarter of the datanodes crash for good, two minutes or more apart"),
    "flapping": (_flapping, False, "two datanodes crash for 20-60 s, come back and get their regions back "
                 "a minute later, again and again"),
    "mixed": (_mixed, False, "delay spikes and short pauses, while a sixth of the datanodes crash"),
}


def generate(kind: str, cfg: TraceConfig) -> Trace:
    shape, no_failover, description = TRACE_KINDS[kind]
    return _build(kind, description, cfg, shape, no_failover=no_failover)


def load_csv(path: str | Path, gone_after_ms: int = 60_000) -> Trace:
    """A recorded trace: rows of `datanode_id,region_id,timestamp_ms` (a header line is allowed).

    Rows of one datanode with the same timestamp form one heartbeat. There is
    no record of crashes, so a datanode counts as down from its last heartbeat
    on when it stays silent for the last `gone_after_ms` of the trace, and any
    failover of a datanode that heartbeats again later counts as a mistake.
    """
    beats: dict[tuple[int, int], list[int]] = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#"):
                continue
            try:
                datanode_id, region_id, ts = (int(v) for v in row[:3])
            except ValueError:
                if line_no == 1:
                    continue  # a header
                raise TraceError(f"{path}:{line_no}: expected datanode_id,region_id,timestamp_ms; got {row!r}")
            if len(row) < 3 or datanode_id < 0 or region_id < 0 or ts < 0:
                raise TraceError(f"{path}:{line_no}: ids and timestamp must be non-negative integers; got {row!r}")
            beats.setdefault((ts, datanode_id), []).append(region_id)
    if not beats:
        raise TraceError(f"{path}: no heartbeat rows (expected datanode_id,region_id,timestamp_ms)")
    t0 = min(ts for ts, _ in beats)
    keys = sorted(beats)
    arrivals = [(ts - t0, d) for ts, d in keys]
    recorded: dict[int, list[np.ndarray]] = {}
    first: dict[int, np.ndarray] = {}
    for ts, d in keys:
        regions = as_region_array(beats[(ts, d)])
        recorded.setdefault(d, []).append(regions)
        first.setdefault(d, regions)
    duration = arrivals[-1][0] + 1
    last_seen = {d: t for t, d in arrivals}
    down = {d: [(t, NEVER)] for d, t in last_seen.items() if duration - t > gone_after_ms}
    return Trace(
        name=Path(path).stem, description=f"recorded trace {path}", duration_ms=duration,
        arrivals=arrivals, regions=first, down=down, recorded=recorded,
    )
