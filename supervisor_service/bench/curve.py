"""The cost as the work grows: `python -m supervisor_service.bench --curve` (or `make bench BENCH_ARGS=--curve`).

Each point (a number of datanodes x regions per datanode, best or worst case)
runs in a fresh child process, so no point's memory or allocator state
pollutes another's. In it, the real `Supervisor` (default settings: guards on)
owns the real `DetectorTable`; the bench drives the table the way the
supervisor thread does, on the calling thread:

- **best case**: every region of a datanode joins in one heartbeat (one shared
  history per datanode);
- **worst case**: each region joins its datanode at a different time, one
  heartbeat apart: datanode by datanode, `DetectorTable.heartbeat` is called
  with a growing region set (1, 2, ... all regions), so the histories are the
  real table's own state, not a synthetic one. Heartbeat timestamps carry a few
  ms of jitter, as real ones do.

Then every datanode heartbeats all its regions for a few rounds (the steady
state), with a tick every `tick_interval_ms` of detector time in between:

- **apply**: `time.perf_counter_ns` around each steady `DetectorTable.heartbeat`
  (median and p99 over every one of them);
- **tick**: around `Supervisor.handle(Tick)`, the real tick (the table's gauges
  and phi distribution, `Detection.failed`, the guards, `silent_datanodes`, the
  planning); and, apart, around the table calls alone (`failed` and
  `silent_datanodes`);
- **RSS**: the child's resident set once built (and its peak), and the growth
  over the empty service's, per detector.

Building the worst case costs one `heartbeat` call per detector (each region's
join), whatever the table: past `budget_s` (by default `budget_for` the size)
a point stops adding datanodes (at a datanode boundary, so every datanode it
has is in the worst-case state) and says how many it built, and the larger
points of that case are not tried; the steady phase has a budget of its own.

CPU per message over gRPC is not a curve column: it depends on the message
size and the edge more than on the table's size, and a flood at each point
would need the fleet's streams at that size (3,000 of them at 3M) on the same
two cores; the floods of `make bench` give it at one million detectors (1,000
and 10 regions per message: stamped, identical bytes, churned, and a region
set that changes every 10th message).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from supervisor_service.bench.baseline import rss_bytes
from supervisor_service.bench.rows import Row

START_MS = 1_700_000_000_000
DEFAULT_SIZES = (10_000, 100_000, 1_000_000, 3_000_000)


def _hwm_bytes() -> int:
    """This process's peak resident set, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


_JITTER_MAX = 97


def _jitter(datanode_id: int, k: int) -> int:
    """A heartbeat's lateness, ms: a few ms that vary by datanode and heartbeat, never the same pattern."""
    return (datanode_id * 104_729 + k * 7_919) % _JITTER_MAX


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Point:
    """One point of the curve: its size, its case, and how long it may take."""

    datanodes: int
    regions: int
    worst: bool
    budget_s: float = 60.0
    """Building stops adding datanodes past this (the worst case with a slow table)."""
    steady_budget_s: float = 30.0
    """The steady phase stops after this many seconds, once it has at least one round."""
    min_samples: int = 1_000
    """Steady heartbeats wanted (for a p99): more rounds when there are few datanodes."""
    min_rounds: int = 3
    min_ticks: int = 30
    period_ms: int = 3_000
    """Heartbeat interval of every datanode (the bench fleet's)."""

    @property
    def detectors(self) -> int:
        return self.datanodes * self.regions

    @property
    def case(self) -> str:
        return "worst" if self.worst else "best"


@dataclass
class PointResult:
    point: Point
    datanodes: int = 0  # built (fewer than asked when the budget ran out)
    detectors: int = 0
    group_count: int = 0
    build_s: float = 0.0
    steady_rounds: int = 0
    apply_us: list[float] = field(default_factory=list, repr=False)
    tick_ms: list[float] = field(default_factory=list, repr=False)
    table_ms: list[float] = field(default_factory=list, repr=False)
    rss_empty: int = 0
    rss: int = 0
    rss_peak: int = 0
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.datanodes == self.point.datanodes

    def summary(self) -> dict:
        """The numbers of the row (the raw samples stay in the child)."""
        p = _percentile
        return {
            "point": asdict(self.point), "datanodes": self.datanodes, "detectors": self.detectors,
            "group_count": self.group_count, "build_s": self.build_s, "steady_rounds": self.steady_rounds,
            "apply_samples": len(self.apply_us), "ticks": len(self.tick_ms),
            "apply_p50_us": p(self.apply_us, 50), "apply_p99_us": p(self.apply_us, 99),
            "tick_p50_ms": p(self.tick_ms, 50), "tick_p99_ms": p(self.tick_ms, 99),
            "table_p50_ms": p(self.table_ms, 50), "table_p99_ms": p(self.table_ms, 99),
            "rss_mib": self.rss / 2**20, "rss_peak_mib": self.rss_peak / 2**20,
            "bytes_per_detector": (self.rss - self.rss_empty) / self.detectors if self.detectors else None,
            "complete": self.complete, "error": self.error,
        }


