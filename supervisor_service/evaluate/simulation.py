"""Detection quality: replay heartbeat traces through the real supervisor on a simulated clock.

`supervisor-service evaluate` builds the same `Supervisor` (detector table,
guards, failover rules) the service runs, feeds it heartbeats and ticks in
simulated time, answers its Selector, PeerLookup and RegionMigration calls
in-process (migrations complete after `migration_ms` and really move the
regions to the target datanode), and scores the outcome with the failure
detector quality figures of Chen, Toueg and Aguilera (2002):

- detection time T_D: from a datanode's crash to the first failover
  submitted for it (p50/p99 over every crash);
- mistake rate: failovers of a datanode that was not down, per hour per
  datanode (a failover is every submission for one datanode within
  `BURST_MS` of the previous one: its batches, and regions whose detectors
  crossed a tick later);
- query accuracy P_A: the fraction of (tick, live datanode) pairs on which
  the detector did not hold any of the datanode's regions failed;
- failovers triggered, and regions moved without need.

Traces are generated from a seed (see `TRACE_KINDS`) or read from a CSV of
`datanode_id,region_id,timestamp_ms` rows. Heartbeats are stamped at
arrival, as the service does with its own clock.
"""

from __future__ import annotations

import csv
import heapq
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    Deregister,
    FailoverPolicy,
    Guards,
    GuardSettings,
    Heartbeat,
    MigrationResult,
    MigrationState,
    PhiAccrualOptions,
    PollMigration,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    Supervisor,
    Tick,
    as_region_array,
)
from supervisor_service.remotes import EmbeddedPeerLookup, EmbeddedSelector, PeerDirectory

HOUR_MS = 3_600_000
NEVER = 2**62
Window = tuple[int, int]  # [start, end) in ms
BURST_MS = 30_000  # submissions for one datanode this close together are one failover


class TraceError(ValueError):
    """A recorded trace that cannot be replayed; the message names the line."""


# ---------------------------------------------------------------- traces


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


def _inside(windows: Sequence[Window], t: int) -> Window | None:
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
    sends = [s for s in sends if _inside(stopped, s) is None]
    sends += [e for _, e in stopped if e < end]  # a resumed or restarted datanode reports at once
    arrivals, last = [], 0
    for sent in sorted(sends):
        if _inside(node.cut, sent) is not None:
            continue
        at = sent + 1 + int(rng.exponential(2.0))  # loopback-to-LAN delay
        spike = _inside(node.delays, sent)
        if spike is not None:
            at = max(at, spike[1] + int(rng.uniform(0, 50)))
        stall = _inside(stalls, at)
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


# ---------------------------------------------------------------- the simulation


@dataclass(frozen=True, slots=True)
class Variant:
    """What the supervisor under test is built with."""

    label: str
    opts: PhiAccrualOptions
    guards: GuardSettings | None
    policy: FailoverPolicy
    tick_ms: int = 1000
    alive_window_ms: int = 10_000


@dataclass(slots=True)
class RunResult:
    trace: str
    variant: str
    detection_scored: bool
    datanodes: int
    hours: float
    crashes: int  # crash episodes that could be detected (the datanode held regions)
    detection_ms: list[int]  # crash to first failover, per detected episode
    missed: int  # episodes with no failover before the datanode came back
    mistakes: int  # failovers of a datanode that was not down
    wrong_regions: int  # regions those moved
    failovers: int  # every failover (submissions for one datanode within BURST_MS are one)
    live_ticks: int  # (tick, live datanode with detectors) pairs
    suspected_ticks: int  # ... on which some of its regions were failed

    @property
    def mistake_rate(self) -> float:
        """False failovers per hour per datanode."""
        return self.mistakes / max(self.hours * self.datanodes, 1e-9)

    @property
    def query_accuracy(self) -> float:
        return 1.0 - self.suspected_ticks / self.live_ticks if self.live_ticks else 1.0


