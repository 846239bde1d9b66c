"""The in-process service harness: a real `Service` on its own asyncio loop, started and stopped for a test.

`ServiceFactory()(**settings)` builds a `supervisor_service.app.service.Service`
from settings (defaults: 127.0.0.1 on a free port, no metrics endpoint, an
in-memory store, a short shutdown budget), runs `start()` then `wait()` on
its own event loop in a daemon thread, and returns the `Service` once it is
ready (`readiness.wait_ready`: SERVING, and leading with its state loaded
unless `wait_leader=False`). `close()` stops every service it started, the
newest first. The `service` fixture of `tests/conftest.py` is one factory
per test.
"""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry

from supervisor_service.app.service import Service
from supervisor_service.app.settings import load_settings
from tests.support.readiness import wait_ready

SERVICE_DEFAULTS = dict(
    grpc_addr="127.0.0.1:0",
    metrics_addr="",
    store="memory",
    shutdown_timeout_ms=2000,
)


class ServiceThread:
    """`asyncio.run(start() + wait())` of one `Service` in a daemon thread."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name="test-service-loop", daemon=True)

    def _main(self) -> None:
        async def main() -> int:
            try:
                await self.service.start()
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                self._started.set()
            return await self.service.wait()

        try:
            self.exit_code = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()/stop()
            self.error = self.error or exc

    def start(self, timeout: float) -> None:
        """Returns once `Service.start()` has returned (the port is bound); raises what it raised."""
        self.thread.start()
        if not self._started.wait(timeout):
            raise AssertionError(f"service did not start within {timeout} s")
        if self.error is not None:
            raise self.error

    def gone(self) -> str:
        """Why the service cannot become ready any more ('' while it runs)."""
        if self.thread.is_alive():
            return ""
        return f"its loop ended (exit code {self.exit_code}, error {self.error!r})"

    def stop(self, timeout: float) -> None:
        if not self.thread.is_alive():
            return  # never started, or start() failed
        self.service.request_stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"service did not stop within {timeout} s")


class ServiceFactory:
    """`factory(tick_interval_ms=100, ..., remotes=..., kv=..., clock=...)` -> a started, ready `Service`
    (`client_tls`: the `ClientTLS` to check its readiness with, for a TLS port)."""

    def __init__(self) -> None:
        self.running: list[ServiceThread] = []

    def __call__(
        self, *, wait_leader: bool = True, start_timeout: float = 15.0, remotes=None, kv=None, clock=None,
        client_tls=None, **settings
    ) -> Service:
        svc = Service(
            load_settings(**{**SERVICE_DEFAULTS, **settings}),
            registry=CollectorRegistry(), remotes=remotes, kv=kv, clock=clock,
        )
        runner = ServiceThread(svc)
        self.running.append(runner)
        runner.start(start_timeout)
        # A single replica loads its state on a transition thread after start() returns: until then
        # it is SERVING but not leading (reads answer UNAVAILABLE).
        wait_ready(svc.addresses.grpc, start_timeout, leader=wait_leader, token=svc.settings.auth_token,
                   gone=runner.gone, tls=client_tls)
        return svc

    def close(self, timeout: float = 15.0) -> None:
        """Stop every service started, the newest first; raise the first failure to stop."""
        errors = []
        for runner in reversed(self.running):
            try:
                runner.stop(timeout)
            except AssertionError as exc:
                errors.append(exc)
        self.running.clear()
        if errors:
            raise errors[0]
