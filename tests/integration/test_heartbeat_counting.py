"""Every heartbeat message counted once, under its outcome, with its regions: many SendHeartbeat
streams at once, stamped heartbeats (the edge's restamp path) whose region set changes now and
then, some rejected and some applied with a field ignored, while /metrics is scraped."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import pytest

from supervisor_service.proto import pb, pb_grpc

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

STREAMS = 120
MESSAGES = 60
CHANNELS = 4
SERIES = ("supervisor_heartbeats_total", "supervisor_heartbeat_regions_total")


def message(datanode_id: int, i: int) -> tuple[pb.HeartbeatRequest, str]:
    """The i-th message of a datanode's stream and the outcome it must be counted under: mostly
    accepted, the region set changing every 10th, now and then another datanode's id (rejected)
    or an address that is not one (applied, the address ignored)."""
    regions = [(datanode_id << 16) | r for r in range(1 + (datanode_id + i // 10) % 9)]
    sender, addr, outcome = datanode_id, f"10.2.0.{datanode_id % 250 + 1}:4001", "accepted"
    if i and (datanode_id + i) % 17 == 0:
        sender, outcome = datanode_id + 100_000, "rejected_invalid"
    elif (datanode_id * 7 + i) % 23 == 0:
        addr, outcome = "not an address", "accepted_with_warning"
    request = pb.HeartbeatRequest(
        datanode_id=sender, region_ids=regions, peer_addr=addr, node_epoch=5,
        timestamp_millis=int(time.time() * 1000),
    )
    return request, outcome


async def drive(addr: str) -> tuple[Counter, Counter, Counter]:
    """All streams at once; what was sent, by outcome (messages and regions), and what was answered."""
    channels = [grpc.aio.insecure_channel(addr) for _ in range(CHANNELS)]
    stubs = [pb_grpc.RegionSupervisorStub(c) for c in channels]
    messages, regions, answered = Counter(), Counter(), Counter()

    async def stream(datanode_id: int) -> None:
        call = stubs[datanode_id % CHANNELS].SendHeartbeat(timeout=60)
        for i in range(MESSAGES):
            request, outcome = message(datanode_id, i)
            await call.write(request)
            response = await call.read()
            assert response is not grpc.aio.EOF
            messages[outcome] += 1
            regions[outcome] += len(request.region_ids)
            answered["rejected" if response.rejected else "warned" if response.reason else "accepted"] += 1
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK

    try:
        await asyncio.wait_for(asyncio.gather(*(stream(d) for d in range(1, STREAMS + 1))), timeout=90)
    finally:
        for c in channels:
            await c.close()
    return messages, regions, answered


def test_every_message_counted_once_under_concurrent_streams(service):
    svc = service(tick_interval_ms=1000)
    done = threading.Event()
    scrapes: list[int] = []
    problems: list[str] = []

    def scrape() -> None:  # as /metrics does, from another thread, while the streams are counted
        last: dict[tuple, float] = {}
        while not done.is_set():
            for family in svc.registry.collect():
                for s in family.samples:
                    if s.name in SERIES:
                        key = (s.name, s.labels["outcome"])
                        if s.value < last.get(key, 0.0):
                            problems.append(f"{key} went back from {last[key]} to {s.value}")
                        last[key] = s.value
            scrapes.append(1)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        messages, regions, answered = asyncio.run(drive(svc.addresses.grpc))
    finally:
        done.set()
        scraper.join(10)

    assert not problems, problems[:5]
    assert len(scrapes) > 1
    assert sum(messages.values()) == STREAMS * MESSAGES
    assert {k: v for k, v in messages.items() if v} == {
        "accepted": answered["accepted"],
        "rejected_invalid": answered["rejected"],
        "accepted_with_warning": answered["warned"],
    }
    assert all(messages[o] > STREAMS for o in ("accepted_with_warning", "rejected_invalid")), messages
    sample = svc.registry.get_sample_value
    for outcome in ("accepted", "accepted_with_warning", "rejected_invalid"):
        assert sample("supervisor_heartbeats_total", {"outcome": outcome}) == messages[outcome], outcome
        assert sample("supervisor_heartbeat_regions_total", {"outcome": outcome}) == regions[outcome], outcome
    assert sample("supervisor_heartbeat_problems_total", {"reason": "wrong_datanode"}) == messages["rejected_invalid"]
    assert sample("supervisor_heartbeat_problems_total", {"reason": "peer_addr_invalid"}) == (
        messages["accepted_with_warning"])
