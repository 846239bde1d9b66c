"""`make soak` (`python -m supervisor_service.bench.soak`): the real service for a long while, under churn.

A `supervisor-service serve` process (SQLite store in a temporary directory,
metrics on, embedded dry-run RegionMigration, default settings otherwise)
is driven by load-generator processes (`bench.loadgen`: one bidi stream per
datanode over 127.0.0.1). While the fleet heartbeats:

- every `--churn` seconds one datanode crashes for good (its stream ends)
  and must be failed over exactly once; another pauses for 3 s (well under
  `acceptable_heartbeat_pause_ms`) and must not be;
- every `--stall-every` seconds the service itself is SIGSTOPped for 7 s
  (longer than `max_local_pause_ms`): nothing may be failed over for it;
- every minute a Dump of every detector is read, and a row is printed:
  heartbeats, rejections, queue depth, RSS, the Dump's time, regions
  failed over so far and the holds in force.

Crashes stop 40 s before the end so the last is detected in time. The
summary compares the dry-run journal with what really happened; the exit
status is 1 on a missed or a false failover, or a dead service. Nothing is
timed against a limit: RSS and rates are measured and printed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from supervisor_service.bench.baseline import rss_bytes
from supervisor_service.bench.runner import LoadGens
from supervisor_service.client import SupervisorClient

PAUSE_S = 3.0
STALL_S = 7.0
QUIET_END_S = 40.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Soak:
    minutes: float = 10.0
    datanodes: int = 200
    regions: int = 50
    period_s: float = 0.5
    churn_s: float = 30.0
    stall_every_s: float = 120.0
    seed: int = 1
    crashed: dict[int, float] = field(default_factory=dict)  # datanode -> when it crashed
    paused: list[int] = field(default_factory=list)
    stalls: int = 0

    def run(self) -> int:
        rng = random.Random(self.seed)
        workdir = tempfile.mkdtemp(prefix="supervisor-soak-")
        grpc_addr, metrics_addr = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
        env = dict(os.environ, SUPERVISOR_GRPC_ADDR=grpc_addr, SUPERVISOR_METRICS_ADDR=metrics_addr,
                   SUPERVISOR_DATA_DIR=workdir, SUPERVISOR_LOG_FORMAT="json")
        log = open(os.path.join(workdir, "service.log"), "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "supervisor_service.cli", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        print(f"# soak: {self.minutes:g} min, {self.datanodes} datanodes x {self.regions} regions every "
              f"{self.period_s:g} s; service pid {proc.pid}, log {workdir}/service.log", flush=True)
        gens = None
        try:
            _wait_serving(grpc_addr, proc)
            gens = LoadGens(2, grpc_addr, channels=2)
            ids = list(range(1, self.datanodes + 1))
            owner = {d: i % 2 for i, d in enumerate(ids)}
            gens.call([("fleet", [d for d in ids if owner[d] == i], self.regions, self.period_s) for i in (0, 1)])
            rows = self._drive(rng, proc, gens, owner, ids, grpc_addr, metrics_addr)
            return self._summary(rows, proc, grpc_addr)
        finally:
            if gens is not None:
                gens.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    def _drive(self, rng, proc, gens, owner, ids, grpc_addr, metrics_addr) -> list[dict]:
        start = time.monotonic()
        end = start + self.minutes * 60
        next_churn, next_stall, next_row = start + self.churn_s, start + self.stall_every_s, start + 60
        rows: list[dict] = []
        print("| minute | detectors | heartbeats/s | rejected | queue depth | RSS MiB | dump s "
              "| regions failed over | holds |", flush=True)
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        last = _scrape(metrics_addr)
        last_at = start
        while (now := time.monotonic()) < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}")
            alive = [d for d in ids if d not in self.crashed]
            if now >= next_churn and now < end - QUIET_END_S and len(alive) > 10:
                victim, pauser = rng.sample(alive, 2)
                gens.one(owner[victim], "stop", victim)
                self.crashed[victim] = time.time()
                gens.one(owner[pauser], "stop", pauser)
                time.sleep(PAUSE_S)
                gens.one(owner[pauser], "start", pauser)
                self.paused.append(pauser)
                next_churn += self.churn_s
            elif now >= next_stall and now < end - QUIET_END_S:
                proc.send_signal(signal.SIGSTOP)
                time.sleep(STALL_S)
                proc.send_signal(signal.SIGCONT)
                self.stalls += 1
                next_stall += self.stall_every_s
            elif now >= next_row:
                metrics = _scrape(metrics_addr)
                took = _timed_dump(grpc_addr)
                row = _row(len(rows) + 1, last, metrics, now - last_at, proc.pid, took)
                rows.append(row)
                print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
                last, last_at = metrics, now
                next_row += 60
            else:
                time.sleep(0.2)
        return rows

    def _summary(self, rows: list[dict], proc, grpc_addr: str) -> int:
        with SupervisorClient(grpc_addr, timeout=30) as client:
            _, entries = client.journal(100_000)
        submitted: dict[int, list[int]] = {}  # datanode -> when its submissions went out (ms)
        for e in entries:
            submitted.setdefault(e.from_peer.id, []).append(e.at_millis)
        # Submissions for one datanode less than 30 s apart are one failover (its batches).
        failovers = {d: 1 + sum(b - a > 30_000 for a, b in zip(sorted(ts), sorted(ts)[1:]))
                     for d, ts in submitted.items()}
        missed = sorted(d for d in self.crashed if d not in failovers)
        false = sorted(d for d in failovers if d not in self.crashed)
        repeated = sorted(d for d, n in failovers.items() if d in self.crashed and n > 1)
        delays = sorted(
            min(submitted[d]) / 1000 - t for d, t in self.crashed.items() if d in submitted
        )
        rss = [r["RSS MiB"] for r in rows]
        alive = proc.poll() is None
        print()
        print("| measure | value |")
        print("|---|---|")
        print(f"| crashes (failed over / missed / more than once) | {len(self.crashed)} ({len(self.crashed) - len(missed)}"
              f" / {len(missed)} / {len(repeated)}) |")
        print(f"| datanodes paused {PAUSE_S:g} s, and false failovers | {len(self.paused)}, {len(false)} |")
        print(f"| service SIGSTOPped {STALL_S:g} s | {self.stalls} times |")
        if delays:
            print(f"| crash to first submission, s (min / median / max) | {delays[0]:.1f} / "
                  f"{delays[len(delays) // 2]:.1f} / {delays[-1]:.1f} |")
        if rss:
            print(f"| RSS MiB (first minute / last / max) | {rss[0]} / {rss[-1]} / {max(rss)} |")
        print(f"| service alive at the end | {'yes' if alive else 'NO'} |")
        ok = alive and not missed and not false and not repeated
        if not ok:
            print(f"soak FAILED: missed {missed}, false {false}, repeated {repeated}, alive {alive}")
        return 0 if ok else 1


def _wait_serving(addr: str, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode} at start")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the service at {addr} was not SERVING within {timeout} s")


def _scrape(addr: str) -> dict[str, float]:
    """Every sample of the service's /metrics, keyed by name and labels."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    return out