class _Remotes:
    """In-process Selector, PeerLookup and RegionMigration; migrations move regions after a delay."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.directory = PeerDirectory(sim)
        self.lookup = EmbeddedPeerLookup(self.directory)
        self.selector = EmbeddedSelector(self.directory, sim.variant.alive_window_ms)
        self.finished: dict[str, int] = {}  # procedure -> completion time

    def run(self, effect, now: int):
        """The result event of `effect`, as the runtime's workers would report it."""
        match effect:
            case SelectPeers(job):
                peers = self.selector.select(
                    len(job.region_ids), {job.datanode_id, *job.exclude_targets}, job.datanode_id, job.region_ids
                )
                return SelectionDone(job, from_peer=self.lookup.get_datanode(job.datanode_id), peers=tuple(peers))
            case SubmitMigration(task):
                procedure_id = f"sim-{task.task_id}"
                done_at = now + self._sim.migration_ms
                self.finished[procedure_id] = done_at
                self._sim.record_failover(task, now)
                self._sim.schedule(done_at, _Move(task.datanode_id, task.to_peer.id, task.region_ids))
                return SubmissionDone(task, MigrationResult(submitted=task.region_ids, procedure_id=procedure_id))
            case PollMigration(procedure_id):
                done = now >= self.finished.get(procedure_id, NEVER)
                return StatusPolled(procedure_id, MigrationState.SUCCEEDED if done else MigrationState.RUNNING)
        raise TypeError(f"unexpected effect {effect!r}")


@dataclass(frozen=True, slots=True)
class _Rebalance:
    """An operator moves a datanode's original regions back to it (and deregisters them where they were)."""

    datanode_id: int


@dataclass(frozen=True, slots=True)
class _Move:
    """A migration completes: the regions are served by the target from now on."""

    from_id: int
    to_id: int
    region_ids: tuple[int, ...]


