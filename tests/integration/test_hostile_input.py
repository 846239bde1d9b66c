"""Input that must not cost liveness (docs/design.md §12), and input that must not cost the service.

A heartbeat that really comes from a datanode is evidence that it is alive: a
problem with a secondary field (a malformed `peer_addr`, a skewed client
timestamp, an epoch that went backwards long after the old life fell silent,
more regions than one heartbeat may carry) is reported in the answer's
`reason` and a metric, and the liveness is applied. Only what makes a
heartbeat untrustworthy or impossible to apply rejects it.

Most scenarios run a real in-process service on a `FakeClock` and talk to it
over real gRPC streams: the test moves time one second at a time, sends each
datanode's heartbeat, and sends the Tick itself. Each has a control (a
datanode that falls silent and must be failed over) so that "not failed over"
cannot pass because nothing is ever failed over.
"""

from __future__ import annotations

import json
import logging
import queue
import random
from concurrent.futures import Future

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from supervisor_service.core import Dump, FakeClock, Tick
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.store import MemoryKV
from tests.support.fakes import wait_for
from tests.support.wire import decodes, field_bytes, field_varint, varint

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
MESSAGES = {**vars(pb), **vars(health_pb2), **vars(reflection_pb2)}
RPC_TIMEOUT = 10.0

LIVE, CONTROL, TARGET = 7, 8, 9  # the datanode under test, one that falls silent, a healthy failover target


def regions_of(datanode_id: int, n: int = 3) -> list[int]:
    return [(datanode_id << 32) | i for i in range(n)]


