"""The gRPC edge over real loopback gRPC, against a running `Service`.

Every validation answers with a precise status (or `rejected=true` and a
reason on the heartbeat stream) and never disturbs other clients or the same
stream. Services run in a daemon thread with their own asyncio loop; each
test talks to them with the synchronous grpc client, as datanodes and
operators do.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from supervisor_service.app.service import Service
from supervisor_service.app.settings import load_settings
from supervisor_service.core import Dump, Register
from supervisor_service.proto import pb, pb_grpc

SERVICE = "supervisor.v1.RegionSupervisor"
RPC_TIMEOUT = 10.0

# Limits of the main test service: small, so that "too many" is cheap to send.
MAX_HB_REGIONS = 10
MAX_REQ_REGIONS = 10
MAX_PAGE = 50


# ---------------------------------------------------------------- helpers


class Running:
    """A Service running `start()` then `wait()` on its own event loop in a daemon thread."""

    def __init__(self, *, wait_leader: bool = True, **overrides) -> None:
        settings = dict(
            grpc_addr="127.0.0.1:0",
            metrics_addr="",
            store="memory",
            shutdown_timeout_ms=2000,
            tick_interval_ms=600_000,  # no tick unless a test wants one
        )
        settings.update(overrides)
        self.registry = CollectorRegistry()
        self.service = Service(load_settings(**settings), registry=self.registry)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="test-service-loop", daemon=True)
        self._thread.start()
        assert self._started.wait(15), "service did not start"
        if self.error is not None:
            raise self.error
        # The leader's state is loaded on a transition thread after start() returns; wait for it so
        # that no BecomeLeader rebuilds the table under a test.
        deadline = time.monotonic() + 10
        while wait_leader and not self.service.supervisor.status.is_leader:
            assert time.monotonic() < deadline, "the single replica did not become leader"
            time.sleep(0.005)
        self.addr = self.service.addresses.grpc
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = pb_grpc.RegionSupervisorStub(self.channel)

    def _main(self) -> None:
        async def main() -> int:
            try:
                await self.service.start()
            except BaseException as exc:  # surfaced in __init__
                self.error = exc
                self._started.set()
                raise
            self._started.set()
            return await self.service.wait()

        self.exit_code = asyncio.run(main())

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def close(self) -> None:
        self.channel.close()
        self.service.request_stop()
        self._thread.join(15)
        assert not self._thread.is_alive(), "service did not stop"


class HeartbeatStream:
    """One SendHeartbeat stream: `send` writes a request and reads its response."""

    def __init__(self, stub, metadata=()) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._responses = stub.SendHeartbeat(self._requests(), metadata=metadata, timeout=60)

    def _requests(self):
        while True:
            item = self._outbox.get()
            if item is None:
                return
            yield item

    def send(self, datanode_id: int, region_ids=(), **fields) -> pb.HeartbeatResponse:
        self._outbox.put(pb.HeartbeatRequest(datanode_id=datanode_id, region_ids=list(region_ids), **fields))
        return next(self._responses)

    def close(self) -> None:
        self._outbox.put(None)
        self._responses.cancel()

    def __enter__(self) -> HeartbeatStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def regions(datanode_id: int, region_ids) -> list[pb.DetectingRegion]:
    return [pb.DetectingRegion(datanode_id=datanode_id, region_id=r) for r in region_ids]


def dump_pages(stub, **fields) -> list[pb.DumpResponse]:
    return list(stub.Dump(pb.DumpRequest(**fields), timeout=RPC_TIMEOUT))


def dump_rows(stub, **fields) -> list[pb.DetectorState]:
    return [row for page in dump_pages(stub, **fields) for row in page.detectors]


def row_map(stub, datanode_id: int) -> dict[int, pb.DetectorState]:
    return {r.region_id: r for r in dump_rows(stub, datanode_ids=[datanode_id])}


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=RPC_TIMEOUT, **kwargs)
        if not isinstance(result, Message):  # a server stream: errors surface while reading
            list(result)
    return info.value


@pytest.fixture(scope="module")
def svc():
    """Client clock (timestamps are the test's, replayed: no bound on their skew), no ticks, small limits."""
    running = Running(
        heartbeat_clock="client",
        max_client_clock_skew_ms=0,
        max_regions_per_heartbeat=MAX_HB_REGIONS,
        max_regions_per_request=MAX_REQ_REGIONS,
        max_dump_page_size=MAX_PAGE,
    )
    yield running
    running.close()


@pytest.fixture
def stub(svc):
    return svc.stub


# Each test uses its own datanode ids, so tests sharing the module's service do not see each other.


# ---------------------------------------------------------------- heartbeats


def test_heartbeat_with_too_many_regions_refreshes_the_known_ones_and_the_stream_goes_on(svc, stub):
    with HeartbeatStream(stub) as hb:
        big = hb.send(101, range(MAX_HB_REGIONS + 1), timestamp_millis=1_000_000)
        assert not big.rejected  # the liveness it carries is applied to what is watched: here nothing yet
        assert "max_regions_per_heartbeat" in big.reason and "none was added" in big.reason
        assert str(MAX_HB_REGIONS + 1) in big.reason and str(MAX_HB_REGIONS) in big.reason
        assert big.accepted_regions == 0
        assert big.datanode_id == 101
        assert row_map(stub, 101) == {}
        # Exactly at the limit is fine, on the same stream.
        good = hb.send(101, range(MAX_HB_REGIONS), timestamp_millis=1_000_000)
        assert not good.rejected and good.reason == ""
        assert good.accepted_regions == MAX_HB_REGIONS
        assert good.is_leader and good.leader_addr
        # Over the limit again: the watched regions are refreshed, the new one is not added.
        again = hb.send(101, range(MAX_HB_REGIONS + 1), timestamp_millis=1_002_000)
        assert not again.rejected and "max_regions_per_heartbeat" in again.reason
    rows = row_map(stub, 101)
    assert sorted(rows) == list(range(MAX_HB_REGIONS))
    assert {r.last_heartbeat_millis for r in rows.values()} == {1_002_000}


def test_second_datanode_on_one_stream_is_rejected(svc, stub):
    with HeartbeatStream(stub) as hb:
        assert not hb.send(111, [1], timestamp_millis=1_000_000).rejected
        other = hb.send(112, [1], timestamp_millis=1_000_000)
        assert other.rejected
        assert "111" in other.reason and "one stream per datanode" in other.reason
        # The owner goes on on the same stream.
        again = hb.send(111, [1, 2], timestamp_millis=1_001_000)
        assert not again.rejected and again.accepted_regions == 2
    assert dump_rows(stub, datanode_ids=[112]) == []
    # Another stream may carry the other datanode.
    with HeartbeatStream(stub) as hb2:
        assert not hb2.send(112, [1], timestamp_millis=1_000_000).rejected


@pytest.mark.parametrize("peer_addr", ["not-an-address", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "a b:1"])
def test_invalid_peer_addr_is_ignored_and_the_heartbeat_applied(svc, stub, peer_addr):
    with HeartbeatStream(stub) as hb:
        good = hb.send(121, [1], timestamp_millis=1_000_000, peer_addr="10.0.0.1:4001")
        assert not good.rejected and good.accepted_regions == 1 and good.reason == ""
        bad = hb.send(121, [1], timestamp_millis=1_001_000, peer_addr=peer_addr)
        assert not bad.rejected and bad.accepted_regions == 1
        assert bad.reason.startswith("peer_addr ignored")
    assert row_map(stub, 121)[1].last_heartbeat_millis == 1_001_000
    assert svc.service.directory.peer(121).addr == "10.0.0.1:4001"


def test_client_clock_uses_the_timestamp_and_the_receipt_time_when_it_is_missing(svc, stub):
    with HeartbeatStream(stub) as hb:
        ok = hb.send(131, [1, 2], timestamp_millis=1_234_567)
        assert not ok.rejected and ok.accepted_regions == 2 and ok.reason == ""
        assert ok.server_time_millis > 1_600_000_000_000  # the server's own clock, not the client's
        rows = row_map(stub, 131)
        assert sorted(rows) == [1, 2]
        assert {r.last_heartbeat_millis for r in rows.values()} == {1_234_567}
        for ts in (0, -5):
            missing = hb.send(131, [1, 2], timestamp_millis=ts)
            assert not missing.rejected and missing.accepted_regions == 2
            assert "timestamp_millis" in missing.reason and "receipt time" in missing.reason
    rows = row_map(stub, 131)
    assert {r.last_heartbeat_millis for r in rows.values()} == {missing.server_time_millis}


def test_duplicate_region_ids_in_a_heartbeat_are_folded(svc, stub):
    with HeartbeatStream(stub) as hb:
        response = hb.send(141, [7, 7, 3, 3, 3, 9], timestamp_millis=1_000_000)
    assert not response.rejected
    assert response.accepted_regions == 3
    assert sorted(row_map(stub, 141)) == [3, 7, 9]


def test_heartbeat_streams_beyond_the_limit_are_refused_and_others_go_on():
    running = Running(max_concurrent_streams=1)
    try:
        first = HeartbeatStream(running.stub)
        assert not first.send(1, [1]).rejected
        second = HeartbeatStream(running.stub)
        with pytest.raises(grpc.RpcError) as info:
            second.send(2, [1])
        second.close()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_streams" in info.value.details()
        assert running.sample("supervisor_heartbeats_total", {"outcome": "rejected_stream_limit"}) == 1
        assert not first.send(1, [1]).rejected  # the open stream is undisturbed
        first.close()
        # Its slot is given back once it ends.
        deadline = time.monotonic() + 5
        while running.sample("supervisor_heartbeat_streams") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with HeartbeatStream(running.stub) as third:
            assert not third.send(2, [1]).rejected
    finally:
        running.close()


def test_heartbeat_from_an_older_node_epoch_is_rejected(svc, stub):
    with HeartbeatStream(stub) as hb:
        assert not hb.send(211, [1], timestamp_millis=1_000_000, node_epoch=5).rejected
        stale = hb.send(211, [1], timestamp_millis=1_001_000, node_epoch=3)
        assert stale.rejected and "node_epoch" in stale.reason and "5" in stale.reason
        assert svc.sample("supervisor_heartbeats_total", {"outcome": "rejected_stale_epoch"}) >= 1
        assert row_map(stub, 211)[1].last_heartbeat_millis == 1_000_000  # not applied
        assert not hb.send(211, [1], timestamp_millis=1_002_000, node_epoch=5).rejected
        assert not hb.send(211, [1], timestamp_millis=1_003_000, node_epoch=6).rejected  # a restart
        assert hb.send(211, [1], timestamp_millis=1_004_000, node_epoch=5).rejected  # the old life, now fenced
    assert row_map(stub, 211)[1].last_heartbeat_millis == 1_003_000


class RawHeartbeatStream(HeartbeatStream):
    """A SendHeartbeat stream of serialized messages: `send_raw` writes bytes and reads bytes."""

    def __init__(self, channel) -> None:
        self._outbox = queue.Queue()
        method = channel.stream_stream(f"/{SERVICE}/SendHeartbeat", request_serializer=None, response_deserializer=None)
        self._responses = method(self._requests(), timeout=60)

    def send_raw(self, raw: bytes) -> bytes:
        self._outbox.put(raw)
        return next(self._responses)


def test_repeated_heartbeat_bytes_are_validated_and_answered_like_any_other(svc, stub):
    """A stream that sends the same bytes again skips parsing them, not checking them; every
    answer is byte for byte what serializing the response message gives."""
    request = pb.HeartbeatRequest(datanode_id=221, region_ids=[1, 2], timestamp_millis=1_000_000, node_epoch=3)
    with RawHeartbeatStream(svc.channel) as a:
        answers = [a.send_raw(request.SerializeToString()) for _ in range(3)]
        for raw in answers:
            response = pb.HeartbeatResponse.FromString(raw)
            assert raw == response.SerializeToString()
            assert not response.rejected and response.accepted_regions == 2 and response.datanode_id == 221
            assert response.is_leader and response.leader_addr and response.server_time_millis > 0
        # A later life of the datanode, on another stream, fences the same bytes on this one.
        with HeartbeatStream(stub) as b:
            assert not b.send(221, [1, 2], timestamp_millis=1_001_000, node_epoch=5).rejected
        stale = a.send_raw(request.SerializeToString())
        response = pb.HeartbeatResponse.FromString(stale)
        assert stale == response.SerializeToString()
        assert response.rejected and "node_epoch" in response.reason and response.accepted_regions == 0
        # Other bytes on the same stream are parsed again.
        other = pb.HeartbeatRequest(datanode_id=221, region_ids=[3], timestamp_millis=1_002_000, node_epoch=5)
        response = pb.HeartbeatResponse.FromString(a.send_raw(other.SerializeToString()))
        assert not response.rejected and response.accepted_regions == 1
        wrong = pb.HeartbeatRequest(datanode_id=222, region_ids=[3], timestamp_millis=1_002_000)
        response = pb.HeartbeatResponse.FromString(a.send_raw(wrong.SerializeToString()))
        assert response.rejected and "221" in response.reason and response.datanode_id == 222
    assert row_map(stub, 221)[1].last_heartbeat_millis == 1_001_000
    assert row_map(stub, 221)[3].last_heartbeat_millis == 1_002_000


def test_a_message_that_does_not_parse_is_rejected_and_the_stream_goes_on(svc):
    with RawHeartbeatStream(svc.channel) as a:
        response = pb.HeartbeatResponse.FromString(a.send_raw(b"\xff\xff"))
        assert response.rejected and response.reason.startswith("not a valid HeartbeatRequest: ")
        good = pb.HeartbeatRequest(datanode_id=231, region_ids=[1], timestamp_millis=1_000_000)
        response = pb.HeartbeatResponse.FromString(a.send_raw(good.SerializeToString()))
        assert not response.rejected and response.accepted_regions == 1


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("method", ["RegisterDetectors", "DeregisterDetectors", "ResetDetectors"])
def test_registry_calls_with_too_many_regions_are_invalid(svc, stub, method):
    datanode = {"RegisterDetectors": 151, "DeregisterDetectors": 152, "ResetDetectors": 153}[method]
    stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=regions(datanode, [0])), timeout=RPC_TIMEOUT)
    before = row_map(stub, datanode)
    request_type = getattr(pb, method + "Request")
    err = rpc_error(getattr(stub, method), request_type(regions=regions(datanode, range(MAX_REQ_REGIONS + 1))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_regions_per_request" in err.details()
    assert str(MAX_REQ_REGIONS + 1) in err.details()
    assert row_map(stub, datanode) == before  # nothing applied
    # The service is undisturbed: exactly the limit is accepted.
    ok = getattr(stub, method)(request_type(regions=regions(datanode, range(MAX_REQ_REGIONS))), timeout=RPC_TIMEOUT)
    expected = {"RegisterDetectors": MAX_REQ_REGIONS - 1, "DeregisterDetectors": 1, "ResetDetectors": MAX_REQ_REGIONS}
    assert ok.affected == expected[method]


def test_registry_calls_fold_duplicates(svc, stub):
    pairs = regions(161, [1, 2, 2, 1]) + regions(162, [1, 1])
    assert stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=pairs), timeout=RPC_TIMEOUT).affected == 3
    assert stub.ResetDetectors(pb.ResetDetectorsRequest(regions=pairs), timeout=RPC_TIMEOUT).affected == 3
    assert stub.DeregisterDetectors(pb.DeregisterDetectorsRequest(regions=pairs), timeout=RPC_TIMEOUT).affected == 3
    assert dump_rows(stub, datanode_ids=[161, 162]) == []


