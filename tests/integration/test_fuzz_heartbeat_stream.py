"""SendHeartbeat streams fuzzed on a real server: garbage in the middle of a stream breaks neither it nor the others.

One real in-process service for the module (`tests.support.fuzzed_service`). A well-behaved datanode
holds one stream for the whole module. Each example opens a new stream and sends on it a sequence of
frames: heartbeats built from the descriptor with edge values (any datanode id, 2**64-1 regions,
huge region lists, long and odd `peer_addr`, extreme timestamps and epochs), the same damaged
(truncated, non-UTF-8, wrong wire types), and garbage; after each frame the good datanode
heartbeats too.

Properties:
- every frame gets exactly one answer, which parses; a frame that does not parse is answered
  `rejected=true` with `not a valid HeartbeatRequest`; an answer is never `rejected` without a reason;
- the stream ends with a status of its own when the client half-closes (never UNKNOWN or INTERNAL);
- the good datanode is accepted every time, all its regions, and its detectors stay in the Dump;
- the service stays SERVING and its Dump consistent.
"""

from __future__ import annotations

import queue
import time

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor_service.proto import pb
from tests.support.fuzzed_service import FUZZ_SETTINGS, LIMIT, SERVICE, Fuzzed
from tests.support.fuzzing import examples, message, wire
from tests.support.wire import field_bytes, field_varint

pytestmark = [pytest.mark.timeout(300)]

GOOD = 4242
GOOD_REGIONS = [(GOOD << 32) | i for i in range(5)]
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
PATH = f"/{SERVICE.full_name}/SendHeartbeat"


class Stream:
    """One SendHeartbeat stream of raw frames: `send` writes one and reads its one answer."""

    def __init__(self, channel: grpc.Channel, timeout: float = 120) -> None:
        self._outbox: queue.Queue = queue.Queue()
        method = channel.stream_stream(PATH, request_serializer=None, response_deserializer=None)
        self.call = method(iter(self._outbox.get, None), timeout=timeout)

    def send(self, raw: bytes) -> pb.HeartbeatResponse:
        self._outbox.put(raw)
        return pb.HeartbeatResponse.FromString(next(self.call))

    def finish(self) -> grpc.StatusCode:
        """Half-close and read the end: the status the server ended the stream with."""
        self._outbox.put(None)
        try:
            extra = list(self.call)
        except grpc.RpcError as exc:
            return exc.code()
        assert extra == [], "answers nobody asked for"
        return self.call.code()


class Target:
    def __init__(self, **settings) -> None:
        self.fuzzed = Fuzzed(**settings)
        self.good = Stream(self.fuzzed.channel, timeout=24 * 3600)  # the whole module, however long `make fuzz` runs
        self.check_good()

    def check_good(self) -> None:
        beat = pb.HeartbeatRequest(datanode_id=GOOD, region_ids=GOOD_REGIONS, peer_addr="10.9.9.9:4001",
                                   timestamp_millis=int(time.time() * 1000))
        answer = self.good.send(beat.SerializeToString())
        assert not answer.rejected and answer.accepted_regions == len(GOOD_REGIONS), answer
        assert answer.reason == "", answer.reason

    def close(self) -> None:
        assert self.good.finish() in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
        self.fuzzed.close()


@pytest.fixture(scope="module", params=["server_clock", "client_clock"])
def target(request):
    """As deployed, and trusting any client stamp (`heartbeat_clock=client`, no skew bound): there the
    fuzzed `timestamp_millis` (int64 extremes) reach the detector table."""
    extra = {} if request.param == "server_clock" else dict(heartbeat_clock="client", max_client_clock_skew_ms=0)
    t = Target(**extra)
    yield t
    t.fuzzed.check_consistent()
    t.close()


def _decodes(raw: bytes) -> bool:
    try:
        pb.HeartbeatRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - any parse failure
        return False
    return True


def _heartbeats_of(datanode_id: int) -> st.SearchStrategy[bytes]:
    """Heartbeats of one datanode with fuzzed other fields (the stream's owner stays the same)."""
    def own(m: pb.HeartbeatRequest) -> bytes:
        m.datanode_id = datanode_id
        return m.SerializeToString()
    return message(pb.HeartbeatRequest).map(own)