class Stream:
    """One SendHeartbeat stream of serialized messages: `send` writes one and reads its answer."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue = queue.Queue()
        method = channel.stream_stream(
            f"/{SERVICE.full_name}/SendHeartbeat", request_serializer=None, response_deserializer=None
        )
        self._answers = method(self._requests(), timeout=120)

    def _requests(self):
        while (item := self._outbox.get()) is not None:
            yield item

    def send_raw(self, raw: bytes) -> pb.HeartbeatResponse:
        self._outbox.put(raw)
        return pb.HeartbeatResponse.FromString(next(self._answers))

    def send(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return self.send_raw(request.SerializeToString())

    def close(self) -> None:
        self._outbox.put(None)
        self._answers.cancel()


class FakeTime:
    """A service on a FakeClock: no ticker (the test ticks), no guards, no warm-up, the embedded
    dry-run RegionMigration (its journal lists every failover decided)."""

    def __init__(self, service, **settings) -> None:
        self.clock = FakeClock()
        defaults = dict(tick_interval_ms=600_000, guards_enabled=False, warmup_grace_ms=0)
        self.svc = service(clock=self.clock, **{**defaults, **settings})
        self.channel = grpc.insecure_channel(self.svc.addresses.grpc)
        self.stub = pb_grpc.RegionSupervisorStub(self.channel)
        self._streams: dict[int, Stream] = {}

    def stream(self, datanode_id: int) -> Stream:
        if datanode_id not in self._streams:
            self._streams[datanode_id] = Stream(self.channel)
        return self._streams[datanode_id]

    def good(self, datanode_id: int, **fields) -> pb.HeartbeatRequest:
        fields.setdefault("timestamp_millis", self.clock.now_ms())
        fields.setdefault("peer_addr", f"10.0.0.{datanode_id}:4001")
        fields.setdefault("region_ids", regions_of(datanode_id))
        return pb.HeartbeatRequest(datanode_id=datanode_id, **fields)

    def register(self, datanode_id: int, region_ids) -> None:
        self.stub.RegisterDetectors(
            pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=datanode_id, region_id=r)
                                                 for r in region_ids]),
            timeout=RPC_TIMEOUT,
        )

    def sync(self) -> None:
        """Returns once everything queued before it was applied (the queue is FIFO)."""
        reply: Future = Future()
        self.svc.queue.put_control(Dump(reply))
        reply.result(RPC_TIMEOUT)

    def tick(self) -> None:
        self.svc.queue.put_control(Tick())
        self.sync()

    def failed_over(self) -> set[int]:
        entries = self.stub.ListJournal(pb.ListJournalRequest(limit=1000), timeout=RPC_TIMEOUT).entries
        return {e.from_peer.id for e in entries}

    def rows(self, datanode_id: int) -> list[pb.DetectorState]:
        pages = self.stub.Dump(pb.DumpRequest(datanode_ids=[datanode_id]), timeout=RPC_TIMEOUT)
        return [row for page in pages for row in page.detectors]

    def sample(self, name: str, **labels) -> float:
        return self.svc.registry.get_sample_value(name, labels) or 0.0

    def run(self, live_request, seconds: int = 16, register: bool = True) -> list[pb.HeartbeatResponse]:
        """Every fake second: LIVE sends `live_request(second)`, TARGET a good heartbeat, CONTROL a good
        one for the first 2 seconds only; then a tick. Returns LIVE's answers, after checking that
        LIVE was not failed over and its detectors are all available, and (when the run is longer
        than a detection period) that CONTROL was failed over."""
        if register:  # as the metasrv does: LIVE's regions are watched whatever its heartbeats say
            self.register(LIVE, regions_of(LIVE))
        answers = []
        for second in range(seconds):
            self.clock.advance(1000)
            answers.append(self.stream(LIVE).send(live_request(second)))
            assert not self.stream(TARGET).send(self.good(TARGET)).rejected
            if second < 2:
                assert not self.stream(CONTROL).send(self.good(CONTROL)).rejected
            self.tick()
        if seconds >= 16:  # 2 s of heartbeats, then 10 s of acceptable pause and phi reaching 8
            wait_for(lambda: CONTROL in self.failed_over(), 10, message="the silent control was not failed over")
        assert LIVE not in self.failed_over(), "a live datanode was failed over"
        rows = self.rows(LIVE)
        assert sorted(r.region_id for r in rows) == regions_of(LIVE)
        assert all(r.available for r in rows), [(r.region_id, r.phi) for r in rows]
        return answers

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self.channel.close()


@pytest.fixture
def fake_time(service):
    made: list[FakeTime] = []

    def make(**settings) -> FakeTime:
        made.append(FakeTime(service, **settings))
        return made[-1]

    yield make
    for f in made:
        f.close()


# ---------------------------------------------------------------- peer_addr


@pytest.mark.parametrize(
    "peer_addr",
    ["10.0.0.7", "10.0.0.7:0", "10.0.0.7:70000", "a b:4001", "10.0.0.7:4001\n", "::1:4001", "host:٤٠٠١",
     "[fe80::1%eth0\n]:4001", "bü\u200bcher.example:4001"],
    ids=["no-port", "port-0", "port-too-big", "space-inside", "trailing-newline", "unbracketed-ipv6", "arabic-digits",
         "newline-in-zone", "zero-width-space"],
)
def test_a_malformed_peer_addr_is_ignored_and_the_datanode_is_not_failed_over(fake_time, peer_addr):
    ft = fake_time()
    good = "10.0.0.7:4001"
    answers = ft.run(lambda s: ft.good(LIVE, peer_addr=good if s == 0 else peer_addr))
    assert not answers[0].reason
    for answer in answers[1:]:
        assert not answer.rejected and answer.accepted_regions == 3
        assert answer.reason.startswith("peer_addr ignored"), answer.reason
    assert ft.svc.directory.peer(LIVE).addr == good  # the last good address is kept
    assert ft.sample("supervisor_heartbeats_total", outcome="accepted_with_warning") == len(answers) - 1
    assert ft.sample("supervisor_heartbeat_problems_total", reason="peer_addr_invalid") == len(answers) - 1


@pytest.mark.parametrize(
    "peer_addr, stored",
    [
        ("[fe80::1%eth0]:4001", "[fe80::1%eth0]:4001"),
        ("bücher.example:4001", "bücher.example:4001"),
        ("10.0.0.7:4001 ", "10.0.0.7:4001"),
        ("datanode-7.rack_3.example.:4001", "datanode-7.rack_3.example.:4001"),
    ],
    ids=["ipv6-zone", "idn", "trailing-space", "fqdn"],
)
def test_valid_peer_addrs_are_accepted_as_they_are(fake_time, peer_addr, stored):
    ft = fake_time()
    answers = ft.run(lambda s: ft.good(LIVE, peer_addr=peer_addr), seconds=3)
    assert all(not a.rejected and a.reason == "" for a in answers), [a.reason for a in answers]
    assert ft.svc.directory.peer(LIVE).addr == stored


def test_a_huge_peer_addr_is_not_echoed_and_the_stream_survives(fake_time):
    """5.5 MB of address: the answer must stay far below the client's 4 MB receive limit."""
    ft = fake_time()
    stream = ft.stream(LIVE)
    assert not stream.send(ft.good(LIVE)).rejected
    for huge in ("x" * 5_500_000 + ":1", "a." * 50_000 + "example:4001"):
        answer = stream.send(ft.good(LIVE, peer_addr=huge))
        assert not answer.rejected and answer.accepted_regions == 3
        assert answer.reason.startswith("peer_addr ignored") and "too long" in answer.reason
        assert len(answer.reason) < 300
    assert ft.svc.directory.peer(LIVE).addr == "10.0.0.7:4001"
    assert ft.sample("supervisor_heartbeat_problems_total", reason="peer_addr_too_long") == 2
    assert stream.send(ft.good(LIVE)).reason == ""