def test_register_leaves_an_existing_detector_untouched(svc, stub):
    with HeartbeatStream(stub) as hb:
        assert hb.send(171, [1], timestamp_millis=1_000_000).accepted_regions == 1
        assert hb.send(171, [1], timestamp_millis=1_001_000).accepted_regions == 1
    before = row_map(stub, 171)[1]
    assert before.last_heartbeat_millis == 1_001_000
    response = stub.RegisterDetectors(
        pb.RegisterDetectorsRequest(regions=regions(171, [1, 2])), timeout=RPC_TIMEOUT
    )
    assert response.affected == 1  # only region 2 was created
    after = row_map(stub, 171)
    assert after[1].last_heartbeat_millis == 1_001_000
    assert after[1].sample_count == before.sample_count == 3
    assert after[1].mean_interval_millis == before.mean_interval_millis
    assert after[2].last_heartbeat_millis > 1_600_000_000_000  # created with a heartbeat at the server's now
    assert after[2].sample_count == 2


def test_deregister_removes_and_reset_refreshes(svc, stub):
    with HeartbeatStream(stub) as hb:
        hb.send(181, [1, 2, 3], timestamp_millis=1_000_000)
        hb.send(181, [1, 2, 3], timestamp_millis=1_001_500)
    assert {r.sample_count for r in row_map(stub, 181).values()} == {3}

    removed = stub.DeregisterDetectors(
        pb.DeregisterDetectorsRequest(regions=regions(181, [3, 4])), timeout=RPC_TIMEOUT
    )
    assert removed.affected == 1  # 4 never existed
    assert sorted(row_map(stub, 181)) == [1, 2]

    before_ms = int(time.time() * 1000) - 5_000
    reset = stub.ResetDetectors(pb.ResetDetectorsRequest(regions=regions(181, [2])), timeout=RPC_TIMEOUT)
    assert reset.affected == 1
    rows = row_map(stub, 181)
    assert rows[1].last_heartbeat_millis == 1_001_500 and rows[1].sample_count == 3  # untouched
    assert rows[2].last_heartbeat_millis >= before_ms  # fresh, at the server's now
    assert rows[2].sample_count == 2  # only the two seed intervals
    assert rows[2].mean_interval_millis == pytest.approx(1000.0)


