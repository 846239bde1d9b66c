"""What a benchmark run says: notes against the baselines, and each scale target met or not."""

from __future__ import annotations

from supervisor_service.bench.rows import Config, Row


def summary_notes(rows: list[Row], base: dict) -> list[str]:
    """What the rows say against the naive baseline and the no-op gRPC server, one note each."""
    notes: list[str] = []
    steady = next((r for r in rows if r.scenario.startswith("steady")), None)
    ingest = [r for r in rows if r.scenario.startswith("ingest")]
    best_ingest = max((r.region_hb_s or 0 for r in ingest), default=0)
    note = notes.append
    note(f"table vs naive, same sequence in-process: apply x{base['table_apply_rate'] / base['naive_apply_rate']:,.0f}, "
         f"sweep x{base['naive_sweep_ms'] / max(base['table_sweep_ms'], 1e-9):,.0f} faster, "
         f"memory x{base['naive_bytes_per_detector'] / max(base['table_bytes_per_detector'], 1e-9):,.0f} smaller")
    if steady is not None and steady.tick_p50:
        note(f"service tick p50 {steady.tick_p50:.1f} ms vs naive sweep {base['naive_sweep_ms']:,.0f} ms "
             f"at {base['target_detectors']:,} detectors: x{base['naive_sweep_ms'] / steady.tick_p50:,.0f}")
    if best_ingest:
        note(f"service ingest over gRPC {best_ingest:,.0f} region-heartbeats/s vs naive in-process apply "
             f"{base['naive_apply_rate']:,.0f}/s: x{best_ingest / base['naive_apply_rate']:,.1f}")
    for row in ingest:
        size = row.scenario.split(":")[1].split("regions")[0].strip()
        ceiling = next((r for r in rows if r.scenario.startswith("gRPC ceiling")
                        and r.scenario.endswith(f" {size} regions/message")), None)
        if ceiling is not None and ceiling.msgs_s:
            note(f"{size} regions/message: the service carries {row.msgs_s / ceiling.msgs_s:.0%} of the "
                 f"messages/s a no-op grpc.aio server does with the same load generators")
    return notes


def targets(rows: list[Row], cfg: Config) -> list[tuple[str, bool | None, str]]:
    """(target, met, measured) for each scale target of README "Performance"."""
    find = lambda prefix: next((r for r in rows if r.scenario.startswith(prefix)), None)  # noqa: E731
    out = []
    big = find(f"ingest: {cfg.regions:,} regions")
    small = find(f"ingest: {cfg.small_regions} regions")
    steady = find("steady")
    dump = find("dump")
    failover = find("failover")
    scale = cfg.datanodes * cfg.regions >= 1_000_000
    if big:
        out.append(("ingest >= 10M region-heartbeats/s at 1,000 regions/message", big.region_hb_s >= 10e6,
                    f"{big.region_hb_s:,.0f}/s"))
    if small:
        out.append(("ingest >= 20k messages/s at 10 regions/message", small.msgs_s >= 20e3,
                    f"{small.msgs_s:,.0f}/s"))
    ticks = [r.tick_p50 for r in (steady, dump, failover) if r and r.tick_p50 is not None]
    if ticks:
        out.append(("tick <= 10 ms median at 1M detectors", max(ticks) <= 10, f"{max(ticks):.1f} ms"))
    # The service's process: not the in-process rows' own children, nor the baseline's.
    rss = max(((r.rss_mib or 0) for r in rows if r.detectors and "in_process" not in r.extra
               and not r.scenario.startswith(("naive", "detector"))), default=None)
    if rss is not None:
        out.append(("RSS <= 512 MiB at 1M detectors", rss <= 512, f"{rss:,.0f} MiB peak"))
    if steady and steady.apply_p99 is not None:
        out.append(("apply latency p99 <= 50 ms at 333k region-heartbeats/s", steady.apply_p99 <= 50,
                    f"{steady.apply_p99:.1f} ms at {steady.region_hb_s:,.0f}/s"))
    if failover:
        # Within one tick: submitted by the first tick that ran after the predicted crossing
        # (which comes at most one tick interval after it), not a later one.
        x = failover.extra
        delay, tick = x.get("failover_delay_ms"), x.get("tick_interval_ms", 1000)
        caught, after = x.get("tick_after_crossing_ms"), x.get("submission_after_tick_ms")
        # A tick's stamp is rebuilt from integer ms minus its float duration, so it can read up
        # to 1 ms before the tick's real `now` (the same tolerance picks the catching tick).
        met = delay is not None and caught is not None and -1 <= caught <= tick and 0 <= after < tick
        out.append(("failover submitted within one tick of the predicted crossing", met,
                    "not submitted" if delay is None else
                    f"{delay:+,} ms after the crossing: caught by the first tick after it "
                    f"(+{caught:,.0f} ms; tick {tick} ms), submitted {after:,.0f} ms later"
                    if caught is not None else f"{delay:+,} ms"))
    if dump:
        d = dump.extra["dump"]
        out.append(("Dump of 1M detectors in <= 5 s", d["seconds"] <= 5 and d["rows"] >= 1_000_000 * scale,
                    f"{d['rows']:,} rows in {d['seconds']:.2f} s; ingest {dump.msgs_s:,.0f} msg/s, "
                    f"apply p99 {dump.apply_p99 or 0:.1f} ms meanwhile"))
    for row in rows:  # per message, stamped heartbeats with a constant region set, against the no-op server
        if row.scenario.startswith("ingest") and row.cpu_us_msg and row.floor_us_msg:
            size = row.scenario.split(":")[1].split("regions")[0].strip()
            ratio = row.cpu_us_msg / row.floor_us_msg
            out.append((f"server CPU per message <= 1.25x the no-op server's at {size} regions/message, stamped",
                        ratio <= 1.25, f"{row.cpu_us_msg:,.0f} us vs {row.floor_us_msg:,.0f} us: {ratio:.2f}x"))
    for row in rows:
        x = row.extra.get("in_process")
        if not row.scenario.startswith("worst case, in-process") or not x or "detectors" not in x:
            continue
        p = x["point"]
        shape = f"{p['datanodes']:,} x {p['regions']:,}"
        built = "" if x["complete"] else f" (only {x['datanodes']:,} of {p['datanodes']:,} datanodes built in budget)"
        # At most 50 us for a heartbeat of up to 1,000 regions (a smaller one is not given more per region).
        apply_ok = x["complete"] and x["apply_p50_us"] is not None and x["apply_p50_us"] <= 50
        out.append((f"worst case {shape}: steady apply <= 50 us per {p['regions']:,}-region heartbeat", apply_ok,
                    f"p50 {x['apply_p50_us'] or 0:,.0f} us, p99 {x['apply_p99_us'] or 0:,.0f} us per "
                    f"{p['regions']:,}-region heartbeat{built}"))
        out.append((f"worst case {shape}: tick <= 50 ms", x["complete"] and (x["tick_p50_ms"] or 0) <= 50,
                    f"p50 {x['tick_p50_ms'] or 0:.1f} ms, p99 {x['tick_p99_ms'] or 0:.1f} ms{built}"))
        out.append((f"worst case {shape}: RSS <= 512 MiB (the in-process table and supervisor)",
                    x["complete"] and x["rss_mib"] <= 512,
                    f"{x['rss_mib']:,.0f} MiB (peak {x['rss_peak_mib']:,.0f}){built}"))
    if not scale:
        out = [(name, None, measured) for name, _, measured in out]
    return out
