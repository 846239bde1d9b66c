"""Operator insight on the supervisor thread: the history's hook, ListFailovers, Explain (docs/design.md §18).

`Insight` answers the `Inspect` event's queries from the core's own objects, reading them
only: a ListFailovers filter over the history, an Explain of a datanode or a region (its
detectors, when each would fail if nothing arrives, what the supervisor would do now and why,
its history), and a WhatIf (core/whatif.py). It is also the hook that records each decision
(`decided`) with the checks it passed (core/reasons.py). Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from supervisor_service.core.events import SelectionDone
from supervisor_service.core.failovers import FailoverHistory, FailoverRecord
from supervisor_service.core.inflight import InFlight
from supervisor_service.core.reasons import RuleState, clock_text, decision_checks, holds_of, in_text
from supervisor_service.core.records import TRIGGER_MANUAL
from supervisor_service.core.registry import Registry
from supervisor_service.core.table import NodeSnapshot, as_region_array
from supervisor_service.core.types import MigrationTask, SelectJob
from supervisor_service.core.whatif import WhatIf, crossing_ms

MAX_EXPLAIN_ROWS = 1000
"""Detectors an Explain of a whole datanode shows (the verdict counts them all)."""


@dataclass(frozen=True, slots=True)
class DetectorView:
    """A row of an Explain: a Dump's DetectorState, and when it would fail."""

    datanode_id: int
    region_id: int
    last_heartbeat_millis: int
    phi: float
    available: bool
    sample_count: int
    mean_interval_millis: float
    std_deviation_millis: float
    failover_count: int
    migrating: bool
    predicted_failure_millis: int


@dataclass(frozen=True, slots=True)
class Explanation:
    found: bool
    detectors: tuple[DetectorView, ...] = ()
    verdict: str = ""
    holds: tuple[str, ...] = ()
    failovers: tuple[FailoverRecord, ...] = ()
    predicted_failure_millis: int = 0


@dataclass(frozen=True, slots=True)
class ListFailoversQuery:
    datanode_ids: tuple[int, ...] = ()
    region_ids: tuple[int, ...] = ()
    since_millis: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ExplainQuery:
    datanode_id: int
    region_id: int = 0  # 0: every region of the datanode
    at_millis: int = 0  # 0: now


@dataclass(frozen=True, slots=True)
class WhatIfQuery:
    datanode_ids: tuple[int, ...]