# ---------------------------------------------------------------- dump


def test_dump_filters_by_datanode_and_failure(svc, stub):
    stub.RegisterDetectors(
        pb.RegisterDetectorsRequest(regions=regions(191, [1, 2]) + regions(192, [5])), timeout=RPC_TIMEOUT
    )
    only_191 = dump_rows(stub, datanode_ids=[191])
    assert {(r.datanode_id, r.region_id) for r in only_191} == {(191, 1), (191, 2)}
    both = dump_rows(stub, datanode_ids=[191, 192])
    assert {(r.datanode_id, r.region_id) for r in both} == {(191, 1), (191, 2), (192, 5)}

    # Freshly registered: nothing failed now.
    now_pages = dump_pages(stub, datanode_ids=[191, 192], only_failed=True)
    assert len(now_pages) == 1 and list(now_pages[0].detectors) == [] and now_pages[0].total == 0
    fresh = dump_rows(stub, datanode_ids=[191, 192])
    assert all(r.available and r.phi < 8.0 for r in fresh)

    # An hour from now every one of them is long dead.
    future = int(time.time() * 1000) + 3_600_000
    pages = dump_pages(stub, datanode_ids=[191, 192], only_failed=True, at_millis=future)
    failed = [r for p in pages for r in p.detectors]
    assert {(r.datanode_id, r.region_id) for r in failed} == {(191, 1), (191, 2), (192, 5)}
    assert all(r.phi >= 8.0 and not r.available for r in failed)
    assert all(p.at_millis == future for p in pages)
    # The far end of the int64 range is a valid time too: phi is infinite, not an error.
    extreme = dump_rows(stub, datanode_ids=[191], at_millis=2**63 - 1)
    assert len(extreme) == 2 and all(r.phi >= 8.0 and not r.available for r in extreme)


