"""Bad input at the edge: log lines rate limited per problem, and INVALID_ARGUMENT answers
counted by method and reason (docs/design.md §12).

A flood of bad input costs one log line per problem per interval, not one per message; a
request that does not parse is answered INVALID_ARGUMENT inside its handler, never with
grpc's UNKNOWN and a traceback.
"""

from __future__ import annotations

import logging

import grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import Clock, log_event

# The edge's one logger, under the name operators and dashboards already filter on.
log = logging.getLogger("supervisor_service.server")

PROBLEM_LOG_INTERVAL_S = 10.0  # one log line per problem (reason) per interval; the rest are counted


class ProblemLog:
    """Log lines rate limited per key: the first in each interval is written, with how many were
    suppressed since the last one; a flood of bad input costs one line per interval, not one per message."""

    def __init__(self, clock: Clock, interval_s: float = PROBLEM_LOG_INTERVAL_S) -> None:
        self._clock = clock
        self._interval = interval_s
        self._next: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def __call__(self, key: object, level: int, event: str, **fields: object) -> None:
        now = self._clock.monotonic()
        if now < self._next.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self._interval
        log_event(log, level, event, **fields, suppressed=self._suppressed.pop(key, 0))


class InvalidRequests:
    """INVALID_ARGUMENT answers, counted in supervisor_requests_invalid_total{method,reason}."""

    def __init__(self, metrics: Metrics, log_problem: ProblemLog) -> None:
        self._metrics = metrics
        self._log_problem = log_problem

    async def invalid(self, context: grpc.aio.ServicerContext, method: str, reason: str, details: str) -> None:
        """INVALID_ARGUMENT, counted under (method, reason)."""
        self._metrics.requests_invalid.labels(method=method, reason=reason).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    async def undecodable(self, context: grpc.aio.ServicerContext, method: str, type_name: str, exc: Exception) -> None:
        """A request that does not parse: INVALID_ARGUMENT, counted, one log line per method per interval."""
        error = str(exc)[:160]  # the parser's words, never the input
        self._log_problem(("undecodable", method), logging.WARNING, "request_undecodable",
                          method=method, message_type=type_name, error=error)
        await self.invalid(context, method, "undecodable", f"not a valid {type_name}: {error}")
