"""The /metrics endpoint under hostile clients: thousands of idle connections, slow readers,
garbage, while heartbeats and real scrapes stay prompt."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from supervisor_service.app.metrics_http import MetricsHTTPServer
from supervisor_service.proto import pb, pb_grpc


def _scrape(addr: str, timeout: float = 5.0, **headers) -> tuple[float, int, dict, bytes]:
    begun = time.monotonic()
    request = urllib.request.Request(f"http://{addr}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body = resp.read()
        return time.monotonic() - begun, resp.status, dict(resp.headers), body


def _heartbeat_round_trip(addr: str) -> float:
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.RegionSupervisorStub(channel)
        grpc.channel_ready_future(channel).result(timeout=5)
        begun = time.monotonic()
        answers = stub.SendHeartbeat(iter([pb.HeartbeatRequest(datanode_id=1, region_ids=[10])]), timeout=10)
        assert not next(answers).rejected
        return time.monotonic() - begun


def _connect_many(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


@pytest.mark.realtime
def test_thousands_of_idle_connections_cost_no_threads_and_starve_nothing(service):
    svc = service(metrics_addr="127.0.0.1:0", metrics_timeout_ms=1000)
    host, _, port = svc.addresses.metrics.rpartition(":")
    threads_before = threading.active_count()
    idle = _connect_many(int(port), 2000)
    slow = []
    try:
        # And 100 that ask for the metrics but never read the answer.
        for s in _connect_many(int(port), 100):
            slow.append(s)
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            except BlockingIOError:
                pass
        time.sleep(0.3)
        assert threading.active_count() <= threads_before + 2, threading.active_count() - threads_before
        for _ in range(3):  # each a new connection while the idle ones are held
            took, status, _, body = _scrape(svc.addresses.metrics)
            assert status == 200 and b"supervisor_detectors" in body
            assert took < 2, took
        assert _heartbeat_round_trip(svc.addresses.grpc) < 1
        # Idle connections are closed after the timeout: the server's end reads as EOF.
        sample = idle[-50:]  # the newest, still held: closed by the timeout
        deadline = time.monotonic() + 5
        closed = 0
        while time.monotonic() < deadline and closed < len(sample):
            closed = 0
            for s in sample:
                try:
                    closed += s.recv(4096, socket.MSG_PEEK) == b"" or _drained_to_eof(s)
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            time.sleep(0.1)
        assert closed == len(sample)
        registry = svc.registry
        assert registry.get_sample_value("supervisor_metrics_http_errors_total", {"reason": "idle_evicted"}) > 1000
        assert registry.get_sample_value("supervisor_metrics_http_errors_total", {"reason": "timeout"}) > 0
        assert registry.get_sample_value("supervisor_metrics_http_connections") <= 256
    finally:
        for s in idle + slow:
            s.close()
    took, status, _, _ = _scrape(svc.addresses.metrics)
    assert status == 200 and took < 2


def _drained_to_eof(s: socket.socket) -> bool:
    """A connection that was answered (503) and closed: read what is left, then EOF."""
    while True:
        data = s.recv(65536)
        if data == b"":
            return True


@pytest.fixture
def endpoint():
    registry = CollectorRegistry()
    counter = Counter("things", "Things.", registry=registry)
    drops = []
    server = MetricsHTTPServer(registry, "127.0.0.1", 0, max_connections=4, timeout_s=0.5, cache_s=1.0,
                               on_drop=drops.append).start()
    server.counter, server.drops, server.registry_ = counter, drops, registry
    yield server
    server.stop()


def test_concurrent_scrapes_cost_one_render(endpoint):
    addr = f"127.0.0.1:{endpoint.server_port}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(_scrape(addr))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[1] for r in results] == [200] * 4
    assert endpoint.renders == 1
    # The same bytes prometheus_client renders, with its content type.
    _, _, headers, body = _scrape(addr)
    assert body == generate_latest(endpoint.registry_)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_formats_gzip_and_errors(endpoint):
    addr = f"127.0.0.1:{endpoint.server_port}"
    _, _, headers, body = _scrape(addr, Accept="application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    _, _, headers, body = _scrape(addr, **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"things_total" in gzip.decompress(body)
    with urllib.request.urlopen(f"http://{addr}/metrics?name[]=things_total", timeout=5) as resp:
        assert resp.read() == generate_latest(endpoint.registry_.restricted_registry(["things_total"]))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{addr}/nope", timeout=5)
    assert info.value.code == 404
    with socket.create_connection(("127.0.0.1", endpoint.server_port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", endpoint.server_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"a" * 10_000)
        assert s.recv(100).startswith(b"HTTP/1.1 431")
    assert endpoint.drops.count("bad_request") == 2


def test_a_render_is_cached_for_its_interval_only(endpoint):
    addr = f"127.0.0.1:{endpoint.server_port}"
    _scrape(addr)
    endpoint.counter.inc(5)
    assert b"things_total 0.0" in _scrape(addr)[3]  # within the interval: the cached render
    time.sleep(1.05)
    assert b"things_total 5.0" in _scrape(addr)[3]
    assert endpoint.renders == 2


def test_at_the_cap_idle_connections_make_room_and_timeouts_free_the_slots(endpoint):
    port = endpoint.server_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.1)
        assert _scrape(f"127.0.0.1:{port}")[1] == 200  # took the place of the oldest idle one
        assert held[0].recv(1) == b"" and endpoint.drops == ["idle_evicted"]
        # The others send nothing: after the timeout they are closed.
        for s in held[1:]:
            assert s.recv(1) == b""
        assert endpoint.drops.count("timeout") == 3
    finally:
        for s in held:
            s.close()


class _Huge:
    def collect(self):
        family = GaugeMetricFamily("huge", "A 16 MB label.", labels=["blob"])
        family.add_metric(["x" * (16 << 20)], 1)
        yield family


def test_when_every_slot_is_being_answered_a_new_connection_gets_503():
    registry = CollectorRegistry()
    registry.register(_Huge())
    drops = []
    server = MetricsHTTPServer(registry, "127.0.0.1", 0, max_connections=2, timeout_s=5, on_drop=drops.append).start()
    readers = []
    try:
        for _ in range(2):  # ask, and read slowly: the answer stays pending
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.server_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            readers.append(s)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        assert drops == ["over_limit"]
    finally:
        for s in readers:
            s.close()
        server.stop()


def test_running_out_of_file_descriptors_does_not_spin(endpoint):
    """accept() failing (EMFILE) leaves the listener readable: the loop pauses it instead of spinning."""
    import errno

    real = endpoint._listener
    calls = []

    class _Exhausted:
        def fileno(self):
            return real.fileno()

        def accept(self):
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

    endpoint._listener = _Exhausted()
    with socket.create_connection(("127.0.0.1", endpoint.server_port), timeout=5):
        time.sleep(1.2)
    endpoint._listener = real
    assert 1 <= len(calls) <= 5, len(calls)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # descriptors are back: it serves again
        try:
            if _scrape(f"127.0.0.1:{endpoint.server_port}", timeout=1)[1] == 200:
                break
        except OSError:
            pass
    else:
        pytest.fail("the endpoint did not serve again")