def test_dump_pages(svc, stub):
    for chunk in (range(0, 5), range(5, 10)):
        stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=regions(201, chunk)), timeout=RPC_TIMEOUT)
    pages = dump_pages(stub, datanode_ids=[201], page_size=3)
    assert [len(p.detectors) for p in pages] == [3, 3, 3, 1]
    assert all(p.total == 10 for p in pages)
    assert all(p.is_leader and p.leader_addr for p in pages)
    assert len({p.at_millis for p in pages}) == 1  # one snapshot
    assert sorted(r.region_id for p in pages for r in p.detectors) == list(range(10))
    # The default page holds them all; exactly the maximum page size is allowed.
    assert [len(p.detectors) for p in dump_pages(stub, datanode_ids=[201])] == [10]
    assert [len(p.detectors) for p in dump_pages(stub, datanode_ids=[201], page_size=MAX_PAGE)] == [10]


def test_dump_of_nothing_is_one_empty_page(svc, stub):
    pages = dump_pages(stub, datanode_ids=[99_999])
    assert len(pages) == 1
    assert list(pages[0].detectors) == [] and pages[0].total == 0
    assert pages[0].is_leader and pages[0].at_millis > 0


def test_dump_rejects_a_page_above_the_limit(svc, stub):
    err = rpc_error(stub.Dump, pb.DumpRequest(page_size=MAX_PAGE + 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_dump_page_size" in err.details()


def test_dump_rejects_negative_at_millis(svc, stub):
    err = rpc_error(stub.Dump, pb.DumpRequest(at_millis=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at_millis" in err.details()


# ---------------------------------------------------------------- maintenance and journal


def test_maintenance_mode_round_trip(svc, stub):
    assert stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).enabled is False
    try:
        on = stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=True), timeout=RPC_TIMEOUT)
        assert on.enabled and on.is_leader
        got = stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT)
        assert got.enabled and got.is_leader and got.leader_addr
        assert dump_pages(stub, datanode_ids=[1])[0].maintenance_mode is True
        assert svc.sample("supervisor_maintenance_mode") == 1
    finally:
        off = stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=False), timeout=RPC_TIMEOUT)
    assert off.enabled is False
    assert stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).enabled is False
    assert dump_pages(stub, datanode_ids=[1])[0].maintenance_mode is False
    assert svc.sample("supervisor_maintenance_mode") == 0