def _region_ids(datanode_id: int, regions: int) -> np.ndarray:
    """The datanode's region ids, sorted uint64 (the load generator's `region_ids_of`), made on demand so
    the bench holds none of them: whatever the table keeps of them is the table's memory."""
    return np.arange(regions, dtype=np.uint64) | np.uint64(datanode_id << 32)


def _supervisor():
    """The service's Supervisor as `make run` builds it (default settings, guards on), leading."""
    from prometheus_client import CollectorRegistry

    from supervisor_service.app.metrics import Metrics
    from supervisor_service.app.settings import load_settings
    from supervisor_service.core import Guards, Supervisor

    s = load_settings(store="memory")
    gs = s.guard_settings()
    sup = Supervisor(s.detector_options(), Metrics(CollectorRegistry()), s.failover_policy(), is_leader=True,
                     leader_term=1, guards=Guards(gs) if gs is not None else None)
    silence_ms = gs.mass_failure_silence_ms if gs is not None else s.acceptable_heartbeat_pause_ms
    return sup, s.tick_interval_ms, silence_ms


def build(table, point: Point) -> tuple[int, int]:
    """Fill `table` (a `DetectorTable`) with the point's datanodes, datanode by datanode, until the
    budget runs out; (datanodes built, the detector time at which all of them last heartbeat).

    Every datanode's history spans the same detector time, so all end in step. Worst case: the
    datanode's k-th heartbeat names its first k regions (region k joins at heartbeat k); best case:
    one heartbeat names them all, at the end."""
    regions, period_ms = point.regions, point.period_ms
    end_ms = START_MS + regions * period_ms
    deadline = time.monotonic() + point.budget_s
    built = 0
    for d in range(1, point.datanodes + 1):
        ids = _region_ids(d, regions)
        if point.worst:
            for k in range(1, regions + 1):
                table.heartbeat(d, ids[:k], START_MS + k * period_ms + _jitter(d, k))
        else:
            table.heartbeat(d, ids, end_ms + _jitter(d, regions))
        built = d
        if time.monotonic() > deadline:
            break
    return built, end_ms + _JITTER_MAX