FRAME = st.one_of(wire(pb.HeartbeatRequest), _heartbeats_of(77), _heartbeats_of(2**64 - 1))


def run_stream(target: Target, frames: list[bytes]) -> None:
    stream = Stream(target.fuzzed.channel)
    try:
        for raw in frames:
            if len(raw) > FUZZ_SETTINGS["max_message_bytes"]:
                # Above max_message_bytes gRPC itself ends the stream (RESOURCE_EXHAUSTED), and only it.
                with pytest.raises(grpc.RpcError) as info:
                    stream.send(raw)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
                target.check_good()
                return
            answer = stream.send(raw)
            if not _decodes(raw):
                assert answer.rejected and answer.reason.startswith("not a valid HeartbeatRequest"), answer
            if answer.rejected:
                assert answer.reason, "rejected without a reason"
                assert answer.accepted_regions == 0
            assert len(answer.reason) < 2000, "a reason that echoes the input"
            target.check_good()
        code = stream.finish()
        assert code not in NEVER, code
        assert code == grpc.StatusCode.OK, code
    finally:
        stream.call.cancel()
    pairs = target.fuzzed.state()[0]
    assert [(GOOD, r) for r in GOOD_REGIONS] == [p for p in pairs if p[0] == GOOD]
    # Whatever stamps the frames left in the table, phi is computed at any time asked.
    dump = SERVICE.methods_by_name["Dump"]
    for at in (1, 2**62, 2**63 - 1):
        request = pb.DumpRequest(at_millis=at, only_failed=at > 2**62, page_size=LIMIT)
        code, details, pages = target.fuzzed.call(dump, request.SerializeToString())
        assert code == grpc.StatusCode.OK, (at, code, details)
        rows = [d for p in pages for d in pb.DumpResponse.FromString(p).detectors]
        assert all(d.phi >= 0 and d.phi == d.phi for d in rows), [d for d in rows if not d.phi >= 0][:3]


@examples(60)
@given(frames=st.lists(FRAME, min_size=1, max_size=8))
@example(frames=[b"\xff\xff", b"\x08\x01"])  # garbage first: the stream has no owner yet
@example(frames=[field_varint(1, 77), field_varint(1, 78), b"\x80"])  # another datanode, then a cut varint
@example(frames=[field_varint(1, 77) + field_bytes(4, b"\xff\xfe:1")])  # a peer_addr that is not UTF-8
@example(frames=[field_varint(1, 77) + field_bytes(3, b"\xff" * 9)])  # a packed region that never ends
# Found by `make fuzz`: a frame above max_message_bytes (100,001 packed regions of 2**53+1, twice)
# ends its stream with RESOURCE_EXHAUSTED, as gRPC does; only that stream.
@example(frames=[pb.HeartbeatRequest(region_ids=[2**53 + 1] * 100_001).SerializeToString() * 2])
def test_garbage_on_a_heartbeat_stream_breaks_neither_it_nor_the_others(target, frames):
    try:
        run_stream(target, frames)
    finally:
        target.fuzzed.clean(keep={GOOD})
    target.fuzzed.check_consistent()


def test_a_heartbeat_of_more_regions_than_allowed_is_answered_and_changes_nothing(target):
    big = pb.HeartbeatRequest(datanode_id=78, region_ids=range(LIMIT + 1)).SerializeToString()
    stream = Stream(target.fuzzed.channel)
    try:
        answer = stream.send(big)
        assert not answer.rejected and "max_regions_per_heartbeat" in answer.reason, answer
        assert [p for p in target.fuzzed.state()[0] if p[0] == 78] == []
        assert stream.finish() == grpc.StatusCode.OK
    finally:
        stream.call.cancel()
        target.fuzzed.clean(keep={GOOD})


def test_a_message_above_max_message_bytes_ends_only_its_own_stream(target):
    stream = Stream(target.fuzzed.channel)
    huge = pb.HeartbeatRequest(datanode_id=79, peer_addr="z" * (2 << 20)).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        stream.send(huge)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    target.check_good()
    target.fuzzed.check_consistent()
