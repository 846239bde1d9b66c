"""When a service is ready for a test: a free port to give it, and one readiness wait.

`wait_ready(addr, ...)` polls the service over the wire, as an orchestrator
would: grpc.health.v1 says SERVING for the RegionSupervisor service and,
when `leader=True`, the service answers GetMaintenanceMode as the leader
(which it does only once it has loaded its state: a leader still loading
answers UNAVAILABLE). Both the in-process `service` fixture and
`ServiceProcess` use it.

The service is named in the health check: grpc's HealthServicer reports the
whole server ("") SERVING from the moment the gRPC server starts, before the
service has taken its leadership and set its health; the service's own name
is unknown (NOT_FOUND) until then.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from supervisor_service.proto import pb, pb_grpc
from supervisor_service.security.tls import ClientTLS
from supervisor_service.security.tls import channel as tls_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name
# A service that is still starting refuses connections: retry soon, not after gRPC's default
# reconnect backoff (1 s growing to 120 s), so that readiness is seen when it happens.
_FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def serving(channel: grpc.Channel, timeout: float = 1.0) -> bool:
    """grpc.health.v1 Check of the RegionSupervisor service says SERVING."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
    except grpc.RpcError:
        return False
    return response.status == SERVING


def leading(channel: grpc.Channel, token: str = "", timeout: float = 1.0) -> bool:
    """The replica answers reads as the leader with its state loaded."""
    try:
        response = pb_grpc.RegionSupervisorStub(channel).GetMaintenanceMode(
            pb.GetMaintenanceModeRequest(), timeout=timeout, metadata=_metadata(token))
    except grpc.RpcError:
        return False  # not up yet, or UNAVAILABLE while the leader loads its state
    return response.is_leader


def says_it_leads(addr: str, timeout: float = 1.0) -> bool:
    """The replica at `addr`, asked itself (no leader hint followed), says it leads; False if it cannot answer."""
    with grpc.insecure_channel(addr) as channel:
        return leading(channel, timeout=timeout)


def wait_ready(
    addr: str,
    timeout: float,
    *,
    leader: bool = False,
    token: str = "",
    gone: Callable[[], str] | None = None,
    tls: ClientTLS | None = None,
) -> None:
    """Wait until the service at `addr` is SERVING (and leads with its state loaded, if `leader`).

    `gone()` returns why the service can no longer become ready ("" while it
    can): a child process that exited fails the wait at once, with its log. `tls`: how to reach
    a TLS port.
    """
    deadline = time.monotonic() + timeout
    want = "SERVING and leading" if leader else "SERVING"
    with tls_channel(addr, tls, _FAST_RECONNECT) as channel:
        while True:
            if gone is not None and (why := gone()):
                raise AssertionError(f"service at {addr} is gone before it was {want}: {why}")
            if serving(channel) and (not leader or leading(channel, token)):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"service at {addr} not {want} within {timeout} s")
            time.sleep(0.02)
