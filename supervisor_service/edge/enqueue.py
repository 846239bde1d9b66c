"""Waiting for room in the event queue without blocking the event loop, and the refusal that
says which bound of the queue refused (docs/design.md §3). Shared by the heartbeat stream and
the admin calls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import Event
from supervisor_service.runtime import EventQueue


class Overloaded(Exception):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # queue_full, queue_bytes, datanode_share


async def when_room(
    queue: EventQueue, metrics: Metrics, timeout_ms: int, event: Event, offer: Callable[[], object]
) -> object:
    """`offer()` until it gives something truthy (returned), for up to `timeout_ms`
    (setting enqueue_timeout_ms); then Overloaded, saying which bound of the queue refused `event`."""
    if result := offer():
        return result
    # A real wait, on the event loop's clock (an injected test clock does not move by itself).
    now = asyncio.get_running_loop().time
    deadline = now() + timeout_ms / 1000
    delay = 0.001
    while now() < deadline:
        await asyncio.sleep(delay)
        if result := offer():
            return result
        delay = min(delay * 2, 0.05)
    why = queue.refusal(event) or "queue_full"
    metrics.events_rejected.labels(type=type(event).__name__, reason=why).inc()
    waited = f"for {timeout_ms} ms"
    if why == "datanode_share":
        raise Overloaded(
            f"this datanode's queued heartbeats hold their share of the supervisor's event queue {waited} "
            "(setting max_queue_fraction_per_datanode): send them less often or with fewer regions", why
        )
    if why == "queue_bytes":
        raise Overloaded(
            f"the supervisor's event queue holds {queue.max_heartbeat_bytes} bytes of heartbeats "
            f"{waited} (setting max_queued_heartbeat_bytes); retry with backoff", why
        )
    raise Overloaded(
        f"the supervisor's event queue is full ({queue.capacity} events) {waited}; retry with backoff", why
    )
