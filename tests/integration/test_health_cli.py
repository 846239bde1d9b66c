"""`supervisor-service health`: what a container HEALTHCHECK and an operator's script see.

Exit 0 only when the service answers SERVING; 1 when it answers anything else (or does not know
the name yet); 69 when there is no answer: nothing listens, the port does not speak gRPC, there
is no health service, or the answer does not come within --timeout. Against the real service,
a stopped one, and a few servers that are not what they should be.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from supervisor_service.cli.main import EXIT_NOT_SERVING, EXIT_UNAVAILABLE, EXIT_USAGE, main
from tests.support.readiness import SERVICE_NAME, free_port
from tests.support.waiting import wait_for


def _health(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["health", *argv])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@pytest.fixture
def health_server():
    """A plain gRPC server with grpc_health's servicer: the test sets the statuses it answers."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


# ---------------------------------------------------------------- the real service


def test_the_running_service_is_serving(service, capsys):
    svc = service()
    assert _health(capsys, "--addr", svc.addresses.grpc) == (0, "SERVING", "")
    # The whole server ('') as well.
    assert _health(capsys, "--addr", svc.addresses.grpc, "--service", "")[:2] == (0, "SERVING")


def test_a_service_that_cannot_commit_is_not_serving(service, capsys):
    svc = service()
    svc._set_unhealthy("store", "database or disk is full")
    wait_for(lambda: main(["health", "--addr", svc.addresses.grpc]) == EXIT_NOT_SERVING, 10,
             "health NOT_SERVING after the store failed")
    capsys.readouterr()
    code, out, _ = _health(capsys, "--addr", svc.addresses.grpc)
    assert (code, out) == (EXIT_NOT_SERVING, "NOT_SERVING")
    svc._set_unhealthy("store", "")
    wait_for(lambda: main(["health", "--addr", svc.addresses.grpc]) == 0, 10, "SERVING again")


def test_a_stopped_service_is_unreachable(service, capsys):
    factory = service
    svc = factory()
    addr = svc.addresses.grpc
    factory.close()
    code, out, err = _health(capsys, "--addr", addr, "--timeout", "5")
    assert code == EXIT_UNAVAILABLE and out == ""
    assert err.startswith("supervisor-service: error: cannot check the health of") and "UNAVAILABLE" in err, err


def test_with_an_auth_token_set_the_check_needs_none(service, capsys):
    svc = service(auth_token="s3cret")
    assert _health(capsys, "--addr", svc.addresses.grpc, "--token", "")[:2] == (0, "SERVING")
    assert _health(capsys, "--addr", svc.addresses.grpc, "--token", "wrong")[:2] == (0, "SERVING")


