"""`python -m supervisor_service.bench [--quick]`: the scale benchmark (README "Performance"), as one table.

The service runs in this process (`supervisor_service.app.Service`, memory
store, no metrics endpoint, the embedded dry-run RegionMigration, default
settings otherwise: guards on, 1 s ticks, a 1,024-event queue). Load comes
from separate load-generator processes (`bench.loadgen`, grpc.aio, one bidi
stream per datanode) over real gRPC on 127.0.0.1. This process only
orchestrates: it sleeps while a scenario runs and reads the service's
metrics, its Prometheus histograms tapped for raw values, /proc for RSS and
`os.times()` for CPU.

Scenarios, in order (each is a row):

1. steady: every datanode heartbeats its regions every `period` (3 s: 1,000 x
   1,000 regions is 333k region-heartbeats/s); receipt-to-applied latency.
2. dump: the same, while a load generator reads a Dump of every detector.
3. failover: one datanode (1,000 regions) went silent at the start of (1);
   the failover submission time (the dry-run journal's clock) against the
   moment the phi math says its detectors cross the threshold (from its
   Dumped state: last heartbeat, window mean and std, exactly as the table).
4. ingest at 1,000 regions per message: every datanode stream floods.
5. ingest at 10 regions per message: 1,000 more datanodes of 10 regions
   flood (the fleet goes on at its period); deregistered afterwards.
   Heartbeats are stamped (`timestamp_millis`, `node_epoch`, `peer_addr`) as a
   real datanode's are; (4) and (5) also run with the same bytes every time,
   rows labelled "best case, identical bytes" (`bench.floods`).
6. churned histories: extra streams ramp their region set one region per
   heartbeat (each region index joins at a different moment), then flood;
   deregistered afterwards.
7. the region set changes every 10th message (one region left out, then put
   back, in turn): (4) and (5) again, stamped.
8. the gRPC ceiling: the same floods (both message sizes: stamped, identical,
   changing) against a no-op grpc.aio server (parses, answers a constant), once
   the service is stopped, so the service's numbers can be read against what
   the transport alone does on this machine with the same load generators
   (`bench.ceiling`); each service row shows its server CPU per message beside
   the no-op server's at the same size and kind, and the ratio.
9. in-process, one fresh child process each (`bench.curve`): the worst case at
   the fleet's size (each region joined its datanode at a different time) at
   1,000 regions per datanode and at 100 (10,000 x 100), and the best case;
   the real table and the real tick, timed call by call. (Their
   "region-heartbeats/s" is one heartbeat's regions over its median apply.)
10. the naive baseline and the table, in-process in a child process, fed the
   same heartbeat sequence; ratios printed under the table.
11. TLS off and on (`bench.tls`): two fresh services side by side, plaintext and
   mTLS (certificates made for the run), flooded by new streams at both message
   sizes in alternating windows; the cost of TLS is the difference in CPU per message.

`--curve` runs instead the cost as the work grows (`bench.curve`); `--profile`
a py-spy record of the service under the stamped flood (`bench.profile`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from array import array
from dataclasses import asdict

from prometheus_client import CollectorRegistry

import supervisor_service.bench.baseline as baseline
import supervisor_service.bench.ceiling as ceiling
import supervisor_service.bench.curve as curve
import supervisor_service.bench.loadgen as loadgen
import supervisor_service.bench.tls as tls
from supervisor_service.bench.floods import Floods
from supervisor_service.bench.rows import Config, Row, baseline_rows, render
from supervisor_service.bench.verdict import summary_notes, targets
from supervisor_service.core import PhiAccrualOptions, phi_from


def _pair_floors(rows: list[Row]) -> None:
    """Each service row gets the no-op server's CPU per message at the same message size and stamping."""
    floors = {r.extra["pair"]: r.cpu_us_msg for r in rows if r.extra.get("floor")}
    for r in rows:
        pair = r.extra.get("pair")
        if pair is not None and not r.extra.get("floor"):
            r.floor_us_msg = floors.get(pair)


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def rss_mib() -> float:
    return baseline.rss_bytes() / (1024 * 1024)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class _Tap:
    """Stands in for a Prometheus histogram: forwards `observe` and keeps (time, value) of every sample.

    Past `cap` samples it keeps every other one (and then every fourth...), so a
    long run costs bounded memory (16 bytes a sample) and quantiles stay unbiased."""

    def __init__(self, inner, cap: int = 400_000, now_ms=None) -> None:
        self.inner = inner
        self.cap = cap
        self.now_ms = now_ms  # also keep the detector clock at each sample (ticks: when each ran)
        self.times = array("d")
        self.values = array("d")
        self.stamps = array("d")
        self.stride = 1
        self.seen = 0

    def observe(self, value: float) -> None:
        self.inner.observe(value)
        self.seen += 1
        if self.seen % self.stride == 0:
            self.times.append(time.monotonic())
            self.values.append(value)
            if self.now_ms is not None:
                self.stamps.append(self.now_ms() - value * 1000)
            if len(self.values) >= self.cap:
                self.times, self.values, self.stamps = self.times[::2], self.values[::2], self.stamps[::2]
                self.stride *= 2

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def between(self, start: float, end: float) -> list[float]:
        times, values = self.times, self.values
        n = min(len(times), len(values))
        return [values[i] for i in range(n) if start <= times[i] <= end]