def test_scoped_maintenance_per_datanode_with_expiry(svc, stub):
    now = int(time.time() * 1000)
    on = stub.SetMaintenanceMode(
        pb.SetMaintenanceModeRequest(enabled=True, datanode_ids=[222, 221, 222], ttl_millis=600_000),
        timeout=RPC_TIMEOUT,
    )
    try:
        assert on.enabled is False  # the global switch is untouched
        assert [d.datanode_id for d in on.datanodes] == [221, 222]
        assert all(now + 500_000 < d.expires_at_millis < now + 700_000 for d in on.datanodes)
        got = stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT)
        assert [d.datanode_id for d in got.datanodes] == [221, 222] and got.enabled is False
        off = stub.SetMaintenanceMode(
            pb.SetMaintenanceModeRequest(enabled=False, datanode_ids=[221]), timeout=RPC_TIMEOUT
        )
        assert [d.datanode_id for d in off.datanodes] == [222]
        err = rpc_error(stub.SetMaintenanceMode, pb.SetMaintenanceModeRequest(enabled=False, ttl_millis=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_millis" in err.details()
        assert stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).enabled is False
    finally:
        stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=False, datanode_ids=[221, 222]),
                                timeout=RPC_TIMEOUT)
    assert list(stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).datanodes) == []