@pytest.mark.realtime
def test_the_command_itself_in_a_process(service):
    svc = service()
    ok = subprocess.run([sys.executable, "-m", "supervisor_service.cli", "health", "--addr", svc.addresses.grpc],
                        capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    # The address from SUPERVISOR_GRPC_ADDR, a wildcard host asked on the loopback (the image's setting).
    port = svc.addresses.grpc.rpartition(":")[2]
    env = {"SUPERVISOR_GRPC_ADDR": f"0.0.0.0:{port}", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "supervisor_service.cli", "health"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr


# ---------------------------------------------------------------- every other answer


@pytest.mark.parametrize("status, shown", [
    (health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING"),
    (health_pb2.HealthCheckResponse.UNKNOWN, "UNKNOWN"),
    (health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, "SERVICE_UNKNOWN"),
])
def test_anything_but_serving_exits_1(health_server, capsys, status, shown):
    addr, servicer = health_server
    servicer.set(SERVICE_NAME, status)
    assert _health(capsys, "--addr", addr)[:2] == (EXIT_NOT_SERVING, shown)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert _health(capsys, "--addr", addr)[:2] == (0, "SERVING")


def test_a_name_the_server_does_not_know_is_not_serving(health_server, capsys):
    addr, servicer = health_server
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    code, out, err = _health(capsys, "--addr", addr, "--service", "no.such.Service")
    assert (code, out) == (EXIT_NOT_SERVING, "SERVICE_UNKNOWN")
    assert "'no.such.Service'" in err and "--service" in err, err


def test_a_grpc_server_without_health_is_unreachable(capsys):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code, out, err = _health(capsys, "--addr", f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "no grpc.health.v1 service" in err, err


def _tcp_server(reply: bytes | None):
    """A TCP port that accepts and then sends `reply` and closes, or (None) says nothing and holds on."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if reply is None:
                held.append(conn)
            else:
                try:
                    conn.recv(4096)
                    conn.sendall(reply)
                finally:
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()

    return f"127.0.0.1:{listener.getsockname()[1]}", close


def test_a_port_that_does_not_speak_grpc_is_unreachable(capsys):
    addr, close = _tcp_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        started = time.monotonic()
        code, out, err = _health(capsys, "--addr", addr, "--timeout", "5")
        elapsed = time.monotonic() - started
    finally:
        close()
    assert (code, out) == (EXIT_UNAVAILABLE, "") and "cannot check the health" in err, err
    assert elapsed < 5.5


def test_a_port_that_accepts_and_never_answers_ends_at_the_timeout(capsys):
    addr, close = _tcp_server(None)
    try:
        started = time.monotonic()
        code, out, err = _health(capsys, "--addr", addr, "--timeout", "0.5")
        elapsed = time.monotonic() - started
    finally:
        close()
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "no answer within 0.5 s (--timeout)" in err, err
    assert elapsed < 5


def test_the_metrics_port_is_not_the_grpc_port(service, capsys):
    svc = service(metrics_addr="127.0.0.1:0")
    code, _, err = _health(capsys, "--addr", svc.addresses.metrics, "--timeout", "5")
    assert code == EXIT_UNAVAILABLE, err


# ---------------------------------------------------------------- bad flags


@pytest.mark.parametrize("addr", ["", "nohost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "[::1:50051",
                                  "a b:1", "127.0.0.1:50051\n"])
def test_a_bad_address_is_a_usage_error(capsys, addr):
    code, out, err = _health(capsys, "--addr", addr)
    assert code == EXIT_USAGE and out == ""
    assert err.startswith("supervisor-service: error: --addr:"), err


def test_a_bad_address_from_the_environment_is_named_as_such(capsys, monkeypatch):
    monkeypatch.setenv("SUPERVISOR_GRPC_ADDR", "nonsense")
    code, out, err = _health(capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("supervisor-service: error: SUPERVISOR_GRPC_ADDR (no --addr given):"), err


@pytest.mark.parametrize("token", ["a\nb", "tok en", "\u00e9t\u00e9", "a\x00"])
def test_a_token_no_header_can_carry_is_a_usage_error(capsys, token):
    code, out, err = _health(capsys, "--addr", f"127.0.0.1:{free_port()}", "--token", token)
    assert (code, out) == (EXIT_USAGE, "") and err.startswith("supervisor-service: error: --token:"), err


def test_a_long_service_name_is_not_echoed_whole(health_server, capsys):
    addr, _ = health_server
    code, out, err = _health(capsys, "--addr", addr, "--service", "x" * 100_000)
    assert (code, out) == (EXIT_NOT_SERVING, "SERVICE_UNKNOWN") and len(err) < 500, len(err)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "x", "1e9"])
def test_a_bad_timeout_is_a_usage_error(timeout):
    with pytest.raises(SystemExit) as exc:
        main(["health", "--addr", f"127.0.0.1:{free_port()}", "--timeout", timeout])
    assert exc.value.code == EXIT_USAGE


def test_a_wildcard_address_is_asked_on_the_loopback(service, capsys):
    svc = service(grpc_addr="0.0.0.0:0")
    port = svc.addresses.grpc.rpartition(":")[2]
    assert _health(capsys, "--addr", f"0.0.0.0:{port}")[:2] == (0, "SERVING")