class Insight:
    """The history's hook and the read-only queries, over the core's concerns."""

    def __init__(self, registry: Registry, inflight: InFlight, history: FailoverHistory, rules: RuleState) -> None:
        self._registry = registry
        self._table = registry.table
        self._inflight = inflight
        self.history = history
        self.rules = rules

    def decided(self, ev: SelectionDone, wanted: dict[int, int], tasks: list[MigrationTask], now: int) -> None:
        """TargetSelection's hook: the decisions of `ev`, recorded before they are submitted."""
        job = ev.job
        threshold = self._table.opts.threshold
        regions = [r for t in tasks for r in t.region_ids]
        phis = list(self._table.phis(job.datanode_id, as_region_array(regions), now).values())
        granted = {t.to_peer.id: len(t.region_ids) for t in tasks}
        checks = decision_checks(self.rules, job, ev.from_peer, len(ev.peers), wanted, granted, phis, threshold,
                                 self._table.datanode_count)
        self.history.decided(tasks, checks, self._registry.failover_counts, now)

    def decided_drain(self, job: SelectJob, tasks: list[MigrationTask], now: int) -> None:
        """Drains' hook: a drain's decisions, recorded as MANUAL before they are submitted (no guard
        convicted them: the checks say which drain, and the targets the Selector gave)."""
        excluded = sorted(set(job.exclude_targets) | {job.datanode_id})
        checks = [f"drain: {job.drain_id} moves the regions of datanode {job.datanode_id} on purpose (DrainDatanodes)",
                  f"targets: {len({t.to_peer.id for t in tasks})} datanodes for {sum(len(t.region_ids) for t in tasks)} "
                  f"regions; excluded datanodes {excluded} (the source and every datanode being drained)"]
        self.history.decided(tasks, checks, self._registry.failover_counts, now, trigger_reason=TRIGGER_MANUAL)

    def answer(self, query: object, now: int) -> object:
        """The `Inspect` event's answer."""
        match query:
            case ListFailoversQuery():
                return self.list_failovers(query)
            case ExplainQuery():
                return self.explain(query, now)
            case WhatIfQuery(datanode_ids):
                return WhatIf(self._table, self._inflight, self.rules).plan(datanode_ids, now)
        raise TypeError(f"not a question of the supervisor: {type(query).__name__}")

    def list_failovers(self, q: ListFailoversQuery) -> list[FailoverRecord]:
        return self.history.query(q.datanode_ids, q.region_ids, q.since_millis, q.limit)

    # ------------------------------------------------------------ Explain

    def explain(self, q: ExplainQuery, now: int) -> Explanation:
        """Per history group, not per region: a datanode of 100,000 regions costs its few groups, and rows
        are built only for the regions shown (and those the verdict names)."""
        at = q.at_millis or now
        d = q.datanode_id
        nodes = self._table.snapshot({d})
        if not nodes:
            return Explanation(False)
        node = nodes[0]
        threshold = self._table.opts.threshold
        if q.region_id:
            pos = int(np.searchsorted(node.regions, np.uint64(q.region_id)))
            if pos >= node.regions.size or int(node.regions[pos]) != q.region_id:
                return Explanation(False)
            idx = np.array([pos])
        else:
            idx = np.arange(node.regions.size)
        gids, region_ids = node.gids[idx], node.regions[idx]
        groups = node.groups
        phi = np.full(len(groups), -1.0)
        for g in np.unique(gids).tolist():
            phi[g] = groups[g].phi(at)
        inflight = self._inflight.regions
        moving = (np.isin(region_ids, np.fromiter(inflight, dtype=np.uint64, count=len(inflight))) if inflight
                  else np.zeros(idx.size, dtype=bool))
        failing = (phi[gids] >= threshold) & ~moving
        crossings = {g: crossing_ms(groups[g], threshold) for g in np.unique(gids[~moving]).tolist()}
        shown = set(range(min(idx.size, MAX_EXPLAIN_ROWS)))
        if failing.any():
            shown.add(int(np.flatnonzero(failing)[np.argmax(phi[gids[failing]])]))
        if moving.any():
            shown.add(int(np.flatnonzero(moving)[0]))
        if crossings:
            first = min(crossings, key=crossings.__getitem__)
            shown.add(int(np.flatnonzero((gids == first) & ~moving)[0]))
        observed = [a.tolist() for a in node.observed()]  # the Dump's columns, the same bits
        rows = [self._row(node, observed, int(region_ids[i]), int(gids[i]), float(phi[gids[i]]), bool(moving[i]),
                          crossings) for i in sorted(shown)]
        verdict, holds = self._verdict(d, q.region_id, rows, (idx.size, int(failing.sum()), int(moving.sum())),
                                       threshold, at)
        failovers = self.history.query((d,), (q.region_id,) if q.region_id else (), 0, 20)
        predicted = min(crossings.values(), default=0)
        return Explanation(True, tuple(rows[:MAX_EXPLAIN_ROWS]), verdict, tuple(holds), tuple(failovers), predicted)

    def _row(self, node: NodeSnapshot, observed: list[list], r: int, gi: int, phi: float,  # type: ignore[type-arg]
             moving: bool, crossings: dict[int, int]) -> DetectorView:
        g = node.groups[gi]
        threshold = self._table.opts.threshold
        crossing = crossings.get(gi)
        samples, means, stds = observed
        return DetectorView(node.datanode_id, r, g.last, phi, phi < threshold, samples[gi], means[gi], stds[gi],
                            self._registry.failover_counts.get((node.datanode_id, r), 0), moving,
                            crossing if crossing is not None else crossing_ms(g, threshold))

    def _verdict(self, d: int, region_id: int, rows: list[DetectorView], totals: tuple[int, int, int],
                 threshold: float, at: int) -> tuple[str, list[str]]:
        """One sentence of what the supervisor would do now and why, and every hold that applies."""
        holds = holds_of(self.rules, d, region_id, at)
        texts = [h.text for h in holds]
        moving = [v for v in rows if v.migrating]
        failing = [v for v in rows if not v.available and not v.migrating]
        n, n_failing, n_moving = totals
        prefix = "" if region_id else f"datanode {d}: {n} regions, {n_failing} failing, {n_moving} in flight; "
        if failing:
            v = max(failing, key=lambda x: x.phi)
            since = f"phi {_phi(v.phi)} >= {threshold:g} since {clock_text(v.predicted_failure_millis)}"
            if holds:
                return f"{prefix}failing ({since}), {holds[0].text}", texts
            return f"{prefix}failing ({since}): failed over at the next tick, to a target the Selector chooses", texts
        if moving:
            sub = self._inflight.holder(moving[0].region_id)
            if sub is not None:
                t = sub.task
                how = f"under procedure {sub.procedure_id}" if sub.procedure_id else f"(request {t.request_id}, {sub.state})"
                return f"{prefix}in flight: moving to datanode {t.to_peer.id} {how}", texts
        if not rows:
            return f"{prefix}no detector", texts
        v = min(rows, key=lambda x: x.predicted_failure_millis)
        out = f"{prefix}healthy: phi {_phi(v.phi)} < {threshold:g}; failing at {in_text(v.predicted_failure_millis, at)} " \
              "if no heartbeat arrives"
        if holds:
            out += f"; then {holds[0].text}"
        return out, texts


def _phi(phi: float) -> str:
    return "inf" if math.isinf(phi) else f"{phi:.2f}"