def test_list_journal_embedded(svc, stub):
    response = stub.ListJournal(pb.ListJournalRequest(), timeout=RPC_TIMEOUT)
    assert response.embedded is True
    assert list(response.entries) == []  # no tick, no failover


# ---------------------------------------------------------------- health and reflection


def test_health_serving_after_start(svc):
    health = health_pb2_grpc.HealthStub(svc.channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_service(svc):
    reflection = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
    responses = list(
        reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=RPC_TIMEOUT)
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


# ---------------------------------------------------------------- overload


def test_full_queue_gives_resource_exhausted_and_rejected_heartbeats(monkeypatch):
    """Block the supervisor thread on one event, fill the single queue slot, then call."""
    running = Running(event_queue_size=1, enqueue_timeout_ms=50)
    service = running.service
    try:
        gate = threading.Event()
        blocker = Dump(Future())
        handle = service.supervisor.handle

        def blocking_handle(event, now):
            if event is blocker:
                assert gate.wait(20), "test never released the supervisor thread"
            return handle(event, now)

        monkeypatch.setattr(service.supervisor, "handle", blocking_handle)
        service.queue.put_control(blocker)
        deadline = time.monotonic() + 5
        while len(service.queue):  # the thread has taken the blocker and is stuck in it
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert service.queue.offer(Register(()))  # the one external slot
        assert not service.queue.offer(Register(()))

        err = rpc_error(running.stub.RegisterDetectors, pb.RegisterDetectorsRequest(regions=regions(1, [1])))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in err.details()
        err = rpc_error(running.stub.Dump, pb.DumpRequest())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        with HeartbeatStream(running.stub) as hb:
            overloaded = hb.send(1, [1, 2])
            assert overloaded.rejected and "queue" in overloaded.reason
            assert running.sample("supervisor_heartbeats_total", {"outcome": "rejected_overloaded"}) == 1
            assert running.sample("supervisor_heartbeat_regions_total", {"outcome": "rejected_overloaded"}) == 2
            assert running.sample("supervisor_events_rejected_total",
                                  {"type": "Heartbeat", "reason": "queue_full"}) == 1
            assert running.sample("supervisor_events_rejected_total",
                                  {"type": "Register", "reason": "queue_full"}) == 1
            # Cheap calls that need no queue still answer.
            assert running.stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).enabled is False

            gate.set()
            # Once the thread moves again the same stream and new calls work.
            deadline = time.monotonic() + 5
            while True:
                response = hb.send(1, [1, 2])
                if not response.rejected or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert not response.rejected and response.accepted_regions == 2
        affected = running.stub.RegisterDetectors(
            pb.RegisterDetectorsRequest(regions=regions(2, [1])), timeout=RPC_TIMEOUT
        ).affected
        assert affected == 1
        assert sorted((r.datanode_id, r.region_id) for r in dump_rows(running.stub)) == [(1, 1), (1, 2), (2, 1)]
    finally:
        gate.set()
        running.close()


