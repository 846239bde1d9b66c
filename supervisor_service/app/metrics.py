"""Prometheus metrics, registered on an injected registry.

Production passes `prometheus_client.REGISTRY`; each test builds its own
`CollectorRegistry()` and reads samples with `get_sample_value`.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from supervisor_service.core import AGE_BUCKETS_S, HOLD_REASONS, PHI_BUCKETS

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_APPLY_LATENCY_BUCKETS = (0.00025, 0.0005) + _LATENCY_BUCKETS


def cumulative_buckets(bounds: Iterable[float], counts: Iterable[int]) -> list[tuple[str, int]]:
    """(`le`, observations at or under it) for each upper bound, from the counts of each bucket alone."""
    cumulative, running = [], 0
    for bound, n in zip(bounds, counts):
        running += n
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return cumulative


class _SingleWriterHistogram(Collector):
    """A histogram observed by one thread only (the supervisor thread, once per heartbeat).

    `Histogram.observe` takes a lock and walks the buckets in Python, a few
    microseconds on the hottest path; this one is a bisect and two additions.
    A scrape copies the counts (under the GIL), so it may see an observation
    in the count a moment before it is in the sum; nothing is lost.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self):
        counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._doc)
        family.add_metric([], cumulative_buckets(self._bounds, counts), total)
        yield family


class _LoopCounterChild:
    """One labelled series of a `_LoopCounter`: a plain number, added to by one thread."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _LoopCounter(Collector):
    """A labelled counter incremented by one thread only (the gRPC server's event loop, once or
    twice per heartbeat message), exported exactly as a `Counter` is: `<name>_total` and
    `<name>_created` per label set, a label set appearing once `labels()` has named it.

    `Counter.inc` takes a lock, about a microsecond on every message; here an increment is an
    addition to a plain number, which only that thread writes. A scrape (another thread) reads
    each number whole under the GIL; the lock guards only the set of label sets, so that a scrape
    never iterates it while `labels()` adds one.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _LoopCounterChild] = {}

    def labels(self, *values: object, **by_name: object) -> _LoopCounterChild:
        """The child of a label set, as `Counter.labels` (positional or by name, not both)."""
        if values and by_name:
            raise ValueError("Can't pass both *args and **kwargs")
        if by_name:
            if sorted(by_name) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            values = tuple(by_name[n] for n in self._labelnames)
        elif len(values) != len(self._labelnames):
            raise ValueError("Incorrect label count")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, _LoopCounterChild())
        return child

    def describe(self):
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self):
        with self._lock:
            children = list(self._children.items())
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        created = prometheus_client.metrics._use_created  # prometheus_client.disable_created_metrics()
        for key, child in children:
            family.add_metric(key, float(child.value), created=child.created if created else None)
        yield family


class _PhiHistogram(Collector):
    """The distribution of current phi over all detectors, replaced wholesale at each tick.

    A normal Histogram only accumulates observations; this one reports the
    state of the table as of the last tick, weighted by detectors.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets = [0] * len(PHI_BUCKETS)
        self._count = 0
        self._sum = 0.0

    def set(self, buckets: list[int], count: int, total: float) -> None:
        with self._lock:
            self._buckets, self._count, self._sum = list(buckets), count, total

    def collect(self):
        with self._lock:
            buckets, total = list(self._buckets), self._sum
        family = HistogramMetricFamily(
            "supervisor_detector_phi",
            "Current phi of every detector as of the last tick (a snapshot, not a running total; past 100,000 history groups, as of the last sweep over several ticks).",
        )
        family.add_metric([], cumulative_buckets(PHI_BUCKETS, buckets), total)
        yield family


class HeartbeatAges(Collector):
    """The heartbeat age summary the supervisor thread publishes at each tick (`core.heartbeat_ages`):
    `supervisor_datanode_heartbeat_age_seconds`, a histogram over datanodes as of the last tick, and
    `supervisor_datanode_heartbeat_age_oldest_seconds{datanode_id}` for the oldest few (a datanode's
    series ends when it is no longer among them). Replaced wholesale, read by the scrape under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary: tuple[list[int], int, float, list[tuple[int, float]]] = ([0] * len(AGE_BUCKETS_S), 0, 0.0, [])

    def set(self, buckets: list[int], count: int, total: float, oldest: list[tuple[int, float]]) -> None:
        with self._lock:
            self._summary = (list(buckets), count, total, list(oldest))

    def collect(self):
        with self._lock:
            buckets, _, total, oldest = self._summary
        family = HistogramMetricFamily(
            "supervisor_datanode_heartbeat_age_seconds",
            "Age of each datanode's newest heartbeat as of the last tick, over the datanodes with detectors "
            "(a snapshot, not a running total).",
        )
        family.add_metric([], cumulative_buckets(AGE_BUCKETS_S, buckets), total)
        yield family
        gauge = GaugeMetricFamily(
            "supervisor_datanode_heartbeat_age_oldest_seconds",
            "Age of the newest heartbeat of the datanodes heard from longest ago, as of the last tick.",
            labels=("datanode_id",),
        )
        for datanode_id, age in oldest:
            gauge.add_metric([str(datanode_id)], age)
        yield gauge


