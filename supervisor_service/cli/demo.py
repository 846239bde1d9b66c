"""`supervisor-service demo` (`make demo`): a real failover on the embedded defaults, within a minute.

The service starts in this process on its defaults (embedded PeerLookup, Selector and dry-run
RegionMigration; SQLite in a temporary directory; a free port on the loopback), with a handful
of simulated datanodes heartbeating over real gRPC. After `--kill-after` seconds one of them
stops. The demo prints, as it happens, why the supervisor waits (the detectors learning the
interval, phi rising under the acceptable pause, any hold), the conviction and the failover with
its evidence (ListFailovers), and the commands to look around meanwhile; it ends once the
migration has ended, after `--duration`, or on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import tempfile
import time

HEARTBEAT_S = 1.0
TABLE = 1024


def add_command(sub) -> None:  # type: ignore[no-untyped-def]
    d = sub.add_parser("demo", help="run the service with simulated datanodes and watch one of them fail over")
    d.add_argument("--datanodes", type=int, choices=range(3, 21), default=5, metavar="N",
                   help="simulated datanodes, 3..20 (default 5)")
    d.add_argument("--regions", type=int, choices=range(1, 101), default=4, metavar="N",
                   help="regions per datanode, 1..100 (default 4)")
    d.add_argument("--kill-after", type=float, default=12.0, metavar="S",
                   help="seconds before the last datanode stops heartbeating (default 12)")
    d.add_argument("--duration", type=float, default=90.0, metavar="S", help="give up after this long (default 90)")
    d.add_argument("--plot", metavar="FILE.png", help="at the end, draw the failover (needs matplotlib)")
    d.add_argument("--verbose", action="store_true", help="also show the service's own log lines")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args) -> int:  # type: ignore[no-untyped-def]
    if not 1 <= args.kill_after < args.duration <= 3600:
        print("supervisor-service: error: need 1 <= --kill-after < --duration <= 3600", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        print("\ninterrupted: the service and the datanodes are stopped")
        return 130


def _say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:5.1f} s] {text}", flush=True)


async def _heartbeats(stub, pb, datanode_id: int, regions: list[int], stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    epoch = int(time.time() * 1000)

    async def requests():  # type: ignore[no-untyped-def]
        while not stop.is_set():
            yield pb.HeartbeatRequest(datanode_id=datanode_id, timestamp_millis=int(time.time() * 1000),
                                      region_ids=regions, peer_addr=f"127.0.0.{datanode_id}:4001", node_epoch=epoch)
            try:
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                pass

    call = stub.SendHeartbeat(requests())
    async for _ in call:
        pass


async def _demo(args) -> int:  # type: ignore[no-untyped-def]
    import logging

    import grpc
    from prometheus_client import CollectorRegistry

    from supervisor_service.app.logging import configure_logging
    from supervisor_service.app.service import Service
    from supervisor_service.app.settings import load_settings
    from supervisor_service.cli.insight import clock, print_record
    from supervisor_service.proto import pb, pb_grpc

    t0 = time.monotonic()
    configure_logging("info" if args.verbose else "error")
    if not args.verbose:
        logging.getLogger().setLevel(logging.ERROR)
    tmp = tempfile.TemporaryDirectory(prefix="supervisor-demo-")
    addr = f"127.0.0.1:{_free_port()}"
    settings = load_settings(None, grpc_addr=addr, metrics_addr="", data_dir=tmp.name, store="sqlite")
    service = Service(settings, registry=CollectorRegistry())
    await service.start()
    victim = args.datanodes
    print(f"region-supervisor demo: the service on its defaults at {addr} (state in {tmp.name})")
    print(f"  tick {settings.tick_interval_ms} ms, phi threshold {settings.phi_threshold:g}, acceptable heartbeat "
          f"pause {settings.acceptable_heartbeat_pause_ms / 1000:g} s, guards on; embedded PeerLookup, Selector and "
          "dry-run RegionMigration (decisions are recorded, nothing is moved)")
    print(f"  {args.datanodes} simulated datanodes, {args.regions} regions each, a heartbeat every {HEARTBEAT_S:g} s; "
          f"datanode {victim} stops after {args.kill_after:g} s")
    print("  look around while it runs (in another shell, with the venv on PATH):")
    for cmd in ("dump", f"explain {victim}", "history", f"whatif {victim}",
                f"whatif {' '.join(str(d) for d in range(1, args.datanodes + 1))}"):
        print(f"    supervisor-service {cmd} --addr {addr}")
    channel = grpc.aio.insecure_channel(addr)
    stub = pb_grpc.RegionSupervisorStub(channel)
    stops = {d: asyncio.Event() for d in range(1, args.datanodes + 1)}
    regions = {d: [(TABLE << 32) | (d * 100 + i) for i in range(args.regions)] for d in stops}
    tasks = [asyncio.create_task(_heartbeats(stub, pb, d, regions[d], stops[d])) for d in stops]
    code, record, shown_first, last_verdict = 1, None, False, ""
    # Ctrl-C and SIGTERM end the demo cleanly (the service stopped, its directory removed), even where
    # SIGINT was ignored (a background job of a shell).
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        while time.monotonic() - t0 < args.duration:
            try:
                await asyncio.wait_for(interrupted.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            if interrupted.is_set():
                _say(t0, "interrupted: stopping the datanodes and the service")
                code = 130
                break
            elapsed = time.monotonic() - t0
            if not stops[victim].is_set():
                if elapsed >= args.kill_after:
                    stops[victim].set()
                    _say(t0, f"datanode {victim} stops heartbeating (as if its process died)")
                    w = await stub.WhatIf(pb.WhatIfRequest(datanode_ids=[victim]), timeout=5)
                    _say(t0, f"what if, asked now: {w.summary}")
                elif not shown_first:
                    holds = (await stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), timeout=5)).holds
                    _say(t0, f"{args.datanodes} datanodes heartbeating; their detectors learn the interval"
                         f"{'; failover held: ' + ', '.join(holds) if holds else '; no hold (a fresh store: no warm-up)'}")
                    shown_first = True
                continue
            if record is None:
                found = (await stub.ListFailovers(pb.ListFailoversRequest(datanode_ids=[victim]), timeout=5)).failovers
                if found:
                    record = found[-1]
                    more = f" ({len(found)} decisions, one per target; the first:)" if len(found) > 1 else ":"
                    _say(t0, f"FAILOVER of datanode {victim}: decided, with this evidence and these checks{more}")
                    print_record(record, "    ")
                    continue
                ex = await stub.Explain(pb.ExplainRequest(datanode_id=victim), timeout=5)
                verdict = ex.verdict.split("; ", 1)[1] if "; " in ex.verdict else ex.verdict
                if verdict.split(" (")[0] != last_verdict.split(" (")[0] or int(elapsed) % 3 == 0:
                    why = "" if ex.holds else (" (waiting: phi rises slowly until the acceptable heartbeat pause "
                                               "has passed)" if verdict.startswith("healthy") else "")
                    _say(t0, f"datanode {victim}: {verdict}{why}")
                last_verdict = verdict
                continue
            found = (await stub.ListFailovers(pb.ListFailoversRequest(datanode_ids=[victim]), timeout=5)).failovers
            now = next(r for r in found if r.failover_id == record.failover_id)
            if now.finished_at_millis:
                state = pb.MigrationState.Name(now.final_state)
                _say(t0, f"the migration ended: {state} at {clock(now.finished_at_millis)} (result: {now.result}); "
                     f"`supervisor-service history` shows it")
                if args.plot:
                    from supervisor_service.cli.plot import plot_record

                    plot_record(now, args.plot)
                    _say(t0, f"wrote {args.plot}")
                code = 0
                break
        else:
            _say(t0, f"no failover within {args.duration:g} s")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    finally:
        for ev in stops.values():
            ev.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        await service.stop()
        tmp.cleanup()
    _say(t0, "done: the service and the datanodes are stopped")
    return code
