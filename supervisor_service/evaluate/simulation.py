"""The replay: one trace through the service's own supervisor, consumer and effect runner, in simulated time.

`Simulation` builds the `Supervisor` (detector table, guards, failover
rules) the service runs, and around it the runtime's `EventQueue`,
`Consumer` and `EffectRunner` on a `FakeClock` that only the replay moves;
no thread is started. Heartbeats and ticks go through the queue and the
consumer's `step` as in the service; the effects the consumer hands on are
run by the effect runner inline against the embedded PeerLookup and
Selector and a RegionMigration whose migrations complete after
`migration_ms` and really move the regions to the target datanode.
Every remote call takes `call_latency_ms` each way. `Score` counts what
happens.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    Deregister,
    Effect,
    Event,
    FailoverPolicy,
    FakeClock,
    Guards,
    GuardSettings,
    Heartbeat,
    MigrationResult,
    MigrationState,
    MigrationTask,
    PhiAccrualOptions,
    PollMigration,
    SelectPeers,
    SubmitMigration,
    Supervisor,
    Tick,
)
from supervisor_service.evaluate.scoring import RunResult, Score
from supervisor_service.evaluate.traces import NEVER, Trace, inside
from supervisor_service.remotes import EmbeddedPeerLookup, EmbeddedSelector, PeerDirectory, Remotes
from supervisor_service.runtime import Consumer, EffectRunner, EventQueue

MIGRATION_MS = 5000
"""How long a simulated migration takes."""
CALL_LATENCY_MS = 10
"""How long a simulated remote call takes, each way."""


@dataclass(frozen=True, slots=True)
class Point:
    """One setting of the sweep: a threshold and an acceptable pause, with guards on or off."""

    threshold: float
    pause_ms: float
    guards: bool

    @property
    def label(self) -> str:
        return f"phi {self.threshold:g}, pause {self.pause_ms / 1000:g} s, guards {'on' if self.guards else 'off'}"


@dataclass(frozen=True, slots=True)
class Variant:
    """What the supervisor under test is built with (see `variant_of`)."""

    label: str
    opts: PhiAccrualOptions
    guards: GuardSettings | None
    policy: FailoverPolicy
    tick_ms: int
    alive_window_ms: int


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


class _Migration:
    """RegionMigration in simulated time: a submission's regions move to its target `migration_ms` later."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self._finished: dict[str, int] = {}  # procedure -> completion time

    def submit(self, task: MigrationTask) -> MigrationResult:
        sim = self._sim
        now = sim.clock.now_ms()
        procedure_id = f"sim-{task.task_id}"
        done_at = now + sim.migration_ms
        self._finished[procedure_id] = done_at
        sim.score.submitted(task.datanode_id, len(task.region_ids), now)
        sim.schedule(done_at, _Move(task.datanode_id, task.to_peer.id, task.region_ids))
        return MigrationResult(submitted=task.region_ids, procedure_id=procedure_id)

    def status(self, procedure_id: str) -> tuple[MigrationState, str]:
        done = self._sim.clock.now_ms() >= self._finished.get(procedure_id, NEVER)
        return (MigrationState.SUCCEEDED if done else MigrationState.RUNNING), ""


