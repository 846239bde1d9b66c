"""The transport ceiling: a no-op grpc.aio server that parses each heartbeat and answers a constant.

Driven by the same load generators as the service, it shows what gRPC alone
(one asyncio loop, one process, Python protobuf) carries on this machine: the
service cannot go faster than this, whatever its table does.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import grpc

from supervisor_service.bench.floods import SMALL_ID_BASE, changing
from supervisor_service.bench.loadgen import pipe_commands
from supervisor_service.bench.rows import Row
from supervisor_service.proto import pb


def main(conn) -> None:
    """Entry point of the child process: sends {"port": ...}; answers ("stats",) and ("quit",) with counts."""
    asyncio.run(_serve(conn))


async def _serve(conn) -> None:
    answer = pb.HeartbeatResponse(accepted_regions=1, is_leader=True).SerializeToString()
    count = 0

    async def send_heartbeat(requests, context):
        nonlocal count
        async for request in requests:
            pb.HeartbeatRequest.FromString(request)
            count += 1
            yield answer

    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 20_000)])
    handler = grpc.stream_stream_rpc_method_handler(send_heartbeat)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("supervisor.v1.RegionSupervisor", {"SendHeartbeat": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    commands = pipe_commands(conn)
    conn.send({"port": port})
    while True:
        command = await commands.get()
        conn.send({"messages": count, "cpu": time.process_time()})
        if command[0] == "quit":
            break
    await server.stop(0)


def measure(bench, streams: int, regions: int, stamped: bool = True, change_every: int = 0) -> Row:
    """The no-op server in a child process, flooded by the bench's load generators (streams of ids apart
    from the fleet's) for `ceiling_s`: its messages/s and CPU per message, as a row."""
    cfg = bench.cfg
    bench.log(f"gRPC ceiling: no-op server, {streams:,} streams x {regions:,} regions per message"
              + ("" if stamped else ", identical bytes") + (f", {changing(change_every)}" if change_every else ""))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=main, args=(child,), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("the no-op server did not start")
        port = parent.recv()["port"]
        ids = list(range(SMALL_ID_BASE + 1, SMALL_ID_BASE + streams + 1))
        parts = [[d for d in ids if d % cfg.loadgens == i] for i in range(cfg.loadgens)]
        parent.send(("stats",))
        before = parent.recv()
        started = time.monotonic()
        replies = bench.gens.call([("extra", f"127.0.0.1:{port}", part, regions, cfg.ceiling_s, cfg.window,
                                    stamped, False, change_every) for part in parts])
        elapsed = time.monotonic() - started
        parent.send(("stats",))
        after = parent.recv()
    finally:
        try:
            parent.send(("quit",))
            parent.poll(5) and parent.recv()
        except (OSError, EOFError):
            pass
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    messages = after["messages"] - before["messages"]
    server_cpu = after["cpu"] - before["cpu"]
    name = f"gRPC ceiling: no-op server, {regions:,} regions/message"
    if change_every:
        name += f", {changing(change_every)}"
    elif not stamped:
        name += ", identical bytes (best case)"
    row = Row(
        scenario=name,
        detectors=0,
        msgs_s=messages / elapsed,
        region_hb_s=messages * regions / elapsed,
        cpu_service=server_cpu / elapsed,
        cpu_load=sum(r["cpu"] for r in replies) / elapsed,
        cpu_us_msg=server_cpu / messages * 1e6 if messages else None,
        rejected=0,
        errors=sum(r["errors"] for r in replies),
        result="what grpc.aio alone carries here",
        extra={"pair": (regions, stamped, change_every) if change_every else (regions, stamped), "floor": True},
    )
    return row
