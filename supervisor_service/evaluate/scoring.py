"""Scoring: the failure detector quality figures of Chen, Toueg and Aguilera (2002), per run and over runs.

- detection time T_D: from a datanode's crash to the first failover
  submitted for it (p50/p99 over every crash);
- mistake rate: failovers of a datanode that was not down, per hour per
  datanode (a failover is every submission for one datanode within
  `BURST_MS` of the previous one: its batches, and regions whose detectors
  crossed a tick later);
- query accuracy P_A: the fraction of (tick, live datanode) pairs on which
  the detector did not hold any of the datanode's regions failed;
- failovers triggered, and regions moved without need.

`Score` counts one run as the simulation reports what happens; `Summary`
adds runs up; `checks` are what the default settings promise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from supervisor_service.evaluate.traces import HOUR_MS, Trace

BURST_MS = 30_000  # submissions for one datanode this close together are one failover


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


class Score:
    """The figures of one run of `trace`, counted as they happen.

    A submission up to `grace_ms` after a crash window ends still counts for that crash (it was
    decided on the tick that saw the datanode down).
    """

    def __init__(self, trace: Trace, grace_ms: int) -> None:
        self.trace = trace
        self._grace_ms = grace_ms
        self.failovers = self.mistakes = self.wrong_regions = 0
        self.live_ticks = self.suspected_ticks = 0
        self._last_failover: dict[int, int] = {}  # datanode -> ms of its last submission
        self._first_detection: dict[tuple[int, int], int] = {}  # crash window -> first failover
        self._sizes = {d: [(0, int(r.size))] for d, r in trace.regions.items()}  # datanode -> (ms, regions held)

    def submitted(self, datanode_id: int, regions: int, now: int) -> None:
        """A SubmitRegionMigration of `regions` regions of the datanode reached RegionMigration."""
        d = datanode_id
        window = next((w for w in self.trace.down.get(d, ()) if w[0] <= now < w[1] + self._grace_ms), None)
        if window is None:
            self.wrong_regions += regions
        last = self._last_failover.get(d)
        self._last_failover[d] = now
        if last is not None and now - last <= BURST_MS:
            return  # the same failover: another batch, or regions that crossed a tick later
        self.failovers += 1
        if window is None:
            self.mistakes += 1
        else:
            self._first_detection.setdefault((d, window[0]), now)

    def ticked(self, holding: Mapping[int, np.ndarray], failed: Mapping[int, object], now: int) -> None:
        """A tick ran: every live datanode holding regions counts, suspected if it is in `failed`."""
        for d, regions in holding.items():
            if regions.size and not self.trace.is_down(d, now):
                self.live_ticks += 1
                self.suspected_ticks += d in failed

    def held(self, datanode_id: int, regions: int, now: int) -> None:
        """From `now` on, the datanode holds `regions` regions."""
        self._sizes.setdefault(datanode_id, [(0, 0)]).append((now, regions))

    def _held_at(self, datanode_id: int, at_ms: int) -> bool:
        """Whether the datanode held any region at `at_ms` (a crash of an empty one cannot be detected)."""
        held = False
        for t, size in self._sizes.get(datanode_id, ()):
            if t > at_ms:
                break
            held = size > 0
        return held

    def result(self, variant: str) -> RunResult:
        trace = self.trace
        scored = {
            (d, start) for d, windows in trace.down.items() for start, _ in windows
            if (d, start) in self._first_detection or self._held_at(d, start)
        }
        detected = [t - start for (d, start), t in self._first_detection.items()]
        crashes = len(scored)
        return RunResult(
            trace=trace.name, variant=variant, detection_scored=trace.detection_scored,
            datanodes=trace.datanodes, hours=trace.duration_ms / HOUR_MS, crashes=crashes, detection_ms=sorted(detected),
            missed=crashes - len(detected), mistakes=self.mistakes, wrong_regions=self.wrong_regions,
            failovers=self.failovers,
            live_ticks=self.live_ticks, suspected_ticks=self.suspected_ticks,
        )


def td_seconds(detection_ms: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of detection times (the value at or below which q% of them lie), in s."""
    if not detection_ms:
        return None
    ordered = sorted(detection_ms)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] / 1000


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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
        return td_seconds(self.detection_ms, q)


def checks(traces: Sequence[Trace], per_trace: Mapping[str, Mapping[bool, RunResult]]) -> list[tuple[str, bool, str]]:
    """What the defaults promise: no failover where nothing is gone, every crash found within 20 s.

    `per_trace` is trace -> guards on? -> the run at the default settings.
    """
    found = []
    quiet = [t for t in traces if t.no_failover_expected]
    if quiet:
        bad = {t.name: per_trace[t.name][True].failovers for t in quiet}
        total = sum(bad.values())
        found.append((
            "no failover where no datanode is gone (guards on)", total == 0,
            f"{total} failovers on {', '.join(bad)}" + (f" ({bad})" if total else ""),
        ))
    crashing = [t for t in traces if t.name in ("crashes", "mixed")]
    if crashing:
        runs = Summary([per_trace[t.name][True] for t in crashing])
        detected = len(runs.detection_ms)
        p99 = runs.td(99)
        found.append((
            "every crash detected (guards on)", detected == runs.crashes,
            f"{detected} of {runs.crashes} crashes on {', '.join(t.name for t in crashing)}",
        ))
        found.append((
            "T_D p99 within 20 s (guards on)", p99 is not None and p99 <= 20.0,
            f"p99 {fmt_seconds(p99)} s, p50 {fmt_seconds(runs.td(50))} s; guards off: p99 "
            f"{fmt_seconds(Summary([per_trace[t.name][False] for t in crashing]).td(99))} s",
        ))
    return found