class _RssSampler(threading.Thread):
    """Samples this process's resident set every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic(), rss_mib()))

    def peak(self, start: float, end: float) -> float:
        return max([mib for t, mib in self.samples if start <= t <= end] + [rss_mib()])

    def stop(self) -> None:
        self._stop.set()


class ServiceHost:
    """The service on its own asyncio loop in a daemon thread (as `make run` would, minus signals)."""

    def __init__(self, **settings_overrides) -> None:
        from supervisor_service.app.service import Service
        from supervisor_service.app.settings import load_settings

        settings = load_settings(grpc_addr="127.0.0.1:0", metrics_addr="", store="memory", **settings_overrides)
        self.service = Service(settings, registry=CollectorRegistry())
        metrics = self.service.metrics
        self.tick_tap = metrics.tick_duration = _Tap(metrics.tick_duration, now_ms=self.service.clock.now_ms)
        self.apply_tap = metrics.heartbeat_apply_latency = _Tap(metrics.heartbeat_apply_latency)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bench-service", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            try:
                await self.service.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._started.set()
            await self.service.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001
            self._error = self._error or exc

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the service did not start: {self._error!r}")
        deadline = time.monotonic() + timeout
        while not self.service.supervisor.status.is_leader:
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become leader")
            time.sleep(0.01)
        return self.service.addresses.grpc

    def stop(self) -> None:
        self.service.request_stop()
        self._thread.join(30)

    # -------------------------------------------------------------- readings

    def detectors(self) -> int:
        return len(self.service.supervisor.table)

    def counters(self) -> dict[str, float]:
        """Heartbeat messages and regions by outcome, and events processed."""
        out: dict[str, float] = {}
        for metric in self.service.registry.collect():
            if metric.name in ("supervisor_heartbeats", "supervisor_heartbeat_regions"):
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        out[f"{metric.name}:{sample.labels['outcome']}"] = sample.value
        return out


class LoadGens:
    """The load-generator processes; at most one command outstanding per process."""

    def __init__(self, count: int, addr: str, channels: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen.main, args=(child, addr, channels), daemon=True)
            proc.start()
            child.close()
            self.procs.append((proc, parent))

    def call(self, commands: list[tuple | None], timeout: float = 600.0) -> list[dict | None]:
        """Send each process its command (None: nothing) and wait for every reply."""
        for (_, conn), command in zip(self.procs, commands):
            if command is not None:
                conn.send(command)
        replies = []
        for (_, conn), command in zip(self.procs, commands):
            if command is None:
                replies.append(None)
                continue
            if not conn.poll(timeout):
                raise RuntimeError(f"load generator did not answer {command[0]!r} within {timeout} s")
            reply = conn.recv()
            if "error" in reply:
                raise RuntimeError(f"load generator failed on {command[0]!r}: {reply['error']}")
            replies.append(reply)
        return replies

    def all(self, *command) -> list[dict]:
        return self.call([command] * len(self.procs))

    def one(self, index: int, *command) -> dict:
        commands: list[tuple | None] = [None] * len(self.procs)
        commands[index] = command
        return self.call(commands)[index]

    def close(self) -> None:
        for proc, conn in self.procs:
            try:
                conn.send(("quit",))
            except OSError:
                pass
        for proc, conn in self.procs:
            if conn.poll(15):
                try:
                    conn.recv()
                except EOFError:
                    pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def predicted_crossing_ms(row, opts: PhiAccrualOptions) -> int:
    """First integer ms at which this Dumped detector's phi reaches the threshold (the table's math)."""
    n = row.sample_count
    mean = row.mean_interval_millis + opts.acceptable_heartbeat_pause_ms
    std = max(row.std_deviation_millis, opts.min_std_deviation_ms)
    assert n > 0
    lo, hi = 0, 1
    while phi_from(hi, mean, std) < opts.threshold:
        hi *= 2
    while lo < hi:  # phi is non-decreasing in the delay: smallest delay at or above the threshold
        mid = (lo + hi) // 2
        if phi_from(mid, mean, std) >= opts.threshold:
            hi = mid
        else:
            lo = mid + 1
    return row.last_heartbeat_millis + lo


class Bench:
    def __init__(self, cfg: Config, out=sys.stdout) -> None:
        self.cfg = cfg
        self.out = out
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.host: ServiceHost | None = None
        self.gens: LoadGens | None = None
        self.rss = _RssSampler()

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- windows

    def begin(self, load_stats: bool = True) -> dict:
        host = self.host
        snap = {"t": time.monotonic(), "cpu": cpu_seconds(), "counters": host.counters()}
        if load_stats:
            stats = self.gens.all("stats")
            snap["load"] = sum(s["cpu"] for s in stats)
            snap["load_errors"] = sum(s["errors"] for s in stats)
        return snap

    def end(self, name: str, begin: dict, *, load_cpu: float | None = None) -> Row:
        host = self.host
        end = time.monotonic()
        elapsed = end - begin["t"]
        cpu = cpu_seconds() - begin["cpu"]
        counters = host.counters()
        delta = {k: v - begin["counters"].get(k, 0.0) for k, v in counters.items()}
        load_errors = 0
        if load_cpu is None and "load" in begin:
            stats = self.gens.all("stats")
            load_cpu = sum(s["cpu"] for s in stats) - begin["load"]
            load_errors = sum(s["errors"] for s in stats) - begin["load_errors"]
        ticks = host.tick_tap.between(begin["t"], end)
        applies = host.apply_tap.between(begin["t"], end)
        rejected = sum(v for k, v in delta.items() if k.startswith("supervisor_heartbeats:rejected"))
        accepted = delta.get("supervisor_heartbeats:accepted", 0.0)
        row = Row(
            scenario=name,
            detectors=host.detectors(),
            msgs_s=delta.get("supervisor_heartbeats:accepted", 0.0) / elapsed,
            region_hb_s=delta.get("supervisor_heartbeat_regions:accepted", 0.0) / elapsed,
            rss_mib=self.rss.peak(begin["t"], end),
            cpu_service=cpu / elapsed,
            cpu_load=None if load_cpu is None else load_cpu / elapsed,
            # This process's CPU (the service, ticks included, and the idle orchestrator) per accepted message.
            cpu_us_msg=cpu / accepted * 1e6 if accepted else None,
            rejected=int(rejected),
            errors=load_errors,
        )
        if ticks:
            row.tick_p50, row.tick_p99 = percentile(ticks, 50) * 1e3, percentile(ticks, 99) * 1e3
        if applies:
            row.apply_p50, row.apply_p99 = percentile(applies, 50) * 1e3, percentile(applies, 99) * 1e3
        row.extra.update(seconds=elapsed, ticks=len(ticks), apply_samples=len(applies),
                         rejected_by_outcome={k: v for k, v in delta.items() if "rejected" in k and v})
        return row

    # -------------------------------------------------------------- scenarios

    def _fleet_ids(self, index: int) -> list[int]:
        cfg = self.cfg
        return [d for d in range(1, cfg.datanodes + 1) if d % cfg.loadgens == index]

    def _owner(self, datanode_id: int) -> int:
        return datanode_id % self.cfg.loadgens

    def start(self) -> None:
        cfg = self.cfg
        self.log("starting the service")
        self.host = ServiceHost()
        addr = self.host.start()
        self.rss.start()
        self.log(f"service on {addr}; starting {cfg.loadgens} load generators")
        self.gens = LoadGens(cfg.loadgens, addr, cfg.channels)
        self.gens.call([("fleet", self._fleet_ids(i), cfg.regions, cfg.period_s) for i in range(cfg.loadgens)])
        want = cfg.datanodes * cfg.regions
        deadline = time.monotonic() + max(60.0, 4 * cfg.period_s)
        while self.host.detectors() < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.host.detectors()} of {want} detectors after the fleet started")
            time.sleep(0.1)
        self.log(f"{want:,} detectors in the table")

    def stop(self) -> None:
        """Stop what `start` started and is still running: the load generators, the service, the sampler."""
        if self.gens is not None:
            self.gens.close()
        if self.host is not None:
            self.host.stop()
        self.rss.stop()

    def steady_dump_failover(self) -> None:
        cfg = self.cfg
        host = self.host
        opts = host.service.settings.detector_options()
        victim = (cfg.datanodes + 1) // 2
        failover_begin = None
        if cfg.failover:
            self.log(f"datanode {victim} stops ({cfg.regions} regions)")
            failover_begin = self.begin()
            self.gens.one(self._owner(victim), "stop", victim)
            crossing = self._crossing(victim, opts)
        begin = self.begin()
        time.sleep(cfg.steady_s)
        period_label = f"{cfg.period_s:g} s period"
        steady = self.end(f"steady: {cfg.datanodes:,} x {cfg.regions:,} regions, {period_label}", begin)
        self.rows.append(steady)

        self.log("dump of every detector")
        begin = self.begin()
        dump = self.gens.one(0, "dump", cfg.dump_page_size)
        row = self.end("dump: every detector, during steady", begin)
        row.result = f"{dump['rows']:,} rows in {dump['seconds']:.2f} s (first page {dump['first_page_s'] * 1e3:.0f} ms)"
        row.extra.update(dump=dump)
        self.rows.append(row)

        if cfg.failover:
            self._await_failover(victim, crossing, failover_begin, opts)

    def _crossing(self, victim: int, opts: PhiAccrualOptions) -> dict:
        from supervisor_service.client import SupervisorClient

        with SupervisorClient(self.host.service.addresses.grpc, timeout=30) as client:
            _, rows = client.dump(datanode_ids=[victim])
        if not rows:
            raise RuntimeError(f"datanode {victim} has no detectors to watch")
        crossings = [predicted_crossing_ms(r, opts) for r in rows]
        return {"first": min(crossings), "last": max(crossings), "regions": len(rows),
                "last_heartbeat": max(r.last_heartbeat_millis for r in rows)}

    def _await_failover(self, victim: int, crossing: dict, begin: dict, opts: PhiAccrualOptions) -> None:
        host = self.host
        journal = host.service.remotes.journal
        tick_ms = host.service.settings.tick_interval_ms
        deadline_ms = crossing["last"] + 30_000
        self.log(f"waiting for the failover of datanode {victim} "
                 f"(predicted crossing in {(crossing['first'] - host.service.clock.now_ms()) / 1e3:.1f} s)")
        submitted: list = []
        while host.service.clock.now_ms() < deadline_ms:
            submitted = [e for e in journal.entries(100_000) if e.from_peer.id == victim]
            moved = sum(len(e.region_ids) for e in submitted)
            if moved >= crossing["regions"]:
                break
            time.sleep(0.05)
        row = self.end(f"failover: datanode {victim} ({crossing['regions']:,} regions) stops", begin)
        if submitted:
            first = min(e.at_millis for e in submitted)
            last = max(e.at_millis for e in submitted)
            delay = first - crossing["first"]
            # The tick that caught it: the first one that ran at or after the crossing.
            ticks = sorted(t for t in host.tick_tap.stamps if t >= crossing["first"] - 1)
            caught = ticks[0] if ticks else None
            row.result = (f"submitted {delay:+,} ms after predicted crossing: first tick after it "
                          f"+{caught - crossing['first']:,.0f} ms, submission +{first - caught:,.0f} ms after that tick"
                          if caught is not None else f"submitted {delay:+,} ms after predicted crossing")
            row.extra.update(failover_delay_ms=delay, last_submission_delay_ms=last - crossing["last"],
                             crossing_after_last_heartbeat_ms=crossing["first"] - crossing["last_heartbeat"],
                             tick_interval_ms=tick_ms, regions_submitted=sum(len(e.region_ids) for e in submitted),
                             tick_after_crossing_ms=None if caught is None else caught - crossing["first"],
                             submission_after_tick_ms=None if caught is None else first - caught)
        else:
            row.result = "NOT submitted within 30 s of the predicted crossing"
            row.extra.update(failover_delay_ms=None)
        self.rows.append(row)
        self.gens.one(self._owner(victim), "start", victim)
        want = self.cfg.datanodes * self.cfg.regions
        deadline = time.monotonic() + 2 * self.cfg.period_s + 5
        while host.detectors() < want and time.monotonic() < deadline:
            time.sleep(0.05)

    # -------------------------------------------------------------- all

    def run(self) -> list[Row]:
        started = time.monotonic()
        cpu_count = os.cpu_count()
        cfg = self.cfg
        floods = Floods(self)
        try:
            self.start()
            self.steady_dump_failover()
            modes = (True, False) if cfg.best_case else (True,)
            for stamped in modes:
                floods.big(stamped)
            for stamped in modes:
                floods.small(stamped)
            if cfg.churn_datanodes and cfg.churn_regions:
                floods.churned()
            if cfg.change_every:  # last: the fleet's histories are no longer all alike after it
                floods.big(True, cfg.change_every)
                floods.small(True, cfg.change_every)
            # The ceiling runs alone: the fleet stops and the service with it.
            self.gens.all("fleet_stop")
            self.host.stop()
            self.host = None
            sizes = ((cfg.datanodes, cfg.regions), (cfg.small_datanodes, cfg.small_regions))
            for stamped in modes:
                for streams, regions in sizes:
                    self.rows.append(ceiling.measure(self, streams, regions, stamped))
            if cfg.change_every:
                for streams, regions in sizes:
                    self.rows.append(ceiling.measure(self, streams, regions, True, cfg.change_every))
            if cfg.tls:
                self.rows.extend(tls.measure(self, sizes, ServiceHost))
        finally:
            self.stop()
        _pair_floors(self.rows)
        if cfg.in_process:
            self.rows.extend(curve.in_process_rows(cfg, self.log))
        result = baseline.run_in_child(cfg, self.log)
        self.rows.extend(baseline_rows(result))
        self.notes.extend(summary_notes(self.rows, result))
        self.notes.insert(0, f"{cpu_count} CPUs; {self.cfg.loadgens} load-generator processes; "
                             f"run took {time.monotonic() - started:.0f} s")
        return self.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor_service.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (the whole run in a few minutes)")
    parser.add_argument("--curve", action="store_true",
                        help="instead: the cost as the work grows, in-process (see bench.curve), best and worst case")
    parser.add_argument("--curve-sizes", default=",".join(map(str, curve.DEFAULT_SIZES)),
                        help="detectors of each curve point, comma-separated (default %(default)s)")
    parser.add_argument("--curve-regions", type=int, default=1000,
                        help="regions per datanode on the curve (default 1000: the datanodes vary)")
    parser.add_argument("--budget", type=float,
                        help="seconds an in-process point may spend building its table before it stops adding "
                             "datanodes (default 60, or 200 per million detectors when more)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: py-spy record of the service under the stamped fleet flood, top entries")
    parser.add_argument("--profile-native", action="store_true", help="with --profile: C frames too (py-spy --native)")
    parser.add_argument("--datanodes", type=int, help="datanode streams of the fleet (default 1000)")
    parser.add_argument("--regions", type=int, help="regions per fleet datanode (default 1000)")
    parser.add_argument("--period", type=float, help="fleet heartbeat period, seconds (default 3)")
    parser.add_argument("--loadgens", type=int, help="load-generator processes (default 2)")
    parser.add_argument("--channels", type=int, help="HTTP/2 connections per load generator (default 4)")
    parser.add_argument("--small-datanodes", type=int, help="streams of the small-message flood (default 1000)")
    parser.add_argument("--seconds", type=float, help="length of each measured window")
    parser.add_argument("--churn-datanodes", type=int,
                        help="streams of the churned-histories scenario (default 100, --quick 50; 0: skip it)")
    parser.add_argument("--churn-regions", type=int, help="their regions, joined one heartbeat apart "
                        "(default 300, --quick 200; never more streams or regions than the fleet's)")
    parser.add_argument("--change-every", type=int,
                        help="the changing-region-set floods change the set every this many messages (default 10; "
                             "0: skip them)")
    parser.add_argument("--no-best-case", action="store_true", help="skip the identical-bytes (best case) rows")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process worst-case rows")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover scenario")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS on / off rows")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--verbose", action="store_true", help="let the service log (warnings and up)")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("supervisor_service").setLevel(logging.ERROR)
    if args.curve:
        return curve_main(args)
    cfg = Config.quick_config() if args.quick else Config()
    for name, attr in (("datanodes", "datanodes"), ("regions", "regions"), ("period", "period_s"),
                       ("loadgens", "loadgens"), ("channels", "channels"), ("small_datanodes", "small_datanodes"),
                       ("churn_datanodes", "churn_datanodes"), ("churn_regions", "churn_regions"),
                       ("change_every", "change_every"), ("budget", "in_process_budget_s")):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, attr, value)
    if args.seconds is not None:
        cfg.steady_s = cfg.flood_s = cfg.small_s = cfg.churn_s = args.seconds
        cfg.ceiling_s = max(1.0, args.seconds * 0.75)
    cfg.failover = not args.no_failover
    cfg.tls = not args.no_tls
    cfg.best_case = not args.no_best_case
    cfg.in_process = not args.no_in_process
    cfg.churn_datanodes = min(cfg.churn_datanodes, cfg.datanodes)
    cfg.churn_regions = min(cfg.churn_regions, cfg.regions)
    if args.profile:
        from supervisor_service.bench.profile import profile_main

        return profile_main(Bench(cfg), args.seconds or 10.0, args.profile_native)
    bench = Bench(cfg)
    rows = bench.run()
    print(render(rows))
    print()
    for note in bench.notes:
        print(f"- {note}")
    print()
    for name, met, measured in targets(bench.rows, bench.cfg):
        mark = "n/a (below 1M detectors)" if met is None else ("met" if met else "NOT met")
        print(f"- target {name}: {mark} ({measured})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "rows": [asdict(r) for r in rows], "notes": bench.notes,
                       "targets": targets(bench.rows, bench.cfg)}, f, indent=2, default=str)
    return 0


def curve_main(args) -> int:
    """`--curve`: every point in its own child, one table, then how each cost grew."""
    started = time.monotonic()
    sizes = tuple(int(x.replace("_", "")) for x in args.curve_sizes.split(",") if x.strip())
    points = curve.points_of(sizes, args.curve_regions, args.budget)
    log = lambda message: print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,  # noqa: E731
                                flush=True)
    summaries = curve.run_curve(points, log)
    print(render([curve.CurveRow(s) for s in summaries], curve.CURVE_COLUMNS))
    print()
    print(f"- {os.cpu_count()} CPUs; each point in a fresh process; curve took {time.monotonic() - started:.0f} s")
    for note in curve.linearity_notes(summaries):
        print(f"- {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"curve": summaries}, f, indent=2, default=str)
    return 0
