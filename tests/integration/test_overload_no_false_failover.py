"""Overload without false failover: heartbeats a tiny event queue could not take convict nobody.

A real service (grpc.aio, the embedded Selector and dry-run RegionMigration) with an event queue of
two events and a wait for room of a few milliseconds, and many datanodes on real streams that all
heartbeat at the same instants: each burst overflows the queue, most of its heartbeats are
refused (`rejected_overloaded`), and the queue is drained again long before the next tick looks at
its fill. Some live datanodes lose heartbeat after heartbeat, long enough for their detectors to
cross the threshold: the table sees them dead. The overload guard must hold those convictions
(`overload_hold_ms` after the last refusal), so that the journal shows no failover at all; and
once the refusals stop (the bursts end, most datanodes are decommissioned), a datanode that really
died is failed over, and only it.

Detection is shortened (100 ms heartbeats, 300 ms acceptable pause) so that the run takes seconds.
The mass-failure guard is off and the warm-up is 0 so that the overload guard alone is tested (with
it, the starved datanodes, a minority, would not be held anyway).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from supervisor_service.proto import pb, pb_grpc
from tests.support.datanodes import Datanode
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name
DATANODES = 40
PERIOD_S = 0.1
DEAD = 3
KEPT = 3  # datanodes left after the overload: two live ones (failover targets) and DEAD

SETTINGS = dict(
    event_queue_size=2,
    enqueue_timeout_ms=3,
    tick_interval_ms=50,
    acceptable_heartbeat_pause_ms=300,
    min_std_deviation_ms=50,
    first_heartbeat_estimate_ms=100,
    max_failed_datanode_fraction=1.0,
    warmup_grace_ms=0,
    overload_hold_ms=1000,
    target_holddown_ms=0,
)


class Bursts:
    """DATANODES heartbeat streams on one channel, run by an asyncio loop in a thread, all sending
    at the same instants every PERIOD_S (`synchronized`), or spread over the period; a datanode in
    `stopped` sends nothing. Counts answers and rejections per datanode, and each datanode's longest
    run of rejected heartbeats."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.synchronized = True
        self.stopped: set[int] = set()
        self.accepted = {d: 0 for d in range(1, DATANODES + 1)}
        self.rejected = {d: 0 for d in range(1, DATANODES + 1)}
        self.longest_rejected_run = {d: 0 for d in range(1, DATANODES + 1)}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        async with grpc.aio.insecure_channel(self.addr) as channel:
            method = channel.stream_stream(f"/{SERVICE}/SendHeartbeat", request_serializer=None,
                                           response_deserializer=None)
            await asyncio.gather(*(self._datanode(method, d) for d in range(1, DATANODES + 1)))

    async def _datanode(self, method, d: int) -> None:
        message = pb.HeartbeatRequest(
            datanode_id=d, region_ids=[(d << 32) | i for i in range(3)], peer_addr=f"10.0.0.{d}:4001"
        ).SerializeToString()
        call = method()
        run = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                offset = 0.0 if self.synchronized else PERIOD_S * d / DATANODES
                next_at = (now // PERIOD_S + 1) * PERIOD_S + offset
                await asyncio.sleep(max(0.0, next_at - now))
                if d in self.stopped:
                    continue
                await call.write(message)
                answer = pb.HeartbeatResponse.FromString(await call.read())
                if answer.rejected:
                    assert "queue" in answer.reason, answer.reason
                    self.rejected[d] += 1
                    run += 1
                    self.longest_rejected_run[d] = max(self.longest_rejected_run[d], run)
                else:
                    self.accepted[d] += 1
                    run = 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            if not self._stop.is_set():
                self.errors.append(exc)
        finally:
            call.cancel()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors[:3]


def retried(call, request):
    """An admin call, retried while the tiny queue turns it away (RESOURCE_EXHAUSTED), as a client would."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return call(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def journal(channel) -> list:
    stub = pb_grpc.RegionSupervisorStub(channel)
    return list(retried(stub.ListJournal, pb.ListJournalRequest(limit=1000)).entries)


def failed_over(entries) -> set[int]:
    return {e.from_peer.id for e in entries}


def test_heartbeats_refused_by_a_full_queue_fail_no_live_datanode_over_and_a_dead_one_still_is(service):
    svc = service(**SETTINGS)
    value = svc.registry.get_sample_value
    load = Bursts(svc.addresses.grpc)
    try:
        with grpc.insecure_channel(svc.addresses.grpc) as channel:
            # The bursts overflow the queue; some datanodes lose heartbeats for longer than it takes to
            # convict them (the table crosses the threshold for them), and nobody is failed over.
            wait_for(lambda: (value("supervisor_region_failures_detected_total") or 0) >= 3, 40,
                     message="no live datanode's detectors ever crossed: the load did not starve anyone")
            time.sleep(2)
            assert journal(channel) == [], failed_over(journal(channel))
            starved = sorted(d for d, run in load.longest_rejected_run.items() if run * PERIOD_S * 1000 > 600)
            assert starved, load.longest_rejected_run
            assert (value("supervisor_heartbeat_queue_refusals_total") or 0) > 0
            assert (value("supervisor_failover_skipped_regions_total", {"reason": "overload"}) or 0) > 0
            # The queue is nearly never full when a tick reads it: the fill alone would not have held.
            assert value("supervisor_heartbeats_total", {"outcome": "rejected_overloaded"}) > 0
            # Operators see why: the hold is published (GetFailoverHolds, the failover_hold gauge).
            holds_stub = pb_grpc.RegionSupervisorStub(channel)
            wait_for(lambda: "overload" in retried(holds_stub.GetFailoverHolds, pb.GetFailoverHoldsRequest()).holds,
                     10, message="the overload hold is not published")
            assert value("supervisor_failover_hold", {"reason": "overload"}) == 1

            # The refusals stop: the bursts end (the datanodes spread over the period) and most of the
            # cluster is decommissioned (stopped, then deregistered), so that even a loaded machine
            # keeps up with the rest; and one datanode really dies. It is failed over, and only it,
            # once the hold has run out.
            load.synchronized = False
            load.stopped.update(range(KEPT + 1, DATANODES + 1))
            time.sleep(2 * PERIOD_S)
            stub = pb_grpc.RegionSupervisorStub(channel)
            retried(stub.DeregisterDetectors, pb.DeregisterDetectorsRequest(regions=[
                pb.DetectingRegion(datanode_id=d, region_id=(d << 32) | i)
                for d in range(KEPT + 1, DATANODES + 1) for i in range(3)]))
            load.stopped.add(DEAD)
            def why() -> str:
                skipped = {r: value("supervisor_failover_skipped_regions_total", {"reason": r})
                           for r in ("overload", "local_pause", "rate_limited", "flap_backoff", "in_flight")}
                errors = {s: value("supervisor_failover_errors_total", {"stage": s})
                          for s in ("select", "insufficient_peers", "invalid_selection", "submit")}
                holds = retried(stub.GetFailoverHolds, pb.GetFailoverHoldsRequest())
                return (f"datanode {DEAD} was never failed over: holds {list(holds.holds)}, skipped {skipped}, "
                        f"errors {errors}, refusals {value('supervisor_heartbeat_queue_refusals_total')}")

            deadline = time.monotonic() + 30
            while not journal(channel):
                assert time.monotonic() < deadline, why()
                time.sleep(0.05)
            time.sleep(1)
            assert failed_over(journal(channel)) == {DEAD}
            assert sum(load.rejected.values()) > 0
    finally:
        load.close()


def drain(call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass  # cancelled at the end


def test_a_datanode_flooding_its_own_share_does_not_hold_anyone_elses_failover(service):
    """Refusals by a datanode's own share of the queue are not counted: that datanode has heartbeats
    queued (its liveness is on its way), and a flooding or hostile datanode must not be able to stop
    every failover of the cluster by sending too much."""
    svc = service(event_queue_size=256, max_queue_fraction_per_datanode=0.05, max_queued_heartbeat_bytes=4 << 20,
                  enqueue_timeout_ms=1,
                  tick_interval_ms=50,
                  acceptable_heartbeat_pause_ms=500, min_std_deviation_ms=50, first_heartbeat_estimate_ms=200,
                  warmup_grace_ms=0, target_holddown_ms=0)
    value = svc.registry.get_sample_value
    flood = [pb.HeartbeatRequest(datanode_id=1, region_ids=range(k * 20_000, (k + 1) * 20_000)).SerializeToString()
             for k in range(4)]
    stop = threading.Event()

    def frames():
        i = 0
        while not stop.is_set():
            yield flood[i % 4]
            i += 1

    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        method = channel.stream_stream(f"/{SERVICE}/SendHeartbeat", request_serializer=None,
                                       response_deserializer=None)
        flooding = method(frames(), timeout=100)
        reader = threading.Thread(target=drain, args=(flooding,), daemon=True)
        reader.start()
        nodes = {d: Datanode(svc.addresses.grpc, d, [(d << 32) | i for i in range(3)]) for d in (2, 3)}
        try:
            for node in nodes.values():
                node.wait_heartbeats(5)
            wait_for(lambda: value("supervisor_events_rejected_total", {"type": "Heartbeat",
                                                                           "reason": "datanode_share"}), 30,
                     message="the flood never reached its share of the queue")
            nodes[3].stop()  # really dead
            wait_for(lambda: journal(channel), 30, message="the dead datanode was not failed over during the flood")
            assert failed_over(journal(channel)) == {3}
            assert (value("supervisor_heartbeat_queue_refusals_total") or 0) == 0
        finally:
            stop.set()
            flooding.cancel()
            for node in nodes.values():
                if not node.stopped:
                    node.stop()
