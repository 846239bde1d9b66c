"""The real `supervisor-service serve` in a child process, fuzzed on every RPC and on a heartbeat stream.

What the in-process fuzz tests check (tests/integration/test_fuzz_rpc.py), against the command an
operator runs, with its SQLite store on disk: no UNKNOWN or INTERNAL status, no state change from a
refused call, a consistent Dump, SERVING throughout; and then a clean SIGTERM (exit 0) and a log
without a traceback. Fewer examples: the point is the real process and its store, not the search.
"""

from __future__ import annotations

import json
import signal

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor_service.proto import pb
from tests.support.fuzzed_service import FUZZ_SETTINGS, SERVICE, Fuzzed
from tests.support.fuzzing import examples, wire
from tests.support.servers import ServiceProcess

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(300)]

NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
STATE_CHANGING = {"RegisterDetectors", "DeregisterDetectors", "ResetDetectors", "SetMaintenanceMode",
                  "ReleaseFailoverHold"}
METHODS = [m for m in SERVICE.methods if not m.client_streaming]


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-process")
    env = {f"SUPERVISOR_{k.upper()}": str(v) for k, v in FUZZ_SETTINGS.items()}
    env.update(SUPERVISOR_DATA_DIR=str(tmp / "data"), SUPERVISOR_STORE="sqlite", SUPERVISOR_METRICS_ADDR="",
               SUPERVISOR_WARMUP_GRACE_MS="0")
    proc = ServiceProcess(env, str(tmp / "service.log"))
    try:
        proc.wait_serving(leader=True)
        target = Fuzzed(addr=proc.addr)
        yield proc, target
        target.channel.close()
    finally:
        proc.stop()


@examples(60)
@given(data=st.data())
def test_the_service_process_answers_fuzzed_requests_on_every_rpc(child, data):
    proc, target = child
    method = data.draw(st.sampled_from(METHODS), label="method")
    raw = data.draw(wire(method.input_type._concrete_class), label="request")
    before = target.state() if method.name in STATE_CHANGING else None
    try:
        code, details, answers = target.call(method, raw)
        assert code not in NEVER, (method.name, raw[:64], code, details)
        if code == grpc.StatusCode.OK:
            for answer in answers:
                method.output_type._concrete_class.FromString(answer)
        elif before is not None:
            assert target.state() == before, f"{method.name} refused with {code.name} but changed the state"
    finally:
        target.clean()
    assert proc.proc.poll() is None, proc.log_tail()


@examples(20)
# (Frames above max_message_bytes end the stream: tests/integration/test_fuzz_heartbeat_stream.py.)
@given(frames=st.lists(wire(pb.HeartbeatRequest).filter(lambda b: len(b) <= FUZZ_SETTINGS["max_message_bytes"]),
                       min_size=1, max_size=6))
def test_the_service_process_answers_every_fuzzed_heartbeat(child, frames):
    proc, target = child
    method = target.channel.stream_stream(f"/{SERVICE.full_name}/SendHeartbeat", request_serializer=None,
                                          response_deserializer=None)
    answers = [pb.HeartbeatResponse.FromString(a) for a in method(iter(frames), timeout=30)]
    assert len(answers) == len(frames)
    assert all(a.reason for a in answers if a.rejected)
    target.clean()


def test_after_the_fuzz_the_process_stops_cleanly_and_logged_no_traceback(child):
    proc, target = child
    target.check_consistent()
    proc.kill(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.log_tail()
    with open(proc.log_path, encoding="utf-8", errors="replace") as log:
        lines = log.read().splitlines()
    assert not [line for line in lines if "Traceback" in line], lines[-20:]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and not [r for r in records if r.get("level") in ("error", "critical", "ERROR", "CRITICAL")], [
        r for r in records if r.get("level") in ("error", "critical", "ERROR", "CRITICAL")][:5]
