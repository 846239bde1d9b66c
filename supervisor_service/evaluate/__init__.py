"""`supervisor-service evaluate`: synthetic traces, the simulated replay, scoring, the detection-quality report."""

from supervisor_service.evaluate.simulation import (
    DEFAULT_PAUSES_MS,
    DEFAULT_THRESHOLDS,
    NEVER,
    TRACE_KINDS,
    RunResult,
    Simulation,
    TraceConfig,
    TraceError,
    _inside,
    evaluate,
    generate,
    load_csv,
    variant_of,
    write_report,
)

__all__ = [
    "DEFAULT_PAUSES_MS",
    "DEFAULT_THRESHOLDS",
    "NEVER",
    "RunResult",
    "Simulation",
    "TRACE_KINDS",
    "TraceConfig",
    "TraceError",
    "_inside",
    "evaluate",
    "generate",
    "load_csv",
    "variant_of",
    "write_report",
]
