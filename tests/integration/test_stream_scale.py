"""1000 datanodes at once: one SendHeartbeat stream each, all open together, every heartbeat applied.

The client side is grpc.aio on one event loop (a few channels), as a
datanode fleet would be many connections: the point is the service's edge
(one asyncio loop for every stream, the bounded event queue, the single
consumer), not the client.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from supervisor_service.client import SupervisorClient
from supervisor_service.proto import pb, pb_grpc

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(90)]

DATANODES = 1000
REGIONS_PER_DATANODE = 10
HEARTBEATS = 3
CHANNELS = 4


def regions_of(datanode_id: int) -> list[int]:
    return [(datanode_id << 32) | n for n in range(REGIONS_PER_DATANODE)]


async def run_fleet(addr: str, svc) -> tuple[list[list[pb.HeartbeatResponse]], float]:
    """Every datanode opens its stream, heartbeats once, waits for all others, then heartbeats twice more."""
    channels = [grpc.aio.insecure_channel(addr) for _ in range(CHANNELS)]
    stubs = [pb_grpc.RegionSupervisorStub(c) for c in channels]
    all_open = asyncio.Barrier(DATANODES)
    open_streams: list[float] = []

    async def datanode(datanode_id: int) -> list[pb.HeartbeatResponse]:
        call = stubs[datanode_id % CHANNELS].SendHeartbeat(timeout=60)
        responses = []
        for i in range(HEARTBEATS):
            await call.write(pb.HeartbeatRequest(
                datanode_id=datanode_id,
                timestamp_millis=int(time.time() * 1000),
                region_ids=regions_of(datanode_id),
                peer_addr=f"10.1.{datanode_id // 250}.{datanode_id % 250 + 1}:4001",
            ))
            response = await call.read()
            assert response is not grpc.aio.EOF, f"datanode {datanode_id}: stream ended early"
            responses.append(response)
            if i == 0 and await all_open.wait() == 0:
                # Every stream is open and has been answered once: the service holds them all.
                open_streams.append(svc.registry.get_sample_value("supervisor_heartbeat_streams"))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        return responses

    started = time.monotonic()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(datanode(d) for d in range(1, DATANODES + 1))), timeout=60
        )
    finally:
        for c in channels:
            await c.close()
    assert open_streams == [DATANODES], open_streams
    return results, time.monotonic() - started


def test_thousand_concurrent_heartbeat_streams(service):
    svc = service(tick_interval_ms=1000)
    results, elapsed = asyncio.run(run_fleet(svc.addresses.grpc, svc))

    assert len(results) == DATANODES
    problems = [
        (d, r.accepted_regions, r.reason)
        for d, responses in enumerate(results, start=1)
        for r in responses
        if r.rejected or r.accepted_regions != REGIONS_PER_DATANODE or r.datanode_id != d
    ]
    assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
    assert all(len(responses) == HEARTBEATS for responses in results)
    assert all(r.is_leader for responses in results for r in responses)

    with SupervisorClient(svc.addresses.grpc, timeout=30) as client:
        header, rows = client.dump()
    pairs = {(r.datanode_id, r.region_id) for r in rows}
    assert len(rows) == len(pairs) == DATANODES * REGIONS_PER_DATANODE
    assert pairs == {(d, r) for d in range(1, DATANODES + 1) for r in regions_of(d)}
    # Three heartbeats each: the two seed intervals plus two observed ones, and nobody failed.
    assert {r.sample_count for r in rows} == {2 + HEARTBEATS - 1}
    assert not any(r.phi >= 8.0 for r in rows)
    assert header.is_leader
    accepted = svc.registry.get_sample_value("supervisor_heartbeats_total", {"outcome": "accepted"})
    assert accepted == DATANODES * HEARTBEATS
    print(f"{DATANODES} streams x {HEARTBEATS} heartbeats in {elapsed:.2f} s")