class Simulation:
    """One trace through one supervisor variant, in simulated milliseconds."""

    def __init__(
        self, trace: Trace, variant: Variant, *, migration_ms: int = MIGRATION_MS,
        call_latency_ms: int = CALL_LATENCY_MS,
    ) -> None:
        self.trace, self.variant = trace, variant
        self.migration_ms, self.latency = migration_ms, call_latency_ms
        self.clock = FakeClock(start_ms=0)
        self.metrics = metrics = Metrics(CollectorRegistry())
        guards = Guards(variant.guards) if variant.guards is not None else None
        self.supervisor = Supervisor(variant.opts, metrics, variant.policy, guards=guards)
        self.directory = PeerDirectory(self.clock)
        remotes = Remotes(
            peer_lookup=EmbeddedPeerLookup(self.directory),
            selector=EmbeddedSelector(self.directory, variant.alive_window_ms),
            region_migration=_Migration(self),
        )
        # One event is queued at a time: the queue of a supervisor that keeps up with its load.
        self.queue = EventQueue(1, clock=self.clock)
        self.effects = EffectRunner(remotes, metrics, self._answer_later,
                                    leader_term=lambda: self.supervisor.leader_term)
        self.consumer = Consumer(self.supervisor, self.queue, self.clock, metrics, self._call_later)
        self.score = Score(trace, grace_ms=variant.tick_ms)
        self.holding = {d: r.copy() for d, r in trace.regions.items()}
        self._heap: list[tuple[int, int, object]] = []
        self._seq = 0
        for at, d in trace.rebalances:
            self.schedule(at, _Rebalance(d))

    def schedule(self, at: int, item: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, item))

    def _call_later(self, effect: Effect) -> None:
        """The consumer hands an effect on: its call reaches the remote service one latency later."""
        self.schedule(self.clock.now_ms() + self.latency, effect)

    def _answer_later(self, event: Event) -> None:
        """The effect runner reports a call's result: it reaches the queue one latency later."""
        self.schedule(self.clock.now_ms() + self.latency, event)

    def _tick_times(self) -> Iterable[tuple[int, int]]:
        """(time, due time) of every tick; ticks due during a supervisor stall collapse into one at its end,
        due at the last of them (the ticker skips the others)."""
        step, t = self.variant.tick_ms, self.variant.tick_ms
        while t < self.trace.duration_ms:
            stall = inside(self.trace.stalls, t)
            if stall is None:
                yield t, t
                t += step
                continue
            due = t + (stall[1] - t) // step * step
            yield stall[1], due
            t = due + step  # the first tick due after the stall

    def run(self) -> RunResult:
        trace = self.trace
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
            self.clock.advance(now - self.clock.now_ms())
            if t_heap == now:  # call results first, then the tick, then heartbeats
                _, _, item = heapq.heappop(self._heap)
                self._due(item, now)
            elif t_tick == now:
                self._tick(now, next_tick[1])
                next_tick = next(ticks, None)
            else:
                d = arrivals[i][1]
                i += 1
                regions = next(replay[d]) if d in replay else self.holding.get(d)
                self.directory.observe(d, f"10.0.0.{d}:4001")
                if regions is not None and regions.size:
                    if not self.queue.offer(Heartbeat(d, regions, now)):
                        raise AssertionError("the simulation's queue holds one event at a time")
                    self._step()
        return self.score.result(self.variant.label)

    def _step(self) -> None:
        """The consumer takes what was just queued and handles it, as the supervisor thread would."""
        if not self.consumer.step(timeout=0):
            raise AssertionError("the consumer stopped")

    def _feed(self, event: Event) -> None:
        self.queue.put_control(event)
        self._step()

    def _tick(self, now: int, due_ms: int) -> None:
        self._feed(Tick(due_monotonic=due_ms / 1000))
        self.score.ticked(self.holding, self.supervisor.last_failed, now)

    def _move(self, from_id: int, to_id: int, regions: np.ndarray, now: int) -> None:
        empty = np.empty(0, dtype=np.uint64)
        self.holding[from_id] = np.setdiff1d(self.holding.get(from_id, empty), regions)
        self.holding[to_id] = np.union1d(self.holding.get(to_id, empty), regions)
        for d in (from_id, to_id):
            self.score.held(d, int(self.holding[d].size), now)

    def _due(self, item: object, now: int) -> None:
        """What the heap holds: a migration ending, a rebalance, a call reaching its service, a result."""
        match item:
            case _Move(from_id, to_id, region_ids):
                self._move(from_id, to_id, np.asarray(region_ids, dtype=np.uint64), now)
            case _Rebalance(datanode_id):
                home = self.trace.regions[datanode_id]
                for d in list(self.holding):
                    away = np.intersect1d(self.holding[d], home) if d != datanode_id else ()
                    if len(away):
                        self._move(d, datanode_id, away, now)
                        self._feed(Deregister(tuple((d, int(r)) for r in away)))
            case SelectPeers() | SubmitMigration() | PollMigration():
                self.effects.run(item)
            case _:
                self._feed(item)  # a result event