def test_a_long_malformed_peer_addr_is_echoed_as_a_short_prefix(fake_time):
    ft = fake_time()
    answer = ft.stream(LIVE).send(ft.good(LIVE, peer_addr="bad address " * 20))
    assert not answer.rejected and answer.reason.startswith("peer_addr ignored")
    assert len(answer.reason) < 300 and "bad address " * 20 not in answer.reason


def test_validated_addresses_are_not_kept_beyond_the_streams(fake_time):
    """The service remembers at most one validated address per stream, each of bounded size."""
    ft = fake_time()
    stream = ft.stream(LIVE)
    for i in range(2000):
        label = f"{i:04d}" + "a" * 59
        addr = f"{label}.{label}.{label}.example:4001"  # a valid 256-byte address, a different one each time
        assert stream.send(ft.good(LIVE, peer_addr=addr)).reason == ""
    servicer = ft.svc.servicer
    parts = (servicer, servicer.heartbeats, servicer.admin)  # the servicer hands the RPCs to its parts
    retained = [v for part in parts for v in vars(part).values() if isinstance(v, (set, dict)) and len(v) > 100]
    assert retained == [], "a per-address cache grows with every distinct address"


# ---------------------------------------------------------------- node_epoch


def test_an_epoch_that_went_backwards_is_a_new_life_once_the_old_one_is_silent(fake_time):
    """A restarted datanode whose restart counter went back (lost its state): its heartbeats are
    fenced while the newer epoch could still be alive, then taken as a new life."""
    ft = fake_time()
    answers = ft.run(lambda s: ft.good(LIVE, node_epoch=5 if s < 3 else 3), seconds=20)
    stale = [i for i, a in enumerate(answers) if a.rejected]
    assert stale and stale == list(range(3, 3 + len(stale)))  # right after the switch, and only then
    assert all("node_epoch 3 is older than 5" in answers[i].reason for i in stale)
    new_life = answers[stale[-1] + 1]
    assert not new_life.rejected and "new life" in new_life.reason
    assert all(not a.rejected and a.reason == "" for a in answers[stale[-1] + 2:])
    assert ft.svc.directory.epoch(LIVE) == 3
    assert ft.sample("supervisor_heartbeat_problems_total", reason="stale_epoch") == len(stale)
    assert ft.sample("supervisor_heartbeat_problems_total", reason="epoch_new_life") == 1


