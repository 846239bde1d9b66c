"""One datanode flooding the service with big, ever different heartbeats must not cost the others.

A real service on the real clock, a flooding client on one stream (heartbeats of tens of thousands
of regions, never twice the same in a row, sent as fast as the service reads them) and a
well-behaved datanode on another. The well-behaved one is never rejected, and each of its
heartbeats is applied promptly: a Dump sent right after its answer (the queue is FIFO) already
shows it.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time

import grpc
import pytest

from supervisor_service.proto import pb, pb_grpc

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name
FLOODER, GOOD = 1, 2
FLOOD_REGIONS = 40_000
QUEUE = 256


class Flooder:
    """Sends, on one stream, heartbeats of FLOOD_REGIONS regions cycling through four region sets,
    as fast as the service takes them; counts answers and rejections."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.messages = [
            pb.HeartbeatRequest(
                datanode_id=FLOODER, region_ids=range(k * FLOOD_REGIONS, (k + 1) * FLOOD_REGIONS)
            ).SerializeToString()
            for k in range(4)
        ]
        self.stop = threading.Event()
        self.answers = self.rejected = 0
        method = channel.stream_stream(f"/{SERVICE}/SendHeartbeat", request_serializer=None,
                                       response_deserializer=None)
        self._call = method(self._requests(), timeout=100)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self):
        i = 0
        while not self.stop.is_set():
            yield self.messages[i % 4]
            i += 1

    def _read(self) -> None:
        try:
            for raw in self._call:
                self.answers += 1
                self.rejected += pb.HeartbeatResponse.FromString(raw).rejected
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.stop.set()
        self._call.cancel()
        self._thread.join(10)


def test_a_flooding_datanode_neither_delays_nor_rejects_the_others(service):
    svc = service(tick_interval_ms=600_000, event_queue_size=QUEUE, max_queue_fraction_per_datanode=0.05)
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        outbox: queue.Queue = queue.Queue()
        good = stub.SendHeartbeat(iter(outbox.get, None), timeout=100)
        flood = Flooder(channel)
        try:
            deadline = time.monotonic() + 20
            while svc.queue.external_depth < 5:  # the flood is on: the queue holds its heartbeats
                assert time.monotonic() < deadline, "the flood never reached the queue"
                time.sleep(0.01)
            delays, depths = [], []
            for _ in range(25):
                time.sleep(0.1)
                outbox.put(pb.HeartbeatRequest(datanode_id=GOOD, region_ids=[1, 2, 3]))
                answer = next(good)
                assert not answer.rejected, answer.reason
                start = time.monotonic()
                depths.append(svc.queue.external_depth)
                rows = [r for page in stub.Dump(pb.DumpRequest(datanode_ids=[GOOD]), timeout=30)
                        for r in page.detectors]
                delays.append(time.monotonic() - start)
                assert {r.last_heartbeat_millis for r in rows} == {answer.server_time_millis}
        finally:
            outbox.put(None)
            flood.close()
    assert flood.answers > 50, "the flooder was not flooding"
    # The flooder holds at most its share of the queue (5%: 12 heartbeats), so what is ahead of
    # the good datanode's heartbeat is applied in a few tens of milliseconds; a full queue of the
    # flooder's heartbeats takes seconds.
    assert max(depths) <= QUEUE * 0.05 + 2, depths
    assert statistics.median(delays) < 0.25 and max(delays) < 1.0, [round(d, 3) for d in delays]