# prometheus.DefBuckets (go-grpc-prometheus's default) with finer steps below 5 ms: most unary calls
# of this service answer in well under a millisecond.
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_TYPES = {  # (client_streaming, server_streaming) -> grpc_type, as go-grpc-prometheus names them
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class GrpcServerMetrics:
    """gRPC server metrics in go-grpc-prometheus's names and labels (docs/design.md §15), counted by
    `edge/grpc_metrics.py`. The counters are `_LoopCounter`s: every RPC of the grpc.aio server runs on
    its one event loop, so counting a heartbeat stream's messages is an addition to a plain number (no
    lock per message); the latency histogram is observed once per call, at its end.

    `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds`,
    `grpc_server_msg_received_total` and `grpc_server_msg_sent_total`, by grpc_type, grpc_service and
    grpc_method. Only methods the server registers get series (see `edge/grpc_metrics.py`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = _LoopCounter("grpc_server_started", "Total number of RPCs started on the server.", _GRPC_LABELS)
        self.handled = _LoopCounter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_GRPC_LABELS, "grpc_code"),
        )
        self.msg_received = _LoopCounter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", _GRPC_LABELS
        )
        self.msg_sent = _LoopCounter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", _GRPC_LABELS
        )
        for counter in (self.started, self.handled, self.msg_received, self.msg_sent):
            registry.register(counter)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            _GRPC_LABELS,
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


class Metrics:
    """Every metric the service exports. Names are listed in the README."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # Counted on the server's event loop, for every heartbeat message (see _LoopCounter).
        self.heartbeats = _LoopCounter(
            "supervisor_heartbeats", "Heartbeat messages received, by outcome.", ("outcome",)
        )
        r.register(self.heartbeats)
        self.heartbeat_regions = _LoopCounter(
            "supervisor_heartbeat_regions", "Region entries in heartbeat messages, by outcome.", ("outcome",)
        )
        r.register(self.heartbeat_regions)
        self.heartbeat_streams = Gauge(
            "supervisor_heartbeat_streams", "Open SendHeartbeat streams.", registry=r
        )
        self.heartbeat_problems = Counter(
            "supervisor_heartbeat_problems",
            "Problems found in heartbeat messages, by reason (a field ignored or clamped, or the message rejected).",
            ["reason"],
            registry=r,
        )
        self.heartbeats_coalesced = Counter(
            "supervisor_heartbeats_coalesced",
            "Heartbeats folded into an earlier one of their stream that was still queued.",
            registry=r,
        )
        self.requests_invalid = Counter(
            "supervisor_requests_invalid",
            "Requests answered INVALID_ARGUMENT, by method and reason (undecodable, out_of_range, too_many).",
            ["method", "reason"],
            registry=r,
        )
        self.detectors = Gauge("supervisor_detectors", "Detectors in the table.", registry=r)
        self.detector_groups = Gauge(
            "supervisor_detector_groups", "History groups in the table (regions of a datanode with identical detector state share one).", registry=r
        )
        self.events = Counter(
            "supervisor_events", "Events processed by the supervisor thread, by type.", ["type"], registry=r
        )
        self.events_rejected = Counter(
            "supervisor_events_rejected",
            "Events not admitted to the queue, by type and reason.",
            ["type", "reason"],
            registry=r,
        )
        self.heartbeat_queue_refusals = Counter(
            "supervisor_heartbeat_queue_refusals",
            "Times a heartbeat found no room in the event queue (when it starts to wait for room, and again "
            "when it is rejected after enqueue_timeout_ms), its datanode's own share excepted: each holds "
            "convictions for overload_hold_ms (hold reason overload).",
            registry=r,
        )
        self.queue_depth = Gauge("supervisor_event_queue_depth", "Events waiting in the queue.", registry=r)
        self.queue_capacity = Gauge(
            "supervisor_event_queue_capacity", "Events the queue holds at most (setting event_queue_size).", registry=r
        )
        self.queue_oldest_age = Gauge(
            "supervisor_event_queue_oldest_age_seconds", "Age of the oldest queued event.", registry=r
        )
        self.queue_heartbeat_bytes = Gauge(
            "supervisor_event_queue_heartbeat_bytes",
            "Bytes of queued heartbeats (their region ids), as bounded by max_queued_heartbeat_bytes.",
            registry=r,
        )
        self.tick_duration = Histogram(
            "supervisor_tick_duration_seconds",
            "Time the supervisor thread spends on one tick.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tick_lateness = Histogram(
            "supervisor_tick_lateness_seconds",
            "How late a tick is processed after it was due.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.heartbeat_apply_latency = _SingleWriterHistogram(
            "supervisor_heartbeat_apply_latency_seconds",
            "Time from a heartbeat's receipt at the gRPC edge to its application to the detector table.",
            _APPLY_LATENCY_BUCKETS,
        )
        r.register(self.heartbeat_apply_latency)
        self.ticks_skipped = Counter(
            "supervisor_ticks_skipped", "Ticks skipped because the previous one was still queued.", registry=r
        )
        self.phi = _PhiHistogram()
        r.register(self.phi)
        self.heartbeat_ages = HeartbeatAges()
        r.register(self.heartbeat_ages)
        self.failures_detected = Counter(
            "supervisor_region_failures_detected",
            "Detectors that crossed the phi threshold (counted once per crossing).",
            registry=r,
        )
        self.failover_regions = Counter(
            "supervisor_failover_regions",
            "Regions in failover submissions, by result category.",
            ["result"],
            registry=r,
        )
        self.failover_errors = Counter(
            "supervisor_failover_errors", "Failover attempts that failed, by stage.", ["stage"], registry=r
        )
        self.failover_skipped = Counter(
            "supervisor_failover_skipped_regions",
            "Failed regions not failed over on a tick, by reason.",
            ["reason"],
            registry=r,
        )
        self.drains = Gauge(
            "supervisor_drains", "Drains this leader knows (running and recently finished), by state.", ["state"],
            registry=r,
        )
        self.drain_regions = Gauge(
            "supervisor_drain_regions",
            "Regions of the running drains, by state (moved, in_flight, pending, failed, gone).",
            ["state"],
            registry=r,
        )
        self.inflight = Gauge(
            "supervisor_migrations_in_flight", "Regions submitted for migration and not finished.", registry=r
        )
        self.failover_history = Gauge(
            "supervisor_failover_history_records",
            "Failover decisions the history holds (bounded by failover_history_capacity).", registry=r,
        )
        self.submissions = Gauge(
            "supervisor_failover_submissions",
            "Failover submissions not ended, by state (intent, ambiguous, submitted, migrating).",
            ["state"],
            registry=r,
        )
        self.submit_retries = Counter(
            "supervisor_failover_submit_retries",
            "SubmitRegionMigration calls sent again (same target, same request_id) after an ambiguous failure.",
            registry=r,
        )
        self.migration_not_found = Counter(
            "supervisor_migration_not_found_regions",
            "Regions whose migration GetMigrationStatus reported NOT_FOUND (failed over again, backed off).",
            registry=r,
        )
        self.selector_invalid = Counter(
            "supervisor_selector_invalid_answers",
            "Selector answers refused, by reason (zero_id, address_too_long, no_address, conflicting_address, excluded_peer).",
            ["reason"],
            registry=r,
        )
        self.remote_latency = Histogram(
            "supervisor_remote_call_duration_seconds",
            "Latency of calls to remote services.",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.remote_errors = Counter(
            "supervisor_remote_call_errors",
            "Failed calls to remote services, by gRPC status code.",
            ["service", "method", "code"],
            registry=r,
        )
        self.maintenance = Gauge("supervisor_maintenance_mode", "1 while maintenance mode is on.", registry=r)
        self.maintenance_datanodes = Gauge(
            "supervisor_maintenance_datanodes", "Datanodes in per-datanode maintenance.", registry=r
        )
        self.failover_hold = Gauge(
            "supervisor_failover_hold",
            "1 while all failover is held, by reason (maintenance, warmup, local_pause, overload, mass_failure).",
            ["reason"],
            registry=r,
        )
        for reason in HOLD_REASONS:
            self.failover_hold.labels(reason=reason).set(0)
        self.failed_datanode_fraction = Gauge(
            "supervisor_failed_datanode_fraction",
            "Fraction of the datanodes that failed within the mass-failure window.",
            registry=r,
        )
        self.leader = Gauge("supervisor_is_leader", "1 while this replica is the leader.", registry=r)
        self.leader_term = Gauge(
            "supervisor_leader_term", "The term this replica leads under, or last led under.", registry=r
        )
        self.leadership_changes = Counter(
            "supervisor_leadership_changes",
            "Times this replica began (elected) or stopped (lost) leading, once its state was recovered.",
            ["change"],
            registry=r,
        )
        for change in ("elected", "lost"):
            self.leadership_changes.labels(change=change)
        self.thread_alive = Gauge(
            "supervisor_thread_alive", "1 while the supervisor thread is running.", registry=r
        )
        self.store_healthy = Gauge(
            "supervisor_store_healthy",
            "1 while the state store commits; 0 from a failed commit until the next one succeeds.",
            registry=r,
        )
        self.store_healthy.set(1)
        self.store_errors = Counter(
            "supervisor_store_errors",
            "State store failures, by reason (disk_full, read_only, io_error, busy, sqlite, etcd, postgres, gone, "
            "fenced, term_ended, shutdown, queue_full).",
            ["reason"],
            registry=r,
        )
        self.store_transactions = Counter(
            "supervisor_store_transactions", "Transactions the state store committed.", registry=r
        )
        self.store_batch_splits = Counter(
            "supervisor_store_batch_splits",
            "Writes too large for one backend transaction, committed in several.",
            registry=r,
        )
        self.store_commit_duration = Histogram(
            "supervisor_store_commit_duration_seconds",
            "Time of each state store transaction attempt, committed or failed.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_pending = Gauge(
            "supervisor_store_pending_writes",
            "Writes handed to the state store and neither committed nor answered with an error.",
            registry=r,
        )
        self.metrics_http_connections = Gauge(
            "supervisor_metrics_http_connections", "Open connections to the /metrics endpoint.", registry=r
        )
        self.metrics_http_errors = Counter(
            "supervisor_metrics_http_errors",
            "Connections to the /metrics endpoint refused or closed early, by reason "
            "(idle_evicted, over_limit, timeout, bad_request, tls_failed).",
            ["reason"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "supervisor_tls_reloads",
            "Server certificate files that changed on disk, by outcome: reloaded (new connections get them), "
            "rejected (they do not load; the certificate in force keeps serving).",
            ["outcome"],
            registry=r,
        )
        self.grpc_server = GrpcServerMetrics(r)

        # Identity, roles and the audit trail (docs/design.md §14).
        self.calls_refused = Counter(
            "supervisor_calls_refused",
            "Calls refused for their caller, by method and code (UNAUTHENTICATED, PERMISSION_DENIED; "
            "a heartbeat for another datanode counts as PERMISSION_DENIED of SendHeartbeat).",
            ["method", "code"],
            registry=r,
        )
        self.audit_entries = Counter(
            "supervisor_audit_entries",
            "Audit trail entries by result (written, failed; refusals coalesced into a later entry, or not "
            "recorded because this replica does not lead).",
            ["result"],
            registry=r,
        )
        self.security_file_reloads = Counter(
            "supervisor_security_file_reloads",
            "Re-reads of the tokens and policy files after a change, by file and result (ok, rejected: the "
            "last valid content stays in force).",
            ["file", "result"],
            registry=r,
        )

    def bind_queue(self, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.queue_oldest_age.set_function(oldest_age)

    def bind_store(self, pending: Callable[[], float]) -> None:
        self.store_pending.set_function(pending)