def test_one_heartbeat_with_the_highest_epoch_does_not_poison_the_datanode(fake_time):
    ft = fake_time()
    top = 2**64 - 1
    answers = ft.run(lambda s: ft.good(LIVE, node_epoch=top if s == 3 else 5), seconds=20)
    assert not answers[3].rejected
    assert any(a.rejected for a in answers[4:])  # fenced for a while: 2**64-1 could be the real one
    assert not answers[-1].rejected and answers[-1].reason == ""
    assert ft.svc.directory.epoch(LIVE) == 5


def test_a_newer_epoch_still_fences_the_old_life_while_it_is_heard(fake_time):
    """The zombie of an earlier life keeps being rejected as long as the new life heartbeats."""
    ft = fake_time()
    zombie = ft.stream(LIVE)
    new = Stream(ft.channel)
    for second in range(30):
        ft.clock.advance(1000)
        assert not new.send(ft.good(LIVE, node_epoch=6)).rejected
        old = zombie.send(ft.good(LIVE, node_epoch=5))
        assert old.rejected and "node_epoch 5 is older than 6" in old.reason, second
    new.close()


# ---------------------------------------------------------------- too many regions


def test_too_many_regions_refresh_the_known_ones_and_create_none(fake_time):
    ft = fake_time(max_regions_per_heartbeat=3)
    unknown = (LIVE << 32) | 99
    answers = ft.run(lambda s: ft.good(LIVE, region_ids=[*regions_of(LIVE), unknown]))
    for answer in answers:
        assert not answer.rejected
        assert "max_regions_per_heartbeat" in answer.reason and "4 regions" in answer.reason
    assert unknown not in {r.region_id for r in ft.rows(LIVE)}
    assert ft.sample("supervisor_heartbeat_problems_total", reason="too_many_regions") == len(answers)


# ---------------------------------------------------------------- client clock (finding: skew)


def test_a_heartbeat_stamped_far_in_the_future_does_not_make_a_dead_datanode_immortal(fake_time):
    ft = fake_time(heartbeat_clock="client")
    future = ft.clock.now_ms() + 86_400_000
    dead = ft.stream(LIVE)
    ft.register(LIVE, regions_of(LIVE))
    for second in range(16):
        ft.clock.advance(1000)
        if second < 2:
            assert not dead.send(ft.good(LIVE)).rejected
        elif second == 2:
            answer = dead.send(ft.good(LIVE, timestamp_millis=future))
            assert not answer.rejected
            assert "ahead" in answer.reason and "max_client_clock_skew_ms" in answer.reason
        assert not ft.stream(TARGET).send(ft.good(TARGET)).rejected
        ft.tick()
    wait_for(lambda: LIVE in ft.failed_over(), 10, message="a datanode silent for 13 s was not failed over")
    assert max(r.last_heartbeat_millis for r in ft.rows(LIVE)) < future
    assert ft.sample("supervisor_heartbeat_problems_total", reason="timestamp_ahead") == 1


def test_a_datanode_whose_clock_is_15_s_behind_is_not_failed_over(fake_time):
    ft = fake_time(heartbeat_clock="client")
    answers = ft.run(lambda s: ft.good(LIVE, timestamp_millis=ft.clock.now_ms() - 15_000))
    for answer in answers:
        assert not answer.rejected and "behind" in answer.reason and "max_client_clock_skew_ms" in answer.reason
    assert ft.sample("supervisor_heartbeat_problems_total", reason="timestamp_behind") == len(answers)


def test_a_timestamp_within_the_skew_bound_is_used_and_a_missing_one_is_receipt_time(fake_time):
    ft = fake_time(heartbeat_clock="client", max_client_clock_skew_ms=2000)
    stream = ft.stream(LIVE)
    ft.clock.advance(1000)
    within = ft.clock.now_ms() - 1500
    assert stream.send(ft.good(LIVE, timestamp_millis=within)).reason == ""
    ft.sync()
    assert {r.last_heartbeat_millis for r in ft.rows(LIVE)} == {within}
    ft.clock.advance(1000)
    missing = stream.send(ft.good(LIVE, timestamp_millis=0))
    assert not missing.rejected and "timestamp_millis" in missing.reason
    ft.sync()
    assert {r.last_heartbeat_millis for r in ft.rows(LIVE)} == {ft.clock.now_ms()}