def _sum(metrics: dict[str, float], prefix: str, contains: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and contains in k)


def _timed_dump(addr: str) -> float:
    started = time.perf_counter()
    with SupervisorClient(addr, timeout=60) as client:
        client.dump()
    return time.perf_counter() - started


def _row(minute: int, before: dict, after: dict, seconds: float, pid: int, dump_s: float) -> dict:
    accepted = "supervisor_heartbeats_total{outcome=accepted}"
    return {
        "minute": minute,
        "detectors": int(after.get("supervisor_detectors", 0)),
        "heartbeats/s": round((after.get(accepted, 0) - before.get(accepted, 0)) / seconds),
        "rejected": int(_sum(after, "supervisor_heartbeats_total", "rejected")),
        "queue depth": int(after.get("supervisor_event_queue_depth", 0)),
        "RSS MiB": round(rss_bytes(pid) / (1024 * 1024)),
        "dump s": round(dump_s, 2),
        "regions failed over": int(_sum(after, "supervisor_failover_regions_total", "result=submitted")),
        "holds": ",".join(k.split("reason=")[1].rstrip("}") for k, v in after.items()
                          if k.startswith("supervisor_failover_hold{") and v) or "-",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m supervisor_service.bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)),
                   help="how long (default $SOAK_MINUTES or 10)")
    p.add_argument("--datanodes", type=int, default=200)
    p.add_argument("--regions", type=int, default=50, help="regions per datanode (default 50)")
    p.add_argument("--period", type=float, default=0.5, help="heartbeat period of each datanode, s (default 0.5)")
    p.add_argument("--churn", type=float, default=30.0, help="seconds between crashes (default 30)")
    p.add_argument("--stall-every", type=float, default=120.0, help="seconds between service stalls (default 120)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.datanodes < 12 or args.regions < 1 or args.period <= 0:
        p.error("--minutes and --period must be positive, --datanodes at least 12, --regions at least 1")
    soak = Soak(args.minutes, args.datanodes, args.regions, args.period, args.churn, args.stall_every, args.seed)
    return soak.run()


if __name__ == "__main__":
    sys.exit(main())
