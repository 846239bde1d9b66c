"""The threads around the core: the event queue, the supervisor (consumer) thread, the effect runner, the ticker."""

from supervisor_service.runtime.consumer import (
    Consumer,
    SupervisorRuntime,
)
from supervisor_service.runtime.effects import (
    AMBIGUOUS_CODES,
    EffectRunner,
    not_durable,
    submit_error_kind,
)
from supervisor_service.runtime.queue import (
    HEARTBEAT_OVERHEAD_BYTES,
    EventQueue,
    QueueClosed,
    Queued,
    QueueFull,
)
from supervisor_service.runtime.ticker import (
    Ticker,
)

__all__ = [
    "AMBIGUOUS_CODES",
    "Consumer",
    "EffectRunner",
    "EventQueue",
    "HEARTBEAT_OVERHEAD_BYTES",
    "QueueClosed",
    "QueueFull",
    "Queued",
    "SupervisorRuntime",
    "Ticker",
    "not_durable",
    "submit_error_kind",
]
