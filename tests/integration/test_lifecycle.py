"""Shutdown and death: orderly stop, the supervisor thread dying, real processes and signals, the ticker.

In-process services run on an event loop in a daemon thread; the test drives
`start`, `wait` and `stop` on that loop with `run_coroutine_threadsafe`, so it
can watch each step from outside as a client would.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.service import EXIT_SUPERVISOR_DIED, Service
from supervisor_service.app.settings import load_settings
from supervisor_service.core import Clear, Dump, Tick
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.runtime import EventQueue, Ticker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPC_TIMEOUT = 5.0


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float = 15.0):
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


def make_service(**overrides) -> tuple[Service, CollectorRegistry]:
    settings = dict(
        grpc_addr="127.0.0.1:0",
        metrics_addr="",
        store="memory",
        shutdown_timeout_ms=2000,
        tick_interval_ms=600_000,
    )
    settings.update(overrides)
    registry = CollectorRegistry()
    return Service(load_settings(**settings), registry=registry), registry


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def started(loop_thread):
    """A started service (not yet waited on); stopped at teardown whatever the test did."""
    services = []

    def start(**overrides):
        service, registry = make_service(**overrides)
        services.append(service)
        loop_thread.run(service.start())
        wait_until(lambda: service.supervisor.status.is_leader, what="leadership")
        channel = grpc.insecure_channel(service.addresses.grpc)
        return SimpleNamespace(
            service=service,
            registry=registry,
            channel=channel,
            stub=pb_grpc.RegionSupervisorStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )

    yield start
    for service in services:
        loop_thread.run(service.stop(), timeout=30)


def open_watch(health_stub):
    """A health Watch on the whole server; returns (iterator, first status)."""
    watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    return watch, next(watch).status


def kill_supervisor_thread(service: Service) -> None:
    """A bogus event: `Supervisor.handle` has no case for it and raises, as a bug would."""
    service.queue.put_control(object())


def register(stub, datanode_id: int, region_id: int, **kwargs) -> int:
    request = pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=datanode_id, region_id=region_id)])
    return stub.RegisterDetectors(request, timeout=RPC_TIMEOUT, **kwargs).affected


# ---------------------------------------------------------------- stop


def test_stop_reports_not_serving_first_and_is_idempotent(loop_thread, started):
    s = started(metrics_addr="127.0.0.1:0", shutdown_timeout_ms=4000)
    metrics_url = f"http://{s.service.addresses.metrics}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        assert b"supervisor_thread_alive 1.0" in resp.read()
    assert register(s.stub, 1, 1) == 1
    watch, first = open_watch(s.health)
    assert first == SERVING

    stopping = loop_thread.submit(s.service.stop())
    # The Watch is an RPC in flight: the server is still in its grace period when health flips,
    # so the stream sees NOT_SERVING before the server goes away.
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    stopping.result(10)

    async def stop_again() -> None:
        # Twice concurrently and once more: none of them runs the steps again (a second
        # shutdown of the metrics HTTP server would block forever).
        await asyncio.wait_for(asyncio.gather(s.service.stop(), s.service.stop()), 5)
        await asyncio.wait_for(s.service.stop(), 5)

    loop_thread.run(stop_again())
    assert s.service.exit_code == 0
    assert not s.service.runtime.alive
    assert s.registry.get_sample_value("supervisor_thread_alive") == 0
    with pytest.raises(grpc.RpcError) as info:
        s.health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):
        urllib.request.urlopen(metrics_url, timeout=2)
    s.channel.close()


def test_stop_ends_open_heartbeat_streams_within_the_budget(loop_thread, started):
    s = started(shutdown_timeout_ms=1000)
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    responses = s.stub.SendHeartbeat(requests(), timeout=30)
    outbox.put(pb.HeartbeatRequest(datanode_id=1, region_ids=[1]))
    assert not next(responses).rejected
    begun = time.monotonic()
    loop_thread.run(s.service.stop(), timeout=10)
    assert time.monotonic() - begun < 1.0 + 1.0  # the budget, plus slack for a loaded machine
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    outbox.put(None)
    s.channel.close()


# ---------------------------------------------------------------- death


def test_supervisor_thread_death_exits_70_not_serving(loop_thread, started):
    s = started(shutdown_timeout_ms=2000)
    service = s.service
    assert register(s.stub, 1, 1) == 1
    waiting = loop_thread.submit(service.wait())
    watch, first = open_watch(s.health)
    assert first == SERVING

    # Hold the thread on one event so that an RPC is queued behind the fatal one.
    gate = threading.Event()
    fatal = Dump(Future())
    handle = service.supervisor.handle

    def dying_handle(event, now):
        if event is fatal:
            gate.wait(10)
            raise RuntimeError("injected bug in the supervisor thread")
        return handle(event, now)

    service.supervisor.handle = dying_handle
    service.queue.put_control(fatal)
    queued = s.stub.RegisterDetectors.future(
        pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=2, region_id=1)]), timeout=30
    )
    wait_until(lambda: len(service.queue) >= 1, what="the queued Register")
    died_at = time.monotonic()
    gate.set()

    assert next(watch).status == NOT_SERVING
    watch.cancel()
    assert waiting.result(15) == EXIT_SUPERVISOR_DIED == 70
    assert isinstance(service.runtime.death, RuntimeError)
    assert s.registry.get_sample_value("supervisor_thread_alive") == 0

    # The call that was waiting for the dead thread fails with UNAVAILABLE, at the latest when
    # the grace period of the shutdown ends: it does not hang for its own deadline.
    with pytest.raises(grpc.RpcError) as info:
        queued.result()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - died_at < 2.0 + 2.0
    # A call after death is refused at once, not left hanging.
    begun = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        register(s.stub, 3, 1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - begun < RPC_TIMEOUT
    s.channel.close()


def test_calls_after_death_are_unavailable_even_before_shutdown(loop_thread, started):
    """Nobody awaits wait() here, so the server stays up: the edge itself must refuse, not hang."""
    s = started()
    service = s.service
    kill_supervisor_thread(service)
    wait_until(lambda: not service.runtime.alive, what="the supervisor thread to die")
    assert service.exit_code == EXIT_SUPERVISOR_DIED
    assert isinstance(service.runtime.death, AssertionError)
    assert s.registry.get_sample_value("supervisor_thread_alive") == 0

    for call in (
        lambda: register(s.stub, 1, 1),
        lambda: list(s.stub.Dump(pb.DumpRequest(), timeout=RPC_TIMEOUT)),
        lambda: s.stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=True), timeout=RPC_TIMEOUT),
    ):
        begun = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
        assert time.monotonic() - begun < 2.0

    outbox: queue.Queue = queue.Queue()
    outbox.put(pb.HeartbeatRequest(datanode_id=1, region_ids=[1]))
    outbox.put(None)
    responses = list(s.stub.SendHeartbeat(iter(outbox.get, None), timeout=RPC_TIMEOUT))
    assert len(responses) == 1
    assert responses[0].rejected and "shutting down" in responses[0].reason
    assert s.registry.get_sample_value("supervisor_heartbeats_total", {"outcome": "rejected_shutdown"}) == 1
    s.channel.close()


# ---------------------------------------------------------------- a real process


def _serve_command() -> list[str]:
    script = Path(sys.executable).parent / "supervisor-service"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "supervisor_service.cli", "serve"]


@pytest.mark.realtime
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_real_process_serves_and_exits_zero_on_signal(tmp_path, sig):
    grpc_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env.update(SUPERVISOR_DATA_DIR=str(tmp_path / "data"), SUPERVISOR_SHUTDOWN_TIMEOUT_MS="4000",
               SUPERVISOR_LOG_FORMAT="json")
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            _serve_command() + ["--grpc-addr", f"127.0.0.1:{grpc_port}", "--metrics-addr", f"127.0.0.1:{metrics_port}"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"never SERVING:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.05)
        stub = pb_grpc.RegionSupervisorStub(channel)
        wait_until(lambda: list(stub.Dump(pb.DumpRequest(), timeout=RPC_TIMEOUT))[0].is_leader, what="leader")
        assert register(stub, 1, (5 << 32) | 7) == 1

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "supervisor_thread_alive 1.0" in text
        assert "supervisor_is_leader 1.0" in text
        assert "# TYPE supervisor_heartbeats_total counter" in text
        assert sum(1 for line in text.splitlines() if line.startswith("supervisor_")) >= 10
        channel.close()

        signalled = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=4 + 5) == 0, log_path.read_text()[-3000:]
        assert time.monotonic() - signalled < 4 + 2
        log = log_path.read_text()
        assert "service_started" in log and "service_stopped" in log
        assert "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # The default store is a SQLite file in the data directory.
    assert (tmp_path / "data" / "supervisor.sqlite3").exists()


# ---------------------------------------------------------------- ticker


def _ticker(interval_s: float = 0.02):
    q = EventQueue(100)
    runtime = SimpleNamespace(tick_pending=threading.Event())
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    class Clock:
        def monotonic(self) -> float:
            return time.monotonic()

        def now_ms(self) -> int:
            return int(time.time() * 1000)

    return Ticker(q, runtime, Clock(), metrics, interval_s), q, runtime, registry


def _drain(q: EventQueue) -> list:
    events = []
    while (event := q.get(timeout=0)) is not None:
        events.append(event)
    return events


def test_ticker_clear_then_one_pending_tick_then_skips():
    ticker, q, runtime, registry = _ticker(0.02)
    begun = time.monotonic()
    ticker.start()
    try:
        time.sleep(0.3)  # nobody consumes: the first tick stays pending, later ones are skipped
        events = _drain(q)
        elapsed = time.monotonic() - begun
        assert isinstance(events[0], Clear)
        assert len(events) == 2 and isinstance(events[1], Tick)
        assert runtime.tick_pending.is_set()
        skipped = registry.get_sample_value("supervisor_ticks_skipped_total")
        # ~14 intervals in 0.3 s, one of which was enqueued; never more than the intervals elapsed
        assert 5 <= skipped <= elapsed / 0.02
    finally:
        ticker.stop()


def test_ticker_ticks_while_consumed_and_stops_at_once():
    ticker, q, runtime, registry = _ticker(0.02)
    ticks: list[Tick] = []
    seen_clear = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            event = q.get(timeout=0.01)
            if event is None:
                continue
            if isinstance(event, Tick):
                ticks.append(event)
                runtime.tick_pending.clear()  # as the runtime does when it takes a tick
            else:
                seen_clear.append(event)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    begun = time.monotonic()
    ticker.start()
    try:
        time.sleep(0.3)
    finally:
        ticker.stop()
    elapsed = time.monotonic() - begun
    stopped_with = len(ticks)
    time.sleep(0.1)
    done.set()
    consumer.join(5)
    assert len(seen_clear) == 1 and isinstance(seen_clear[0], Clear)
    assert 5 <= stopped_with <= elapsed / 0.02 + 1
    assert len(ticks) - stopped_with <= 1  # at most the one already in the queue when stop returned
    assert _drain(q) == []
    dues = [t.due_monotonic for t in ticks]
    assert dues == sorted(dues) and len(set(dues)) == len(dues)  # one per interval, in phase
    # Ticks are never enqueued twice while one is pending.
    assert registry.get_sample_value("supervisor_ticks_skipped_total") <= 3


def test_ticker_start_without_clear_and_restart():
    ticker, q, runtime, _ = _ticker(0.02)
    ticker.start(clear=False)
    ticker.start(clear=False)  # a second start is a no-op
    time.sleep(0.1)
    ticker.stop()
    ticker.stop()
    events = _drain(q)
    assert events and all(isinstance(e, Tick) for e in events)
    assert len(events) == 1  # never consumed: one pending tick


def test_reads_while_the_leader_loads_its_state_are_unavailable_not_stale(service):
    """Elected but still loading (here: the initialization delay): the supervisor's switches and
    table are those of before the recovery, so reads answer UNAVAILABLE instead of, say,
    maintenance off while it is on in the store."""
    from supervisor_service.proto import pb, pb_grpc

    svc = service(wait_leader=False, initialization_delay_ms=3000)
    with grpc.insecure_channel(svc.addresses.grpc) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        calls = [
            lambda: stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=5),
            lambda: stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), timeout=5),
            lambda: list(stub.Dump(pb.DumpRequest(), timeout=5)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading its state" in info.value.details()
        deadline = time.monotonic() + 15
        while not svc.supervisor.status.is_leader:
            assert time.monotonic() < deadline, "never became leader"
            time.sleep(0.02)
        assert stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), timeout=5).is_leader


def test_a_stop_while_a_transition_is_busy_still_tells_the_supervisor_it_lost_leadership(service, caplog):
    """Stopping resigns, which queues LoseLeadership's hand-over on the transitions thread; the stop
    then shuts that thread's executor down, cancelling what has not started. A transition still
    busy (here: held) must not make the supervisor miss that it no longer leads."""
    import logging
    import threading

    svc = service()
    assert svc.supervisor.status.is_leader
    busy = threading.Event()
    svc._transitions.submit(busy.wait, 10)  # private: the one worker of leadership transitions, held
    caplog.set_level(logging.WARNING, logger="supervisor_service.supervisor")
    try:
        service.close()
    finally:
        busy.set()
    assert not svc.supervisor.status.is_leader
    assert "leadership_stopped" in [r.getMessage() for r in caplog.records]
