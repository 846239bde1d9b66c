"""The naive baseline: one Python detector object per region, beside the detector table, in-process.

Both are fed the same heartbeat sequence (datanodes heartbeating all their
regions with one timestamp, every `period_ms`), in the same process, one after
the other, so their ratio holds on a noisy machine:

- apply: region-heartbeats per second (`dict` of
  `supervisor_service.detector.PhiAccrualFailureDetector`, one `heartbeat`
  call per region, against `DetectorTable.heartbeat` per message);
- tick: one sweep of phi over every detector plus the failed set, scaled
  linearly to the target number of detectors;
- memory per detector, from the process's resident set before and after
  building, measured with full 1,000-sample windows (what a long-running
  service holds), on a population small enough to fill quickly.

Runs in a child process of its own, so its memory does not count against the
service's.
"""

from __future__ import annotations

import gc
import multiprocessing
import time

import numpy as np

from supervisor_service.bench.loadgen import region_ids_of
from supervisor_service.core import DetectorTable, PhiAccrualFailureDetector, PhiAccrualOptions

START_MS = 1_700_000_000_000


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set of a process (this one by default), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _fleet(datanodes: int, regions: int) -> list[tuple[int, list[int], np.ndarray]]:
    out = []
    for d in range(1, datanodes + 1):
        ids = region_ids_of(d, regions)
        out.append((d, ids, np.asarray(ids, dtype=np.uint64)))
    return out


def _apply_rate(datanodes: int, regions: int, rounds: int, period_ms: int, opts: PhiAccrualOptions):
    """(naive, table, naive dict, table): region-heartbeats/s of each, fed the same sequence."""
    fleet = _fleet(datanodes, regions)
    naive: dict[tuple[int, int], PhiAccrualFailureDetector] = {}
    for d, ids, _ in fleet:
        for r in ids:
            fd = naive[(d, r)] = PhiAccrualFailureDetector(opts)
            fd.heartbeat(START_MS)
    started = time.perf_counter()
    for k in range(1, rounds + 1):
        ts = START_MS + k * period_ms
        for d, ids, _ in fleet:
            for r in ids:
                naive[(d, r)].heartbeat(ts)
    naive_rate = rounds * datanodes * regions / (time.perf_counter() - started)

    table = DetectorTable(opts)
    for d, _, arr in fleet:
        table.heartbeat(d, arr, START_MS)
    started = time.perf_counter()
    for k in range(1, rounds + 1):
        ts = START_MS + k * period_ms
        for d, _, arr in fleet:
            table.heartbeat(d, arr, ts)
    table_rate = rounds * datanodes * regions / (time.perf_counter() - started)
    return naive_rate, table_rate, naive, table


def _sweep_ms(naive, table: DetectorTable, now: int, opts: PhiAccrualOptions, repeat: int = 3):
    """Best-of time (ms) of one phi sweep plus failed set: naive, table."""
    threshold = opts.threshold
    best_naive = best_table = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        failed = [key for key, fd in naive.items() if fd.phi(now) >= threshold]
        best_naive = min(best_naive, time.perf_counter() - started)
        started = time.perf_counter()
        failed_t = dict(table.failed(now))
        sum(size for _, size in table.phi_sizes(now))
        best_table = min(best_table, time.perf_counter() - started)
    del failed, failed_t
    return best_naive * 1000, best_table * 1000


def _interval_jitter(k: int) -> int:
    """Interval values vary (as real ones do), so they are distinct int objects, not cached small ints."""
    return (k * 7919) % 97 if k else 0


def _naive_bytes_per_detector(datanodes: int, regions: int, samples: int, period_ms: int, opts) -> float:
    fleet = _fleet(datanodes, regions)
    gc.collect()
    before = rss_bytes()
    naive = {}
    for d, ids, _ in fleet:
        for r in ids:
            naive[(d, r)] = PhiAccrualFailureDetector(opts)
    for k in range(samples + 1):
        ts = START_MS + k * period_ms + _interval_jitter(k)
        for d, ids, _ in fleet:
            for r in ids:
                naive[(d, r)].heartbeat(ts)
    gc.collect()
    return (rss_bytes() - before) / (datanodes * regions), naive


def _table_bytes_per_detector(datanodes: int, regions: int, samples: int, period_ms: int, opts) -> float:
    fleet = _fleet(datanodes, regions)
    gc.collect()
    before = rss_bytes()
    table = DetectorTable(opts)
    for k in range(samples + 1):
        ts = START_MS + k * period_ms + _interval_jitter(k)
        for d, _, arr in fleet:
            table.heartbeat(d, arr, ts)
    gc.collect()
    return (rss_bytes() - before) / (datanodes * regions), table


def run(
    *, datanodes: int, regions: int, rounds: int, target_detectors: int, period_ms: int = 3000,
    naive_memory_datanodes: int = 2, table_memory_datanodes: int = 100, memory_samples: int = 1000,
) -> dict:
    opts = PhiAccrualOptions()
    # Memory first, in a fresh process, both kept alive: freed memory would be reused and hide growth.
    table_mem, keep_table = _table_bytes_per_detector(table_memory_datanodes, regions, memory_samples, period_ms, opts)
    naive_mem, keep_naive = _naive_bytes_per_detector(naive_memory_datanodes, regions, memory_samples, period_ms, opts)
    del keep_table, keep_naive
    gc.collect()
    naive_rate, table_rate, naive, table = _apply_rate(datanodes, regions, rounds, period_ms, opts)
    now = START_MS + rounds * period_ms + 1000
    naive_ms, table_ms = _sweep_ms(naive, table, now, opts)
    detectors = datanodes * regions
    scale = target_detectors / detectors
    return {
        "detectors": detectors,
        "rounds": rounds,
        "naive_apply_rate": naive_rate,
        "table_apply_rate": table_rate,
        "naive_sweep_ms": naive_ms * scale,
        "table_sweep_ms": table_ms * scale,
        "naive_bytes_per_detector": naive_mem,
        "table_bytes_per_detector": table_mem,
        "memory_samples": memory_samples,
        "target_detectors": target_detectors,
    }


def main(conn, kwargs: dict) -> None:
    """Entry point of the child process."""
    try:
        conn.send(run(**kwargs))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        conn.send({"error": repr(exc)})


def run_in_child(cfg, log) -> dict:
    """`run` in a child process at the bench's sizes; its result."""
    log("naive baseline and table, in-process (child process)")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    kwargs = dict(datanodes=cfg.baseline_datanodes, regions=cfg.regions, rounds=cfg.baseline_rounds,
                  target_detectors=cfg.datanodes * cfg.regions, period_ms=int(cfg.period_s * 1000),
                  naive_memory_datanodes=cfg.baseline_naive_memory_datanodes)
    proc = ctx.Process(target=main, args=(child, kwargs), daemon=True)
    proc.start()
    if not parent.poll(300):
        proc.kill()
        raise RuntimeError("the baseline did not finish")
    result = parent.recv()
    proc.join(5)
    if "error" in result:
        raise RuntimeError(f"baseline failed: {result['error']}")
    return result