# ---------------------------------------------------------------- stamped heartbeats read from their bytes


def test_stamped_heartbeats_in_any_encoding_are_applied_as_protobuf_reads_them(fake_time):
    """A stream whose next message is its last one with another timestamp_millis is read from the
    bytes; every other encoding protobuf accepts (fields repeated or out of order, region_ids
    unpacked, unknown fields, overlong varints) must still mean what protobuf says, whatever the
    stream sent before. Each stamp is later than the one before, so a stamp misread (say, the
    first of two timestamp fields instead of the last) shows as the detectors' last heartbeat."""
    ft = fake_time(heartbeat_clock="client", max_client_clock_skew_ms=0)
    stream = ft.stream(LIVE)
    regions, addr, epoch = regions_of(LIVE), b"10.0.0.7:4001", 5
    now = ft.clock.now_ms()
    stamps = iter(range(now + 1000, now + 10**6, 1000))
    future = now + 10**9  # a stamp that must never be applied

    def fields(ts, *, dn=LIVE, ids=None, address=addr, unpacked=False):
        ids = regions if ids is None else ids
        packed = field_bytes(3, b"".join(varint(r) for r in ids))
        return {
            "dn": field_varint(1, dn), "ts": field_varint(2, ts),
            "ids": b"".join(field_varint(3, r) for r in ids) if unpacked else packed,
            "addr": field_bytes(4, address), "epoch": field_varint(5, epoch),
        }

    def canonical(ts, **kw):
        f = fields(ts, **kw)
        return f["dn"] + f["ts"] + f["ids"] + f["addr"] + f["epoch"]

    def send(raw: bytes, reason: str = "") -> None:
        want = pb.HeartbeatRequest.FromString(raw)
        answer = stream.send_raw(raw)
        assert not answer.rejected, answer.reason
        assert answer.accepted_regions == len(set(want.region_ids))
        assert answer.reason.startswith(reason) and (reason or not answer.reason), answer.reason
        ft.sync()
        applied = {r.region_id: r.last_heartbeat_millis for r in ft.rows(LIVE)}
        assert {applied[r] for r in want.region_ids} == {want.timestamp_millis}

    send(canonical(next(stamps)))
    send(canonical(next(stamps)))  # the same but for the stamp
    send(canonical(next(stamps)))
    ts = next(stamps)
    f = fields(future)
    send(f["dn"] + f["ts"] + field_varint(2, ts) + f["ids"] + f["addr"] + f["epoch"])  # the last stamp wins
    send(canonical(future) + field_varint(2, next(stamps)))
    send(canonical(next(stamps)) + field_varint(9, 1) + field_bytes(10, b"x"))  # unknown fields
    f = fields(next(stamps), unpacked=True)
    send(f["dn"] + f["ts"] + f["ids"] + f["addr"] + f["epoch"])  # region_ids unpacked
    ts = next(stamps)
    send(field_varint(1, LIVE) + field_varint(2, ts, extra=3) + canonical(ts)[len(field_varint(1, LIVE)) +
         len(field_varint(2, ts)):])  # an overlong stamp
    send(field_varint(1, LIVE, extra=8) + canonical(next(stamps))[len(field_varint(1, LIVE)):])  # ten bytes
    f = fields(next(stamps))
    send(f["epoch"] + f["addr"] + f["ids"] + f["ts"] + f["dn"])  # out of order...
    f = fields(next(stamps))
    send(f["epoch"] + f["addr"] + f["ids"] + f["ts"] + f["dn"])  # ...and restamped in that order
    f = fields(next(stamps))
    split = field_bytes(3, b"".join(varint(r) for r in regions[:1])) + field_bytes(3, b"".join(
        varint(r) for r in regions[1:]))
    send(f["dn"] + f["ts"] + split + f["addr"] + f["epoch"])  # packed region_ids in two fields: merged
    more = [*regions, (LIVE << 32) | 99]
    send(canonical(next(stamps), ids=more))  # another region set
    send(canonical(next(stamps), ids=more))
    send(canonical(next(stamps), address=b"10.0.0.7"), reason="peer_addr ignored")
    send(canonical(next(stamps), address=b"10.0.0.7"), reason="peer_addr ignored")  # restamped: still ignored
    send(canonical(next(stamps)))
    stranger = stream.send_raw(canonical(next(stamps), dn=LIVE + 100))
    assert stranger.rejected and "belongs to datanode" in stranger.reason
    cut = canonical(next(stamps))[:-3]
    assert stream.send_raw(cut).rejected
    send(canonical(next(stamps)))
    assert ft.sample("supervisor_heartbeat_problems_total", reason="wrong_datanode") == 1
    assert ft.sample("supervisor_heartbeat_problems_total", reason="undecodable") == 1
    assert ft.sample("supervisor_heartbeat_problems_total", reason="peer_addr_invalid") == 2


