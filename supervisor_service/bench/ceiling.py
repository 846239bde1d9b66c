"""The transport ceiling: a no-op grpc.aio server that parses each heartbeat and answers a constant.

Driven by the same load generators as the service, it shows what gRPC alone
(one asyncio loop, one process, Python protobuf) carries on this machine: the
service cannot go faster than this, whatever its table does.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from supervisor_service.bench.loadgen import pipe_commands
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
