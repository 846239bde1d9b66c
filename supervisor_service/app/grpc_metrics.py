"""gRPC server metrics in go-grpc-prometheus's names and labels (docs/design.md §14), so that the usual
gRPC alerts and dashboards work unchanged.

Counters are `_LoopCounter`s: every RPC of the grpc.aio server runs on its one event loop, so the
counts of a heartbeat stream's messages are additions to plain numbers (no lock per message). The
latency histogram is observed once per call, at its end: a prometheus_client `Histogram` is cheap
enough there.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from supervisor_service.app.metrics import _LoopCounter

# prometheus.DefBuckets (go-grpc-prometheus's default) with finer steps below 5 ms: most unary calls
# of this service answer in well under a millisecond.
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_TYPES = {  # (client_streaming, server_streaming) -> grpc_type, as go-grpc-prometheus names them
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class GrpcServerMetrics:
    """`grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds`,
    `grpc_server_msg_received_total` and `grpc_server_msg_sent_total`, by grpc_type, grpc_service and
    grpc_method. Only methods the server registers get series (see `edge/grpc_metrics.py`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = _LoopCounter("grpc_server_started", "Total number of RPCs started on the server.", _LABELS)
        self.handled = _LoopCounter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
        )
        self.msg_received = _LoopCounter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", _LABELS
        )
        self.msg_sent = _LoopCounter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", _LABELS
        )
        for counter in (self.started, self.handled, self.msg_received, self.msg_sent):
            registry.register(counter)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            _LABELS,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )

    def initialize(self, grpc_type: str, service: str, method: str) -> None:
        """Every series of one method at zero, as go-grpc-prometheus's `InitializeMetrics` does: a
        rate over a method never called is 0, not absent (handled: its OK series)."""
        labels = (grpc_type, service, method)
        for counter in (self.started, self.msg_received, self.msg_sent):
            counter.labels(*labels)
        self.handled.labels(*labels, "OK")
        self.handling_seconds.labels(*labels)