# ---------------------------------------------------------------- logging of rejections and warnings


def test_rejections_and_warnings_are_logged_once_per_interval_with_the_datanode(fake_time, caplog):
    caplog.set_level(logging.INFO, logger="supervisor_service.server")
    ft = fake_time()
    stream = ft.stream(LIVE)
    assert not stream.send(ft.good(LIVE, node_epoch=5)).rejected
    for _ in range(20):
        assert stream.send(ft.good(LIVE, node_epoch=3)).rejected
        assert not stream.send(ft.good(LIVE, peer_addr="nope", node_epoch=5)).rejected

    def lines(reason):
        return [r for r in caplog.records if getattr(r, "fields", {}).get("reason") == reason]

    assert len(lines("stale_epoch")) == 1 and len(lines("peer_addr_invalid")) == 1
    for reason in ("stale_epoch", "peer_addr_invalid"):
        fields = lines(reason)[0].fields
        assert fields["datanode_id"] == LIVE and fields["detail"]
    ft.clock.advance(60_000)
    assert not stream.send(ft.good(LIVE, node_epoch=5)).rejected
    assert stream.send(ft.good(LIVE, node_epoch=3)).rejected
    again = lines("stale_epoch")
    assert len(again) == 2 and again[1].fields["suppressed"] == 19


# ---------------------------------------------------------------- undecodable messages


def _garbage(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    fixed = [b"\xff\xff", b"\x08", b"\x0a\x02\x08", b"\x1a\x01", b"\x22\x02\xff\xfe"]
    return fixed + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 48))) for _ in range(n)]


def test_undecodable_requests_are_invalid_argument_on_every_rpc(service, caplog):
    caplog.set_level(logging.INFO)
    svc = service(tick_interval_ms=600_000)
    garbage = _garbage(9, 40)
    codes: dict[str, set] = {}
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        for service_desc in (SERVICE, HEALTH, REFLECTION):
            for method in service_desc.methods:
                if method.name == "SendHeartbeat":
                    continue  # its own test below: a bad message does not end the stream
                path = f"/{service_desc.full_name}/{method.name}"
                message_type = MESSAGES[method.input_type.name]
                kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                        (True, True): channel.stream_stream}[method.client_streaming, method.server_streaming]
                call = kind(path, request_serializer=None, response_deserializer=None)
                for raw in garbage:
                    try:
                        result = call(iter([raw]) if method.client_streaming else raw, timeout=RPC_TIMEOUT)
                        if method.server_streaming:
                            for _ in zip(range(1), result):  # a Watch never ends: one answer is enough
                                pass
                            result.cancel()
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        code, details = exc.code(), exc.details()
                        if not decodes(message_type, raw):
                            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, raw, code, details)
                            assert details.startswith(f"not a valid {method.input_type.name}: "), details
                            assert len(details) < 300
                    codes.setdefault(path, set()).add(code)
                    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (path, raw, code)
    assert all(grpc.StatusCode.INVALID_ARGUMENT in c for c in codes.values()), codes
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    lines = [r for r in caplog.records if r.getMessage() == "request_undecodable"]
    assert 0 < len(lines) <= len(codes)  # one per method per interval
    assert all(r.levelno == logging.WARNING for r in lines)
    assert svc.registry.get_sample_value(
        "supervisor_requests_invalid_total", {"method": "RegisterDetectors", "reason": "undecodable"}
    ) >= 5


