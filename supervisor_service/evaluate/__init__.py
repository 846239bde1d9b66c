"""`supervisor-service evaluate`: synthetic traces, the simulated replay, scoring, the detection-quality report."""

from supervisor_service.evaluate.simulation import (
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