class Simulation:
    """One trace through one supervisor variant, in simulated milliseconds."""

    def __init__(self, trace: Trace, variant: Variant, *, migration_ms: int = 5000, call_latency_ms: int = 10):
        self.trace, self.variant = trace, variant
        self.migration_ms, self.latency = migration_ms, call_latency_ms
        self._now = 0
        metrics = Metrics(CollectorRegistry())
        guards = Guards(variant.guards) if variant.guards is not None else None
        self.supervisor = Supervisor(variant.opts, metrics, variant.policy, guards=guards)
        self.remotes = _Remotes(self)
        self.holding = {d: r.copy() for d, r in trace.regions.items()}
        self._heap: list[tuple[int, int, object]] = []
        self._seq = 0
        self._last_failover: dict[int, int] = {}  # datanode -> ms of its last submission
        self._first_detection: dict[tuple[int, int], int] = {}  # crash window -> first failover
        for at, d in trace.rebalances:
            self.schedule(at, _Rebalance(d))
        self._sizes = {d: [(0, int(r.size))] for d, r in trace.regions.items()}  # datanode -> (ms, regions held)
        self.failovers = self.mistakes = self.wrong_regions = 0
        self.live_ticks = self.suspected_ticks = 0

    # Clock protocol, for the PeerDirectory.
    def now_ms(self) -> int:
        return self._now

    def monotonic(self) -> float:
        return self._now / 1000.0

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("the simulation does not sleep")

    def schedule(self, at: int, item: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, item))

    def record_failover(self, task, now: int) -> None:
        d = task.datanode_id
        window = next((w for w in self.trace.down.get(d, ()) if w[0] <= now < w[1] + self.variant.tick_ms), None)
        if window is None:
            self.wrong_regions += len(task.region_ids)
        last = self._last_failover.get(d)
        self._last_failover[d] = now
        if last is not None and now - last <= BURST_MS:
            return  # the same failover: another batch, or regions that crossed a tick later
        self.failovers += 1
        if window is None:
            self.mistakes += 1
        else:
            self._first_detection.setdefault((d, window[0]), now)

    def _tick_times(self) -> Iterable[tuple[int, float]]:
        """(time, lateness) of every tick; ticks due during a supervisor stall collapse into one at its end."""
        step, t = self.variant.tick_ms, self.variant.tick_ms
        while t < self.trace.duration_ms:
            stall = _inside(self.trace.stalls, t)
            if stall is None:
                yield t, 0.0
                t += step
                continue
            due = t + (stall[1] - t) // step * step
            yield stall[1], float(stall[1] - due)
            t = due + step  # the first tick due after the stall

    def run(self) -> RunResult:
        trace, sup = self.trace, self.supervisor
        replay = {d: iter(beats) for d, beats in (trace.recorded or {}).items()}
        ticks = iter(self._tick_times())
        next_tick = next(ticks, None)
        arrivals = trace.arrivals
        i = 0
        while True:
            t_arrival = arrivals[i][0] if i < len(arrivals) else NEVER
            t_tick = next_tick[0] if next_tick is not None else NEVER
            t_heap = self._heap[0][0] if self._heap else NEVER
            now = min(t_arrival, t_tick, t_heap)
            if now >= trace.duration_ms or now == NEVER:
                break
            self._now = now
            if t_heap == now:  # call results first, then the tick, then heartbeats
                _, _, item = heapq.heappop(self._heap)
                self._apply_result(item, now)
            elif t_tick == now:
                self._tick(now, next_tick[1])
                next_tick = next(ticks, None)
            else:
                d = arrivals[i][1]
                i += 1
                regions = next(replay[d]) if d in replay else self.holding.get(d)
                self.remotes.directory.observe(d, f"10.0.0.{d}:4001")
                if regions is not None and regions.size:
                    sup.handle(Heartbeat(d, regions, now), now)
                    sup.drain_changes()
        scored = {
            (d, start) for d, windows in trace.down.items() for start, _ in windows
            if (d, start) in self._first_detection or self._held_at(d, start)
        }
        detected = [t - start for (d, start), t in self._first_detection.items()]
        crashes = len(scored)
        return RunResult(
            trace=trace.name, variant=self.variant.label, detection_scored=trace.detection_scored,
            datanodes=trace.datanodes, hours=trace.duration_ms / HOUR_MS, crashes=crashes, detection_ms=sorted(detected),
            missed=crashes - len(detected), mistakes=self.mistakes, wrong_regions=self.wrong_regions,
            failovers=self.failovers,
            live_ticks=self.live_ticks, suspected_ticks=self.suspected_ticks,
        )

    def _held_at(self, datanode_id: int, at_ms: int) -> bool:
        """Whether the datanode held any region at `at_ms` (a crash of an empty one cannot be detected)."""
        held = False
        for t, size in self._sizes.get(datanode_id, ()):
            if t > at_ms:
                break
            held = size > 0
        return held

    def _tick(self, now: int, lag_ms: float) -> None:
        sup = self.supervisor
        sup.handle(Tick(lag_ms=lag_ms), now)
        sup.drain_changes()
        for effect in sup.drain_outbox():
            self.schedule(now + self.latency, effect)
        failed = sup.last_failed
        for d, regions in self.holding.items():
            if regions.size and not self.trace.is_down(d, now):
                self.live_ticks += 1
                self.suspected_ticks += d in failed

    def _move(self, from_id: int, to_id: int, regions: np.ndarray, now: int) -> None:
        empty = np.empty(0, dtype=np.uint64)
        self.holding[from_id] = np.setdiff1d(self.holding.get(from_id, empty), regions)
        self.holding[to_id] = np.union1d(self.holding.get(to_id, empty), regions)
        for d in (from_id, to_id):
            self._sizes.setdefault(d, [(0, 0)]).append((now, int(self.holding[d].size)))

    def _apply_result(self, item: object, now: int) -> None:
        sup = self.supervisor
        if isinstance(item, _Move):
            self._move(item.from_id, item.to_id, np.asarray(item.region_ids, dtype=np.uint64), now)
            return
        if isinstance(item, _Rebalance):
            home = self.trace.regions[item.datanode_id]
            for d in list(self.holding):
                away = np.intersect1d(self.holding[d], home) if d != item.datanode_id else ()
                if len(away):
                    self._move(d, item.datanode_id, away, now)
                    sup.handle(Deregister(tuple((d, int(r)) for r in away)), now)
                    sup.drain_changes()
            return
        if isinstance(item, (SelectPeers, SubmitMigration, PollMigration)):
            self.schedule(now + self.latency, self.remotes.run(item, now))
            return
        sup.handle(item, now)
        sup.drain_changes()
        for effect in sup.drain_outbox():
            self.schedule(now + self.latency, effect)


# ---------------------------------------------------------------- evaluation and report