def test_an_undecodable_heartbeat_is_rejected_and_the_stream_goes_on(fake_time, caplog):
    caplog.set_level(logging.INFO)
    ft = fake_time()
    stream = ft.stream(LIVE)
    assert not stream.send(ft.good(LIVE)).rejected
    for raw in _garbage(3, 30):
        if decodes(pb.HeartbeatRequest, raw):
            continue
        bad = stream.send_raw(raw)
        assert bad.rejected and bad.reason.startswith("not a valid HeartbeatRequest: ")
        assert bad.datanode_id == LIVE  # the stream's datanode
        good = stream.send(ft.good(LIVE))
        assert not good.rejected and good.accepted_regions == 3
    assert ft.sample("supervisor_heartbeat_problems_total", reason="undecodable") >= 5
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len([r for r in caplog.records if getattr(r, "fields", {}).get("reason") == "undecodable"]) == 1


# ---------------------------------------------------------------- numeric fields of requests


@pytest.mark.parametrize("ttl", [2**63 - 1, 2**64 - 1, 2**63 - 1_700_000_000_000, 100 * 365 * 86_400_000 + 1])
def test_a_maintenance_ttl_beyond_what_the_service_holds_is_invalid_and_not_applied(service, ttl):
    svc = service(tick_interval_ms=600_000)
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        for datanodes in ([], [3]):
            with pytest.raises(grpc.RpcError) as info:
                stub.SetMaintenanceMode(
                    pb.SetMaintenanceModeRequest(enabled=True, ttl_millis=ttl, datanode_ids=datanodes),
                    timeout=RPC_TIMEOUT,
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ttl_millis" in info.value.details() and "3153600000000" in info.value.details()
        state = stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT)
        assert not state.enabled and list(state.datanodes) == []
        # The bound itself is accepted.
        on = stub.SetMaintenanceMode(
            pb.SetMaintenanceModeRequest(enabled=True, ttl_millis=100 * 365 * 86_400_000), timeout=RPC_TIMEOUT
        )
        assert on.enabled and on.expires_at_millis > 0
        assert stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT).enabled


def test_a_stored_maintenance_state_out_of_range_does_not_poison_get_maintenance_mode(service, caplog):
    """Written by an earlier version that accepted any ttl: an expiry past int64, a datanode id past uint64."""
    caplog.set_level(logging.INFO)
    kv = MemoryKV()
    state = {"enabled": True, "until_ms": 2**64 + 5, "datanodes": [[3, 2**70], [2**64, 10], [4, 0]]}
    kv.commit({"/region-supervisor/default/maintenance": json.dumps(state).encode()}, set())
    svc = service(kv=kv, tick_interval_ms=600_000)
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        got = stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=RPC_TIMEOUT)
        assert got.enabled and got.expires_at_millis == 2**63 - 1
        assert [(d.datanode_id, d.expires_at_millis) for d in got.datanodes] == [(3, 2**63 - 1), (4, 0)]
        # Switching it off works and leaves a clean state.
        off = stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=False), timeout=RPC_TIMEOUT)
        assert not off.enabled
    assert any(r.getMessage() == "maintenance_state_out_of_range" for r in caplog.records)


def test_dump_with_too_many_datanode_ids_is_invalid(service):
    svc = service(tick_interval_ms=600_000, max_regions_per_request=10)
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Dump(pb.DumpRequest(datanode_ids=range(11)), timeout=RPC_TIMEOUT))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "datanode_ids" in info.value.details() and "10" in info.value.details()
        assert list(stub.Dump(pb.DumpRequest(datanode_ids=range(10)), timeout=RPC_TIMEOUT))
