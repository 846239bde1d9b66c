"""`evaluate`: every trace at the default settings and at every point of the sweep, on worker processes."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from dataclasses import replace

from supervisor_service.evaluate.report import Report
from supervisor_service.evaluate.scoring import RunResult, Summary, checks
from supervisor_service.evaluate.simulation import Point, Simulation, Variant, variant_of
from supervisor_service.evaluate.traces import Trace, TraceConfig

DEFAULT_THRESHOLDS = (1.0, 2.0, 4.0, 8.0, 12.0, 16.0)
"""The phi thresholds of the sweep (at the default pause)."""
DEFAULT_PAUSES_MS = (3000.0, 5000.0, 7500.0, 10_000.0, 15_000.0)
"""The acceptable heartbeat pauses of the sweep (at the default threshold)."""


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
    """Run every trace at the default point and at every point of the sweep, guards on and off.

    The default point is the settings' own threshold and pause: the sweep varies one of them at a time.
    """
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
    report.checks = checks(traces, per_trace)
    return report