def _td_seconds(detection_ms: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of detection times (the value at or below which q% of them lie), in s."""
    if not detection_ms:
        return None
    ordered = sorted(detection_ms)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] / 1000


@dataclass(frozen=True, slots=True)
class Point:
    """One setting of the sweep: a threshold and an acceptable pause, with guards on or off."""

    threshold: float
    pause_ms: float
    guards: bool

    @property
    def label(self) -> str:
        return f"phi {self.threshold:g}, pause {self.pause_ms / 1000:g} s, guards {'on' if self.guards else 'off'}"


def variant_of(settings, point: Point | None = None, *, guards: bool = True) -> Variant:
    """The supervisor `settings` configure, with the point's threshold, pause and guard switch."""
    if point is not None:
        settings = settings.model_copy(
            update={"phi_threshold": point.threshold, "acceptable_heartbeat_pause_ms": point.pause_ms}
        )
        guards = point.guards
    policy = settings.failover_policy()
    if not guards:
        policy = replace(policy, failover_count_decay_ms=0)  # the service ties count decay to the guards
    return Variant(
        label="guards on" if guards else "guards off",
        opts=settings.detector_options(),
        guards=settings.guard_settings() if guards else None,
        policy=policy,
        tick_ms=settings.tick_interval_ms,
        alive_window_ms=settings.selector_alive_window,
    )


def _run(job: tuple[Trace, Variant]) -> RunResult:
    logging.disable(logging.CRITICAL)  # a worker process: the supervisor's failover log lines are noise here
    return Simulation(*job).run()


def run_all(jobs: list[tuple[Trace, Variant]], processes: int = 0) -> list[RunResult]:
    """Every (trace, variant) run, on `processes` worker processes (0: one per core; 1: in this one)."""
    processes = processes or multiprocessing.cpu_count()
    if processes <= 1 or len(jobs) <= 1:
        previous = logging.root.manager.disable
        try:
            return [_run(job) for job in jobs]
        finally:
            logging.disable(previous)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_run, jobs, chunksize=1)


@dataclass(slots=True)
class Summary:
    """Figures over several runs."""

    runs: list[RunResult]

    def _sum(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs)

    @property
    def detection_ms(self) -> list[int]:
        """Detection times over the runs whose crashes are scored (not flapping: damped on purpose)."""
        return sorted(t for r in self.runs if r.detection_scored for t in r.detection_ms)

    @property
    def crashes(self) -> int:
        return sum(r.crashes for r in self.runs if r.detection_scored)

    @property
    def mistakes(self) -> int:
        return self._sum("mistakes")

    @property
    def flapping_failovers(self) -> int | None:
        runs = [r.failovers for r in self.runs if not r.detection_scored]
        return sum(runs) if runs else None

    @property
    def datanode_hours(self) -> float:
        return sum(r.hours * r.datanodes for r in self.runs)

    @property
    def mistake_rate(self) -> float:
        return self.mistakes / self.datanode_hours if self.datanode_hours else 0.0

    @property
    def query_accuracy(self) -> float:
        live = self._sum("live_ticks")
        return 1.0 - self._sum("suspected_ticks") / live if live else 1.0

    def td(self, q: float) -> float | None:
        return _td_seconds(self.detection_ms, q)


