"""`supervisor-service evaluate`: detection quality of the real supervisor, replayed on a simulated clock.

- `traces`: trace shapes (`TRACE_KINDS`), generation from a seed, CSV loading;
- `simulation`: one trace through the supervisor, the runtime's consumer and effect runner;
- `scoring`: the figures of Chen, Toueg and Aguilera per run and over runs, the checks;
- `report`: the markdown report and its plot;
- `sweep`: `evaluate`, every trace at every point of the sweep.
"""

from supervisor_service.evaluate.report import (
    Report,
    write_report,
)
from supervisor_service.evaluate.scoring import (
    RunResult,
)
from supervisor_service.evaluate.simulation import (
    Simulation,
    variant_of,
)
from supervisor_service.evaluate.sweep import (
    DEFAULT_PAUSES_MS,
    DEFAULT_THRESHOLDS,
    evaluate,
)
from supervisor_service.evaluate.traces import (
    NEVER,
    TRACE_KINDS,
    TraceConfig,
    TraceError,
    generate,
    inside,
    load_csv,
)

__all__ = [
    "DEFAULT_PAUSES_MS",
    "DEFAULT_THRESHOLDS",
    "NEVER",
    "Report",
    "RunResult",
    "Simulation",
    "TRACE_KINDS",
    "TraceConfig",
    "TraceError",
    "evaluate",
    "generate",
    "inside",
    "load_csv",
    "variant_of",
    "write_report",
]