# ---------------------------------------------------------------- auth


def test_auth_token_is_required_except_for_health():
    running = Running(auth_token="s3cret")
    try:
        stub = running.stub
        good = (("authorization", "Bearer s3cret"),)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            err = rpc_error(stub.RegisterDetectors, pb.RegisterDetectorsRequest(regions=regions(1, [1])),
                            metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "auth_token" in err.details()
            err = rpc_error(stub.GetMaintenanceMode, pb.GetMaintenanceModeRequest(), metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = rpc_error(stub.Dump, pb.DumpRequest(), metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            hb = HeartbeatStream(stub, metadata=metadata)
            with pytest.raises(grpc.RpcError) as info:
                hb.send(1, [1])
            hb.close()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # With the token everything works.
        assert stub.RegisterDetectors(
            pb.RegisterDetectorsRequest(regions=regions(1, [1])), metadata=good, timeout=RPC_TIMEOUT
        ).affected == 1
        pages = list(stub.Dump(pb.DumpRequest(), metadata=good, timeout=RPC_TIMEOUT))
        assert [(r.datanode_id, r.region_id) for p in pages for r in p.detectors] == [(1, 1)]
        with HeartbeatStream(stub, metadata=good) as hb:
            response = hb.send(1, [1, 2])
            assert not response.rejected and response.accepted_regions == 2
        # Health probes carry no token.
        health = health_pb2_grpc.HealthStub(running.channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.close()


# ---------------------------------------------------------------- metrics


def test_heartbeat_and_detector_metrics():
    running = Running(tick_interval_ms=20)  # server clock
    try:
        stub = running.stub
        with HeartbeatStream(stub) as a, HeartbeatStream(stub) as b:
            for sent in range(1, 4):
                assert not a.send(1, [1, 2, 3]).rejected
                # Applied before the next is sent: a heartbeat still queued when its stream's next
                # one arrives is superseded by it (coalesced), and would not count as an event.
                deadline = time.monotonic() + 5
                while running.sample("supervisor_events_total", {"type": "Heartbeat"}) < sent:
                    assert time.monotonic() < deadline, "heartbeat not applied"
                    time.sleep(0.002)
            assert not b.send(2, [10, 11]).rejected
            assert b.send(3, [10]).rejected  # wrong datanode on b's stream
            assert running.sample("supervisor_heartbeat_streams") == 2
        assert running.sample("supervisor_heartbeats_total", {"outcome": "accepted"}) == 4
        assert running.sample("supervisor_heartbeat_regions_total", {"outcome": "accepted"}) == 11
        assert running.sample("supervisor_heartbeats_total", {"outcome": "rejected_invalid"}) == 1
        assert running.sample("supervisor_heartbeat_regions_total", {"outcome": "rejected_invalid"}) == 1

        # The queue is FIFO: once a Dump is answered, the heartbeats before it were applied.
        assert len(dump_rows(stub)) == 5
        assert running.sample("supervisor_events_total", {"type": "Heartbeat"}) == 4
        ticks = running.sample("supervisor_events_total", {"type": "Tick"})
        deadline = time.monotonic() + 5
        while running.sample("supervisor_events_total", {"type": "Tick"}) <= ticks:
            assert time.monotonic() < deadline, "no tick"
            time.sleep(0.005)
        assert running.sample("supervisor_detectors") == 5
        assert running.sample("supervisor_detector_phi_count") == 5
        assert running.sample("supervisor_thread_alive") == 1
        assert running.sample("supervisor_is_leader") == 1
    finally:
        running.close()
    assert running.exit_code == 0


# ---------------------------------------------------------------- becoming leader


def test_a_write_acknowledged_while_becoming_leader_is_not_lost():
    """The service is SERVING and elected as soon as `start()` returns, but the supervisor thread
    only leads once the BecomeLeader event, built from a store load on the transition thread, is
    processed; BecomeLeader clears the table and rebuilds it from that load. A write acknowledged
    in between (its store commit landing after the load) would vanish from the live table, so the
    edge must refuse writes until then (UNAVAILABLE / a rejected heartbeat) or keep them.

    initialization_delay_ms and store_flush_interval_ms only widen the window deterministically;
    with the defaults (0 and 10 ms) it is the first few milliseconds after SERVING.
    """
    running = Running(wait_leader=False, initialization_delay_ms=300, store_flush_interval_ms=500)
    try:
        with HeartbeatStream(running.stub) as hb:
            early = hb.send(2, [1])
            if early.rejected:
                assert "leader" in early.reason
        acknowledged = False
        deadline = time.monotonic() + 10
        while not acknowledged:
            assert time.monotonic() < deadline, "Register never succeeded"
            try:
                response = running.stub.RegisterDetectors(
                    pb.RegisterDetectorsRequest(regions=regions(1, [1])), timeout=RPC_TIMEOUT
                )
                acknowledged = response.affected == 1
            except grpc.RpcError as exc:
                # Refusing writes until the state is loaded is correct; the client retries.
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), exc
                time.sleep(0.05)
        deadline = time.monotonic() + 5
        while not running.service.supervisor.status.is_leader and time.monotonic() < deadline:
            time.sleep(0.01)
        # Acknowledged: it is watched from now on.
        pairs = {(r.datanode_id, r.region_id) for r in dump_rows(running.stub)}
        assert (1, 1) in pairs
        if not early.rejected:
            assert (2, 1) in pairs
    finally:
        running.close()