@dataclass(slots=True)
class Report:
    """Everything `evaluate` found; `markdown()` is the committed report."""

    cfg: TraceConfig | None
    traces: list[Trace]
    per_trace: dict[str, dict[bool, RunResult]]  # trace -> guards on? -> result (default settings)
    sweep: dict[Point, Summary]
    default: Point
    command: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def markdown(self, plot_name: str | None) -> str:
        out = ["# Detection quality", ""]
        out.append(f"Produced by `{self.command}`: every number below comes from that command, and the same "
                   "command with the same seed gives the same numbers.")
        out.append("")
        if self.cfg is not None:
            c = self.cfg
            out.append(f"Traces: {c.datanodes} datanodes x {c.regions} regions, heartbeat every "
                       f"{c.interval_ms / 1000:g} s, {c.hours:g} h each, seed {c.seed}; supervisor settings as "
                       f"the service's defaults unless a row says otherwise ({self.default.label}).")
            out.append("")
        out.append("| trace | what happens | guards | failovers | false failovers | regions moved needlessly "
                   "| mistake rate /h/datanode | crashes detected | T_D p50 / p99 s | P_A |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for trace in self.traces:
            for guards in (True, False):
                r = self.per_trace[trace.name][guards]
                detected = f"{len(r.detection_ms)} / {r.crashes}" if r.crashes else "-"
                out.append(
                    f"| {trace.name} | {trace.description} | {'on' if guards else 'off'} | {r.failovers} "
                    f"| {r.mistakes} | {r.wrong_regions} | {r.mistake_rate:.3f} | {detected} "
                    f"| {_fmt(_td_seconds(r.detection_ms, 50))} / {_fmt(_td_seconds(r.detection_ms, 99))} "
                    f"| {r.query_accuracy:.5f} |"
                )
        out += ["", "## Checks", ""]
        for name, ok, detail in self.checks:
            out.append(f"- **{'PASS' if ok else 'FAIL'}** {name}: {detail}")
        out += ["", "## Sweep", ""]
        out.append("Every trace above, run again for each setting. T_D and crashes detected are over the "
                   "crashes of every trace but flapping (whose failovers are damped on purpose: its row above "
                   "shows what that costs); false failovers and the mistake rate are over all traces; "
                   "flapping failovers counts the failovers of the flapping trace.")
        out.append("")
        out.append("| phi threshold | acceptable pause s | guards | T_D p50 / p99 s | crashes detected "
                   "| false failovers | mistake rate /h/datanode | flapping failovers | P_A |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for point, summary in sorted(self.sweep.items(), key=lambda kv: (kv[0].pause_ms, kv[0].threshold,
                                                                          not kv[0].guards)):
            mark = " (default)" if (point.threshold, point.pause_ms) == (self.default.threshold,
                                                                         self.default.pause_ms) else ""
            out.append(
                f"| {point.threshold:g}{mark} | {point.pause_ms / 1000:g} | {'on' if point.guards else 'off'} "
                f"| {_fmt(summary.td(50))} / {_fmt(summary.td(99))} | {len(summary.detection_ms)} / "
                f"{summary.crashes} | {summary.mistakes} | {summary.mistake_rate:.3f} "
                f"| {_fmt_int(summary.flapping_failovers)} | {summary.query_accuracy:.5f} |"
            )
        if plot_name:
            out += ["", f"![detection time against mistake rate]({plot_name})"]
        out += ["", "## How to read it", "", *_READING]
        return "\n".join(out) + "\n"


_READING = [
    "- **T_D** (detection time): from the moment a datanode crashes to the first failover submitted "
    "for its regions. Heartbeats are stamped at arrival, ticks run every tick interval, remote calls "
    "take 10 ms and a migration 5 s.",
    "- **false failover**: a failover of a datanode that was not down (submissions for one datanode "
    "within 30 s of each other are one failover). The **mistake rate** is false failovers per hour per "
    "datanode (Chen, Toueg and Aguilera's λ_M).",
    "- **P_A** (query accuracy): the fraction of (tick, live datanode) pairs on which no region of the "
    "datanode was at or above the threshold. The guards do not change what the detector suspects, only "
    "what the supervisor does about it; P_A reads slightly higher without them because a datanode failed "
    "over by mistake loses its regions and is no longer scored.",
    "- **crashes detected**: crashes of datanodes that held regions, and how many were failed over "
    "before the datanode came back. On the flapping trace a datanode that comes back before its "
    "backoff ends is not failed over at all: that is the damping, not a miss.",
    "- The long_pauses trace freezes datanodes for longer than `acceptable_heartbeat_pause`: the "
    "detector is meant to convict them, and the guards are not meant to stop that.",
]


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


DEFAULT_THRESHOLDS = (1.0, 2.0, 4.0, 8.0, 12.0, 16.0)
DEFAULT_PAUSES_MS = (3000.0, 5000.0, 7500.0, 10_000.0, 15_000.0)


