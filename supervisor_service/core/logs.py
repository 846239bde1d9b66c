"""Structured logging on the standard library: `log_event(log, "failover_submitted", datanode_id=3)`.

JSON lines when stderr is not a terminal (for log shippers), `event key=value` otherwise.
"""

from __future__ import annotations

import logging

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def describe(exc: BaseException) -> str:
    """An exception in words for a log line or an answer: its message, or its type when it has none
    (a timeout or a cancelled call would otherwise log an empty error)."""
    return str(exc) or type(exc).__name__


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