def measure(point: Point) -> PointResult:
    """Build the point's table in this process and measure it (see the module's docstring)."""
    from supervisor_service.core import Tick

    sup, tick_ms, silence_ms = _supervisor()
    period_ms = point.period_ms
    table = sup.table
    result = PointResult(point)
    regions = point.regions
    gc.collect()
    result.rss_empty = rss_bytes()

    started = time.monotonic()
    built, end_ms = build(table, point)
    result.datanodes = built
    result.build_s = time.monotonic() - started

    # Steady: rounds of every datanode heartbeating all its regions, ticks in between, one per
    # tick interval of detector time (so the guards see no pause between them).
    rounds = max(point.min_rounds, math.ceil(point.min_samples / max(built, 1)))
    steady_deadline = time.monotonic() + point.steady_budget_s
    ticks_per_round = max(1, period_ms // tick_ms)
    apply_us, tick_list, table_list = result.apply_us, result.tick_ms, result.table_ms
    clock = time.perf_counter_ns
    now = end_ms
    for r in range(1, rounds + 1):
        base = end_ms + r * period_ms
        for d in range(1, built + 1):
            ids = _region_ids(d, regions)
            ts = base + _jitter(d, regions + r)
            t0 = clock()
            table.heartbeat(d, ids, ts)
            apply_us.append((clock() - t0) / 1e3)
        for i in range(ticks_per_round):
            now = base + 100 + i * tick_ms
            _timed_tick(sup, table, now, silence_ms, Tick, tick_list, table_list)
        result.steady_rounds = r
        if time.monotonic() > steady_deadline:
            break
    while len(tick_list) < point.min_ticks:  # more ticks, later in the same interval (nothing failed yet)
        now += tick_ms // 10
        _timed_tick(sup, table, now, silence_ms, Tick, tick_list, table_list)
    result.detectors = len(table)
    result.group_count = table.group_count
    gc.collect()
    result.rss = rss_bytes()
    result.rss_peak = _hwm_bytes()
    return result


def _timed_tick(sup, table, now: int, silence_ms: int, tick_type, ticks: list[float], table_only: list[float]) -> None:
    clock = time.perf_counter_ns
    t0 = clock()
    sup.handle(tick_type(), now)
    ticks.append((clock() - t0) / 1e6)
    t0 = clock()
    dict(table.failed(now))
    table.silent_datanodes(now, silence_ms)
    table_only.append((clock() - t0) / 1e6)


def _child(conn, point: Point) -> None:
    try:
        conn.send(measure(point).summary())
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        conn.send({"point": asdict(point), "error": repr(exc)})


def run_point(point: Point, timeout_s: float | None = None) -> dict:
    """Measure one point in a fresh child process; its summary (or {"error": ...})."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, point), daemon=True)
    proc.start()
    child.close()
    # The budgets bound the child's own work; building an array or a tick can overrun them by a
    # call, and a 3M-detector child takes a while to start and to tear down.
    timeout = timeout_s if timeout_s is not None else 2 * (point.budget_s + point.steady_budget_s) + 120
    try:
        if not parent.poll(timeout):
            proc.kill()
            return {"point": asdict(point), "error": f"no answer within {timeout:g} s"}
        return parent.recv()
    except EOFError:
        return {"point": asdict(point), "error": f"the child died (exit code {proc.exitcode})"}
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------- in the main table


def in_process_rows(cfg, log) -> list[Row]:
    """The worst case at the fleet's size, in-process: the real table and tick (see `curve`), each
    region joined at a different time, at the fleet's regions per datanode and at `wide_regions`
    (as many detectors over more datanodes); and the best case at the fleet's size beside them.

    In-process, not over gRPC: the joins alone are a heartbeat per region (a million messages),
    and 10,000 streams with their load generators on the service's two cores would measure the
    machine, not the table."""
    size = cfg.datanodes * cfg.regions
    wide = min(cfg.wide_regions, cfg.regions)
    budget = cfg.in_process_budget_s if cfg.in_process_budget_s is not None else budget_for(size)
    points = [Point(cfg.datanodes, cfg.regions, True, budget),
              Point(max(1, size // wide), wide, True, budget),
              Point(cfg.datanodes, cfg.regions, False, budget)]
    if wide == cfg.regions:
        del points[1]
    rows = []
    for point in points:
        log(f"in-process {point.case} case: {point.datanodes:,} x {point.regions:,} regions")
        rows.append(in_process_row(run_point(point)))
    return rows


def in_process_row(summary: dict) -> Row:
    """A row of the main table from an in-process point's summary (`curve.run_point`)."""
    p = summary["point"]
    asked = p["datanodes"] * p["regions"]
    case = ("worst case, in-process: each region joined its datanode at a different time" if p["worst"] else
            "best case, in-process: a datanode's regions joined together")
    name = f"{case}, {p['datanodes']:,} x {p['regions']:,} regions"
    if "detectors" not in summary:
        return Row(scenario=name, detectors=asked, result=f"failed: {summary.get('error')}",
                   extra={"in_process": summary})
    s = summary
    built = "" if s["complete"] else (f"; budget out: {s['datanodes']:,} of {p['datanodes']:,} datanodes built "
                                      f"in {s['build_s']:.0f} s")
    apply = (f"table apply p50/p99 {s['apply_p50_us']:,.0f} / {s['apply_p99_us']:,.0f} us per {p['regions']:,}-region "
             f"heartbeat" if s["apply_p50_us"] is not None else "no steady heartbeat")
    return Row(
        scenario=name, detectors=s["detectors"],
        region_hb_s=p["regions"] / (s["apply_p50_us"] / 1e6) if s["apply_p50_us"] else None,
        tick_p50=s["tick_p50_ms"], tick_p99=s["tick_p99_ms"], rss_mib=s["rss_mib"],
        result=(f"{apply}; table calls of a tick p50 {s['table_p50_ms']:.1f} ms; {s['group_count']:,} groups; "
                f"{s['bytes_per_detector']:,.0f} B/detector; built in {s['build_s']:.0f} s{built}"),
        extra={"in_process": s},
    )


# ---------------------------------------------------------------- the table

CURVE_COLUMNS = (
    ("case", "case"),
    ("detectors", "detectors (datanodes x regions)"),
    ("tick", "tick p50 / p99 ms (table calls p50)"),
    ("apply", "steady apply p50 / p99 us per heartbeat"),
    ("rss", "RSS MiB (peak)"),
    ("bpd", "bytes per detector"),
    ("groups", "group_count"),
    ("note", "built in"),
)


_CASES = {True: "worst: each region joined at a different time", False: "best: a datanode's regions joined together"}


@dataclass
class CurveRow:
    """One point's line of the curve table."""

    summary: dict

    def cells(self) -> dict[str, str]:
        s, p = self.summary, self.summary["point"]
        if s.get("error") and "detectors" not in s:
            return {"case": _CASES[p["worst"]],
                    "detectors": f"{p['datanodes'] * p['regions']:,} ({p['datanodes']:,} x {p['regions']:,})",
                    "tick": "-", "apply": "-", "rss": "-", "bpd": "-", "groups": "-", "note": s["error"]}

        def f(v, fmt):
            return "-" if v is None else fmt.format(v)

        size = f"{s['detectors']:,} ({s['datanodes']:,} x {p['regions']:,})"
        note = f"{s['build_s']:.1f} s"
        if not s["complete"]:
            note += (f": budget out, {s['datanodes']:,} of {p['datanodes']:,} datanodes "
                     f"({p['datanodes'] * p['regions']:,} detectors asked)")
        if s.get("error"):
            note += f"; {s['error']}"
        return {
            "case": _CASES[p["worst"]],
            "detectors": size,
            "tick": f"{f(s['tick_p50_ms'], '{:.1f}')} / {f(s['tick_p99_ms'], '{:.1f}')} "
                    f"({f(s['table_p50_ms'], '{:.1f}')})",
            "apply": f"{f(s['apply_p50_us'], '{:,.0f}')} / {f(s['apply_p99_us'], '{:,.0f}')} "
                     f"({p['regions']:,} regions, n={s['apply_samples']:,})",
            "rss": f"{s['rss_mib']:,.0f} ({s['rss_peak_mib']:,.0f})",
            "bpd": f(s["bytes_per_detector"], "{:,.0f}"),
            "groups": f"{s['group_count']:,}",
            "note": note,
        }


def budget_for(detectors: int) -> float:
    """A point's default build budget: 60 s, or 200 s per million detectors when that is more. The
    worst case is one `heartbeat` call per detector (each region's join), so its build time grows
    with the detectors whatever the table: at 3M about 3M calls, minutes on two shared cores. A
    table that cannot build 10,000 detectors in a minute says so at the first point, and the larger
    ones are not tried."""
    return max(60.0, 200.0 * detectors / 1e6)


def points_of(sizes: tuple[int, ...] = DEFAULT_SIZES, regions: int = 1_000, budget_s: float | None = None,
              steady_budget_s: float = 30.0) -> list[Point]:
    """Best and worst case at each size (detectors), `regions` per datanode (at least one datanode);
    each point's budget `budget_s`, or `budget_for` its size."""
    out = []
    for size in sizes:
        datanodes = max(1, size // regions)
        budget = budget_s if budget_s is not None else budget_for(datanodes * regions)
        for worst in (False, True):
            out.append(Point(datanodes, regions, worst, budget, steady_budget_s))
    return out


def run_curve(points: list[Point], log=None) -> list[dict]:
    """Each point in its own child, in order; their summaries. Once a point of a case has not been
    built within its budget, the larger points of that case are not tried (they would build as
    many datanodes as it did, in as long, and say nothing more)."""
    out = []
    stopped: dict[bool, dict] = {}  # case (worst) -> the summary of its point that ran out of budget
    for point in points:
        short = stopped.get(point.worst)
        if short is not None and point.detectors > short["point"]["datanodes"] * short["point"]["regions"]:
            out.append({"point": asdict(point), "skipped": True,
                        "error": f"skipped: the {short['point']['datanodes'] * short['point']['regions']:,}-detector "
                                 f"point built {short['datanodes']:,} datanodes in its {short['point']['budget_s']:g} s"})
            continue
        if log is not None:
            log(f"curve: {point.case} case, {point.datanodes:,} x {point.regions:,} regions")
        summary = run_point(point)
        if "detectors" in summary and not summary["complete"]:
            stopped[point.worst] = summary
        out.append(summary)
    return out


def linearity_notes(summaries: list[dict]) -> list[str]:
    """How each cost grows between successive complete points of a case, beside how the detectors grew
    (the same factor: linear in the detectors)."""
    notes = []
    for worst in (False, True):
        pts = [s for s in summaries if s.get("complete") and s["point"]["worst"] == worst and s["detectors"]]
        for a, b in zip(pts, pts[1:]):
            grow = b["detectors"] / a["detectors"]
            parts = []
            for key, label in (("tick_p50_ms", "tick"), ("apply_p50_us", "apply")):
                if a.get(key) and b.get(key):
                    parts.append(f"{label} x{b[key] / a[key]:.2f}")
            grown = [s["bytes_per_detector"] * s["detectors"] for s in (a, b) if s.get("bytes_per_detector")]
            if len(grown) == 2 and grown[0] > 0:  # the memory the detectors added, not the interpreter's
                parts.append(f"RSS over the empty service's x{grown[1] / grown[0]:.2f}")
            if parts:
                notes.append(f"{'worst' if worst else 'best'} case, {a['detectors']:,} -> {b['detectors']:,} "
                             f"detectors (x{grow:.1f}): " + ", ".join(parts))
    return notes