def evaluate(
    settings,
    traces: list[Trace],
    *,
    cfg: TraceConfig | None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    pauses_ms: Sequence[float] = DEFAULT_PAUSES_MS,
    processes: int = 0,
    command: str = "supervisor-service evaluate",
) -> Report:
    """Run every trace at the default point and at every point of the sweep, guards on and off."""
    default = Point(settings.phi_threshold, settings.acceptable_heartbeat_pause_ms, True)
    points = {Point(t, default.pause_ms, g) for t in thresholds for g in (True, False)}
    points |= {Point(default.threshold, p, g) for p in pauses_ms for g in (True, False)}
    points |= {default, replace(default, guards=False)}
    order = sorted(points, key=lambda p: (p.pause_ms, p.threshold, not p.guards))
    jobs = [(trace, variant_of(settings, point)) for point in order for trace in traces]
    results = run_all(jobs, processes)
    by_point: dict[Point, list[RunResult]] = {}
    for (trace, _), result, point in zip(jobs, results, [p for p in order for _ in traces]):
        by_point.setdefault(point, []).append(result)
    per_trace: dict[str, dict[bool, RunResult]] = {}
    for guards in (True, False):
        for result in by_point[replace(default, guards=guards)]:
            per_trace.setdefault(result.trace, {})[guards] = result
    report = Report(cfg, traces, per_trace, {p: Summary(r) for p, r in by_point.items()}, default, command)
    report.checks = _checks(report)
    return report


def _checks(report: Report) -> list[tuple[str, bool, str]]:
    """What the defaults promise: no failover where nothing is gone, every crash found within 20 s."""
    checks = []
    quiet = [t for t in report.traces if t.no_failover_expected]
    if quiet:
        bad = {t.name: report.per_trace[t.name][True].failovers for t in quiet}
        total = sum(bad.values())
        checks.append((
            "no failover where no datanode is gone (guards on)", total == 0,
            f"{total} failovers on {', '.join(bad)}" + (f" ({bad})" if total else ""),
        ))
    crashing = [t for t in report.traces if t.name in ("crashes", "mixed")]
    if crashing:
        runs = Summary([report.per_trace[t.name][True] for t in crashing])
        detected = len(runs.detection_ms)
        p99 = runs.td(99)
        checks.append((
            "every crash detected (guards on)", detected == runs.crashes,
            f"{detected} of {runs.crashes} crashes on {', '.join(t.name for t in crashing)}",
        ))
        checks.append((
            "T_D p99 within 20 s (guards on)", p99 is not None and p99 <= 20.0,
            f"p99 {_fmt(p99)} s, p50 {_fmt(runs.td(50))} s; guards off: p99 "
            f"{_fmt(Summary([report.per_trace[t.name][False] for t in crashing]).td(99))} s",
        ))
    return checks


def plot(report: Report, path: Path) -> bool:
    """T_D p99 against the mistake rate for each point of the sweep; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    default = report.default
    series = [
        ("threshold sweep", lambda p: p.pause_ms == default.pause_ms, lambda p: f"phi {p.threshold:g}", "o"),
        ("pause sweep", lambda p: p.threshold == default.threshold, lambda p: f"{p.pause_ms / 1000:g} s", "s"),
    ]
    for name, member, label, marker in series:
        for guards, color in ((True, "tab:blue"), (False, "tab:red")):
            points = sorted(
                (p for p in report.sweep if p.guards == guards and member(p)),
                key=lambda p: (p.pause_ms, p.threshold),
            )
            xs = [report.sweep[p].mistake_rate for p in points]
            ys = [report.sweep[p].td(99) or float("nan") for p in points]
            ax.plot(xs, ys, marker=marker, color=color, alpha=0.8, linestyle="-" if guards else "--",
                    label=f"{name}, guards {'on' if guards else 'off'}")
            for i, (p, x, y) in enumerate(zip(points, xs, ys)):
                ax.annotate(label(p), (x, y), textcoords="offset points", fontsize=7,
                            xytext=(5, 6 if i % 2 else -10))
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xticks([0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("false failovers per hour per datanode (symlog)")
    ax.set_ylabel("detection time T_D p99 (s)")
    ax.set_title("Detection time against mistake rate, every trace")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: Report, out_dir: Path, stem: str = "detection-quality") -> tuple[Path, Path | None]:
    """Writes `<stem>.md` (and `<stem>.png` when matplotlib is installed) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    drawn = plot(report, png)
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown(png.name if drawn else None))
    return md, png if drawn else None
