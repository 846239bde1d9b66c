"""Waiting on a positive signal instead of sleeping: `wait_for` a condition, `wait_ticks` for ticks handled.

A negative check ("nothing was submitted") that sleeps first passes just as
well when the supervisor is stuck. `wait_ticks` makes it wait until the
supervisor thread has really handled that many more ticks, read from the
`supervisor_events_total{type="Tick"}` counter it increments once per Tick
it handles (`runtime.SupervisorRuntime`), so the check fails loudly when
nothing is ticking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

EVENTS = "supervisor_events_total"


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = "") -> Any:
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


def handled(source: Any, event_type: str = "Tick") -> int:
    """How many events of `event_type` the supervisor thread has handled.

    `source` is an in-process `Service` (or anything with a `registry`), a
    `CollectorRegistry`, or a `tests.support.servers.ServiceProcess` (read
    from its /metrics endpoint).
    """
    registry = getattr(source, "registry", source)
    if hasattr(registry, "get_sample_value"):
        return int(registry.get_sample_value(EVENTS, {"type": event_type}) or 0)
    return source.handled(event_type)


def wait_ticks(sources: Any, n: int, timeout: float, *, message: str = "") -> None:
    """Wait until `sources` (one, or a list or tuple of them; see `handled`) have each handled `n` more
    ticks than now."""
    if n < 1:
        raise ValueError("wait for at least one tick")
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    goals = [handled(source) + n for source in sources]
    wait_for(lambda: all(handled(source) >= goal for source, goal in zip(sources, goals)), timeout, interval=0.02,
             message=message or f"the supervisor did not handle {n} ticks within {timeout} s: is it stuck?")
