"""Structured logging on the standard library: `log_event(log, "failover_submitted", datanode_id=3)`.

JSON lines when stderr is not a terminal (for log shippers), `event key=value` otherwise. Every
module of the core logs as `supervisor_service.supervisor`, the name it had before the core was
split (log filters and alerts match on it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence


def describe(exc: BaseException) -> str:
    """An exception in words for a log line or an answer: its message, or its type when it has none
    (a timeout or a cancelled call would otherwise log an empty error)."""
    return str(exc) or type(exc).__name__


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


def sample(regions: Sequence[int], limit: int = 5) -> str:
    """The first region ids, and how many there are in all, for a log line."""
    shown = ",".join(str(r) for r in regions[:limit])
    return shown + (f",... ({len(regions)} in all)" if len(regions) > limit else "")
