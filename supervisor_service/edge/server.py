"""The gRPC edge: RegionSupervisor servicer, validation, health, reflection, auth.

Handlers convert protobuf to domain values, validate, enqueue and convert the
answer back. They never touch the detector table: what needs the table
travels through the event queue with a reply future. Errors leave through
`context.abort(code, details)` with a message an operator can act on; every
request is parsed inside its handler, so one that does not parse is
INVALID_ARGUMENT. A heartbeat is evidence that its datanode is alive: one that
cannot be trusted or applied is answered `rejected=true` with a reason, one
with a bad secondary field is applied with that field ignored and the reason
saying so (DESIGN.md section 12), and the stream goes on either way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import Settings, check_host_port, short_repr
from supervisor_service.cluster import Leadership
from supervisor_service.core import (
    Clock,
    Deregister,
    DetectingRegion,
    Dump,
    DumpSnapshot,
    Event,
    Heartbeat,
    MaintenanceSet,
    Register,
    ReleaseHold,
    Reset,
    SetMaintenance,
    Supervisor,
    as_region_array,
    log_event,
)
from supervisor_service.edge.dumpcodec import encode_rows
from supervisor_service.proto import LEADER_METADATA_KEY, MAX_MAINTENANCE_TTL_MS, pb, pb_grpc
from supervisor_service.remotes import DryRunJournal, PeerDirectory, peer_to_pb
from supervisor_service.runtime import EventQueue, QueueClosed, Queued
from supervisor_service.store import FencedOut, StateStore, StoreError, StoreGone

log = logging.getLogger("supervisor_service.server")

_SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
SERVICE_NAME = _SERVICE.full_name
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
_HEALTH_NAME = _HEALTH.full_name
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
DEFAULT_DUMP_PAGE = 1000
DEFAULT_JOURNAL_LIMIT = 100
# Calls answered only once their change is committed: while the store is failing they are told so.
_DURABLE_EVENTS = (Register, Deregister, Reset, SetMaintenance)
_STORE_FAILING_GRACE_S = 0.5  # a store failing this long makes waiting writes answer UNAVAILABLE
_STORE_POLL_S = 0.1
_LOADING = "this replica is becoming leader and loading its state; retry shortly"
_NOT_COMMITTED_HINT = "the change may not have been committed: retry (Register, Deregister and Reset are idempotent)"

# A peer_addr is a DNS name (253 characters) or a bracketed IPv6 address with a zone, then a colon
# and a port: 300 characters hold any of them, an internationalized name in its own script too.
MAX_PEER_ADDR_CHARS = 300
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
PROBLEM_LOG_INTERVAL_S = 10.0  # one log line per problem (reason) per interval; the rest are counted

# Problems of a heartbeat, by the reason counted in supervisor_heartbeat_problems_total. A rejected
# heartbeat is untrustworthy or cannot be applied; for the others the liveness is applied and the
# field is ignored (or the timestamp replaced by the receipt time), and the answer says so.
REJECTING_PROBLEMS = ("undecodable", "wrong_datanode", "stale_epoch")
IGNORED_PROBLEMS = (
    "peer_addr_invalid", "peer_addr_too_long", "too_many_regions",
    "timestamp_missing", "timestamp_ahead", "timestamp_behind", "epoch_new_life",
)

_SHUTTING_DOWN = "the supervisor is shutting down; heartbeat to another replica"


class Overloaded(Exception):
    pass


class _ProblemLog:
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


class _Stream:
    """One SendHeartbeat stream: its datanode once accepted, its last request (raw and parsed, with
    what is wrong with its fields), the answer's serialized fields that rarely change, the message
    being answered, and its last queued heartbeat (a newer one supersedes it while it waits)."""

    __slots__ = (
        "owner", "raw", "request", "datanode_id", "n", "peer_addr", "node_epoch", "timestamp_millis",
        "regions", "last_ids", "last_regions", "answer_key", "answer_head", "received", "leader",
        "problems", "addr", "checked_addr", "known_only", "queued",
    )

    def __init__(self) -> None:
        self.owner: int | None = None
        self.raw: bytes | None = None
        self.datanode_id = 0
        self.n = 0
        self.regions: np.ndarray | None = None  # of `raw`, once validated
        self.last_ids = b""  # the region ids of the last request whose array was built...
        self.last_regions: np.ndarray | None = None  # ...and that array
        self.answer_key: tuple | None = None
        self.answer_head = b""
        self.received = 0
        self.leader = False
        self.problems: tuple[tuple[str, str], ...] = ()  # (reason, text) for the fields of `raw`
        self.addr = ""  # the address `raw` gives, normalized; "" when it gives none or a bad one
        self.checked_addr = ("", "")  # the last peer_addr found valid on this stream, and its normal form
        self.known_only = False  # more regions than one heartbeat may add: refresh the known ones only
        self.queued: Queued | None = None

    def regions_of(self, region_ids, cache: bool = True) -> np.ndarray:
        """The request's region ids as a sorted unique array. A datanode names the same regions
        in heartbeat after heartbeat (whatever else changes, as the client clock's timestamp):
        those reuse the array built last time, after a byte compare."""
        raw = np.asarray(region_ids, dtype=np.uint64)
        key = raw.tobytes()
        if key != self.last_ids or self.last_regions is None:
            regions = as_region_array(raw)
            regions.flags.writeable = False  # shared by the events of later heartbeats
            if not cache:
                return regions
            self.last_ids, self.last_regions = key, regions
        return self.last_regions

    def parse(self, raw: bytes) -> None:
        request = pb.HeartbeatRequest.FromString(raw)
        self.raw, self.request, self.regions = raw, request, None
        self.datanode_id = request.datanode_id
        self.n = len(request.region_ids)
        self.peer_addr = request.peer_addr
        self.node_epoch = request.node_epoch
        self.timestamp_millis = request.timestamp_millis


class RegionSupervisorServicer(pb_grpc.RegionSupervisorServicer):
    def __init__(
        self,
        *,
        settings: Settings,
        queue: EventQueue,
        supervisor: Supervisor,
        clock: Clock,
        metrics: Metrics,
        directory: PeerDirectory,
        journal: DryRunJournal | None,
        leadership: Leadership,
        store: StateStore | None = None,
    ) -> None:
        self._s = settings
        self._queue = queue
        self._supervisor = supervisor  # read only: published attributes (maintenance, leader)
        self._clock = clock
        self._metrics = metrics
        self._directory = directory
        self._journal = journal
        self._leadership = leadership
        self._store = store
        self._streams = 0
        self._stream_tasks: set[asyncio.Task] = set()  # open SendHeartbeat handlers, ended by close_streams
        self._closing = False
        # Hot-path cache: labelled counter children per heartbeat outcome. (A validated peer_addr is
        # remembered per stream, so what is kept is bounded by the streams and MAX_PEER_ADDR_CHARS.)
        self._outcomes: dict[str, tuple] = {}
        self._time_ms: int | None = None  # the server_time_millis of the last accepted answer...
        self._time_bytes = b""  # ...serialized
        self._log_problem = _ProblemLog(clock)
        for reason in (*REJECTING_PROBLEMS, *IGNORED_PROBLEMS):  # every reason is exported, at 0 until seen
            metrics.heartbeat_problems.labels(reason=reason)

    def _outcome_counters(self, outcome: str) -> tuple:
        """(messages, regions) counter children of `outcome`: `labels()` costs microseconds per call."""
        counters = self._outcomes.get(outcome)
        if counters is None:
            counters = self._outcomes[outcome] = (
                self._metrics.heartbeats.labels(outcome=outcome),
                self._metrics.heartbeat_regions.labels(outcome=outcome),
            )
        return counters

    # ------------------------------------------------------------ queue access

    async def _enqueue(self, event: Event) -> None:
        """Enqueue without blocking the event loop; waits for room up to enqueue_timeout_ms."""
        await self._when_room(event, lambda: self._queue.offer(event))

    async def _when_room(self, event: Event, offer: Callable[[], object]) -> object:
        """`offer()` until it gives something truthy (returned), for up to enqueue_timeout_ms; then
        Overloaded, saying which bound of the queue refused `event`."""
        if result := offer():
            return result
        # A real wait, on the event loop's clock (an injected test clock does not move by itself).
        now = asyncio.get_running_loop().time
        deadline = now() + self._s.enqueue_timeout_ms / 1000
        delay = 0.001
        while now() < deadline:
            await asyncio.sleep(delay)
            if result := offer():
                return result
            delay = min(delay * 2, 0.05)
        why = self._queue.refusal(event) or "queue_full"
        self._metrics.events_rejected.labels(type=type(event).__name__, reason=why).inc()
        waited = f"for {self._s.enqueue_timeout_ms} ms"
        if why == "datanode_share":
            raise Overloaded(
                f"this datanode's queued heartbeats hold their share of the supervisor's event queue {waited} "
                "(setting max_queue_fraction_per_datanode): send them less often or with fewer regions"
            )
        if why == "queue_bytes":
            raise Overloaded(
                f"the supervisor's event queue holds {self._queue.max_heartbeat_bytes} bytes of heartbeats "
                f"{waited} (setting max_queued_heartbeat_bytes); retry with backoff"
            )
        raise Overloaded(
            f"the supervisor's event queue is full ({self._queue.capacity} events) {waited}; retry with backoff"
        )

    async def _ask(self, context: grpc.aio.ServicerContext, make: Callable[[Future], Event]) -> object:
        """Enqueue an event with a reply future and wait for the supervisor thread's answer.

        A call whose answer waits for the state store is answered UNAVAILABLE as soon as the
        store has been failing for `_STORE_FAILING_GRACE_S` (the writer keeps retrying the change
        in the background: it may still be committed), not after the 30 s bound."""
        reply: Future = Future()
        event = make(reply)
        try:
            await self._enqueue(event)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except QueueClosed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the supervisor is shutting down")
        waiter = asyncio.wrap_future(reply)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even after we gave up
        store = self._store if isinstance(event, _DURABLE_EVENTS) else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not waiter.done():
            left = deadline - loop.time()
            if left <= 0:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the supervisor thread did not answer within 30 s")
            await asyncio.wait((waiter,), timeout=min(left, _STORE_POLL_S) if store is not None else left)
            if store is not None and not waiter.done() and (error := store.unavailable(_STORE_FAILING_GRACE_S)):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {error}; {_NOT_COMMITTED_HINT}")
        try:
            return waiter.result()
        except QueueClosed as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry against a healthy replica")
        except FencedOut as exc:
            if not exc.definite:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            leader = self._leadership.leader_addr()
            if leader:
                context.set_trailing_metadata(((LEADER_METADATA_KEY, leader),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreGone as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not committed: {exc}")
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {exc}; {_NOT_COMMITTED_HINT}")

    async def _invalid(self, context: grpc.aio.ServicerContext, method: str, reason: str, details: str) -> None:
        """INVALID_ARGUMENT, counted under (method, reason)."""
        self._metrics.requests_invalid.labels(method=method, reason=reason).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    async def undecodable(self, context: grpc.aio.ServicerContext, method: str, type_name: str, exc: Exception) -> None:
        """A request that does not parse: INVALID_ARGUMENT, counted, one log line per method per interval."""
        error = str(exc)[:160]  # the parser's words, never the input
        self._log_problem(("undecodable", method), logging.WARNING, "request_undecodable",
                          method=method, message_type=type_name, error=error)
        await self._invalid(context, method, "undecodable", f"not a valid {type_name}: {error}")

    # ------------------------------------------------------------ heartbeats

    async def SendHeartbeat(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """The heartbeat stream, registered bytes in and bytes out (`build_server`): serialized
        HeartbeatRequests are read and serialized HeartbeatResponses written, so that a datanode
        sending the same bytes as last time is not parsed again and its answer is mostly cached."""
        if self._streams >= self._s.max_concurrent_streams:
            self._metrics.heartbeats.labels(outcome="rejected_stream_limit").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many heartbeat streams ({self._s.max_concurrent_streams}, "
                "setting max_concurrent_streams); one stream per datanode",
            )
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        self._streams += 1
        self._metrics.heartbeat_streams.inc()
        task = asyncio.current_task()
        self._stream_tasks.add(task)
        stream = _Stream()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            # context.read()/write() rather than iterating the requests and yielding the answers:
            # the same stream, with about a tenth less event-loop time per message (make bench).
            while (raw := await read()) is not eof:
                answer = self._heartbeat(raw, stream)
                if answer.__class__ is not bytes:
                    answer = await self._heartbeat_when_room(answer, stream)
                await write(answer)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # close_streams: end the stream with a status (a cancelled handler alone leaves the
            # call open until the server's grace runs out).
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        finally:
            self._stream_tasks.discard(task)
            self._streams -= 1
            self._metrics.heartbeat_streams.dec()

    def close_streams(self) -> None:
        """End every open heartbeat stream now, with UNAVAILABLE, and refuse new ones: they never end
        by themselves, so a shutdown would otherwise wait its whole grace period for them. Call on
        the server's event loop, before `server.stop(grace)` (which then waits for unary calls only)."""
        self._closing = True
        for task in list(self._stream_tasks):
            task.cancel()

    def _heartbeat(self, raw: bytes, stream: _Stream) -> bytes | tuple[Heartbeat, tuple]:
        """The serialized answer to one serialized heartbeat, or (its event, its problems) when the
        queue has no room for it (`_heartbeat_when_room` then waits for room). Runs to the end
        without awaiting: a coroutine per message costs more than the rest of the accepted path.

        Only what makes the heartbeat untrustworthy (another datanode's id on the stream, an earlier
        life's epoch) or impossible to apply (it does not parse, this replica does not lead) rejects
        it. A problem with another field is in `problems`: the liveness is applied, the field
        ignored, and the answer's reason says so (DESIGN.md section 12)."""
        # Stamp at receipt, before any queueing (the server clock is the default).
        received = stream.received = self._clock.now_ms()
        received_monotonic = self._clock.monotonic()
        if raw != stream.raw:
            # Identical bytes parse to an identical message (the server stamps its own time,
            # so a datanode's heartbeats are usually byte for byte the same).
            try:
                self._parse(raw, stream)
            except DecodeError as exc:
                stream.raw = None
                stream.datanode_id, stream.n = stream.owner or 0, 0
                return self._answer(
                    stream, f"not a valid HeartbeatRequest: {str(exc)[:160]}", "rejected_invalid", "undecodable"
                )
        datanode_id, owner = stream.datanode_id, stream.owner
        leader = stream.leader = self._leadership.is_leader()
        if owner is not None and datanode_id != owner:
            return self._answer(
                stream,
                f"this stream belongs to datanode {owner}; open one stream per datanode",
                "rejected_invalid",
                "wrong_datanode",
            )
        if not leader:
            where = self._leadership.leader_addr()
            return self._answer(
                stream,
                f"not the leader; send heartbeats to {where}" if where
                else "not the leader, and no leader is known right now; try another replica",
                "rejected_not_leader",
            )
        if not self._supervisor.is_leader:
            return self._answer(stream, "becoming leader: loading the state; retry shortly", "rejected_not_ready")
        problems = stream.problems
        ts = received
        if self._s.heartbeat_clock == "client":
            ts = stream.timestamp_millis
            skew = self._s.max_client_clock_skew_ms
            if ts <= 0 or (skew and not received - skew <= ts <= received + skew):
                problems += (self._timestamp_problem(ts, received, skew),)
                ts = received
        epoch = stream.node_epoch
        if epoch and self._s.reject_stale_epochs:
            silence = self._directory.epoch_silence(datanode_id, epoch)
            if silence is not None:
                newest, window = self._directory.epoch(datanode_id), self._directory.new_life_after_ms
                if silence <= window:
                    return self._answer(
                        stream,
                        f"node_epoch {epoch} is older than {newest}, the newest seen for this datanode: a heartbeat "
                        f"from an earlier life of the datanode (a lower epoch is taken as a new life once the "
                        f"newest has been silent for {window:g} ms)",
                        "rejected_stale_epoch",
                        "stale_epoch",
                    )
                problems += (("epoch_new_life", (
                    f"node_epoch {epoch} is lower than {newest}, which has been silent for {silence} ms (longer "
                    "than acceptable_heartbeat_pause_ms): taken as a new life of the datanode")),)
        regions = stream.regions
        if regions is None:
            regions = stream.regions_of(stream.request.region_ids, cache=not stream.known_only)
            stream.request = None  # not needed again: a thousand streams' worth of messages is MiBs
            if stream.known_only:
                stream.raw = None  # too big to keep for the next compare: the next message is parsed again
            else:
                stream.regions = regions
        event = Heartbeat(datanode_id, regions, ts, received_monotonic, stream.known_only)
        try:
            entry = self._queue.offer_heartbeat(event, stream.queued)
        except QueueClosed:
            return self._answer(stream, "the supervisor is shutting down", "rejected_shutdown")
        if entry is None:
            return event, problems
        return self._accepted(stream, entry, regions.size, problems)

    def _parse(self, raw: bytes, stream: _Stream) -> None:
        """Parse a message that differs from the stream's last, and find what is wrong with its
        secondary fields: those problems hold for every message with the same bytes."""
        stream.parse(raw)
        problems = []
        limit = self._s.max_regions_per_heartbeat
        stream.known_only = stream.n > limit
        if stream.known_only:
            problems.append(("too_many_regions", (
                f"{stream.n} regions in one heartbeat, above the limit of {limit} (setting "
                "max_regions_per_heartbeat): the regions already watched among them were refreshed, none was added")))
        addr = stream.peer_addr
        stream.addr = ""
        if addr:
            checked_in, checked = stream.checked_addr
            if addr == checked_in:
                stream.addr = checked
            elif len(addr) > MAX_PEER_ADDR_CHARS:
                stream.raw = None  # not kept for the next compare: it can be megabytes
                problems.append(("peer_addr_too_long", (
                    f"peer_addr ignored: too long ({len(addr)} characters, at most {MAX_PEER_ADDR_CHARS}); "
                    "the last valid address is kept")))
            else:
                normal = addr.strip(" ")  # a space around it is harmless (a config file); a newline is not
                try:
                    check_host_port(normal, allow_empty=False, allow_port_zero=False)
                except ValueError as exc:
                    problems.append(("peer_addr_invalid", f"peer_addr ignored: {exc}; the last valid address is kept"))
                else:
                    stream.addr = normal
                    stream.checked_addr = (addr, normal)
        stream.problems = tuple(problems)

    @staticmethod
    def _timestamp_problem(ts: int, received: int, skew: int) -> tuple[str, str]:
        then = "applied at the server's receipt time"
        if ts <= 0:
            return "timestamp_missing", (
                f"timestamp_millis {ts} is not a time (setting heartbeat_clock=client): {then}")
        ahead = ts > received
        return ("timestamp_ahead" if ahead else "timestamp_behind"), (
            f"timestamp_millis is {abs(ts - received)} ms {'ahead of' if ahead else 'behind'} the server's clock, "
            f"beyond max_client_clock_skew_ms={skew}: {then}")

    async def _heartbeat_when_room(self, pending: tuple[Heartbeat, tuple], stream: _Stream) -> bytes:
        event, problems = pending
        try:
            entry = await self._when_room(event, lambda: self._queue.offer_heartbeat(event, stream.queued))
        except Overloaded as exc:
            return self._answer(stream, str(exc), "rejected_overloaded")
        except QueueClosed:
            return self._answer(stream, "the supervisor is shutting down", "rejected_shutdown")
        return self._accepted(stream, entry, event.region_ids.size, problems)

    def _accepted(self, stream: _Stream, entry: Queued, accepted: int, problems: tuple) -> bytes:
        """The answer to a queued heartbeat: the stream's cached serialized fields 1-4 (they change
        only with the accepted count or the leadership), then server_time_millis, the last field
        set, cached for the current millisecond: together the bytes SerializeToString gives.
        With problems, the answer is built whole, with their texts as the reason."""
        datanode_id, n = stream.datanode_id, stream.n
        if entry is stream.queued:
            self._metrics.heartbeats_coalesced.inc()
        stream.queued = entry
        self._directory.observe(datanode_id, stream.addr, stream.node_epoch)
        stream.owner = datanode_id
        if problems:
            return self._warned(stream, 0 if stream.known_only else accepted, problems)
        messages, regions_counter = self._outcome_counters("accepted")
        messages.inc()
        regions_counter.inc(n)
        key = (datanode_id, accepted, stream.leader, self._leadership.leader_addr())
        if key != stream.answer_key:
            stream.answer_key = key
            stream.answer_head = pb.HeartbeatResponse(
                datanode_id=datanode_id, accepted_regions=key[1], is_leader=key[2], leader_addr=key[3]
            ).SerializeToString()
        received = stream.received
        if received != self._time_ms:
            self._time_ms = received
            self._time_bytes = pb.HeartbeatResponse(server_time_millis=received).SerializeToString()
        return stream.answer_head + self._time_bytes

    def _warned(self, stream: _Stream, accepted: int, problems: tuple) -> bytes:
        """An applied heartbeat with fields ignored: counted, logged (rate limited), said in the reason."""
        messages, regions_counter = self._outcome_counters("accepted_with_warning")
        messages.inc()
        regions_counter.inc(stream.n)
        for reason, text in problems:
            self._metrics.heartbeat_problems.labels(reason=reason).inc()
            self._log_problem(reason, logging.WARNING, "heartbeat_field_ignored",
                              reason=reason, datanode_id=stream.datanode_id, detail=text)
        return pb.HeartbeatResponse(
            datanode_id=stream.datanode_id,
            accepted_regions=accepted,
            is_leader=stream.leader,
            leader_addr=self._leadership.leader_addr(),
            server_time_millis=stream.received,
            reason="; ".join(text for _, text in problems),
        ).SerializeToString()

    def _answer(self, stream: _Stream, reason: str, outcome: str, problem: str | None = None) -> bytes:
        """A rejection, counted under `outcome` (and `problem`, when the input is at fault) and logged,
        rate limited per reason."""
        messages, regions_counter = self._outcome_counters(outcome)
        messages.inc()
        regions_counter.inc(stream.n)
        if problem is not None:
            self._metrics.heartbeat_problems.labels(reason=problem).inc()
        operational = outcome in ("rejected_not_leader", "rejected_not_ready", "rejected_shutdown")
        self._log_problem(problem or outcome, logging.INFO if operational else logging.WARNING, "heartbeat_rejected",
                          reason=problem or outcome, datanode_id=stream.datanode_id, detail=reason)
        return pb.HeartbeatResponse(
            datanode_id=stream.datanode_id,
            accepted_regions=0,
            is_leader=stream.leader,
            leader_addr=self._leadership.leader_addr(),
            server_time_millis=stream.received,
            rejected=True,
            reason=reason,
        ).SerializeToString()

    # ------------------------------------------------------------ registry

    async def _pairs(self, context: grpc.aio.ServicerContext, regions, method: str) -> tuple[DetectingRegion, ...]:
        if len(regions) > self._s.max_regions_per_request:
            await self._invalid(
                context, method, "too_many",
                f"{len(regions)} regions in one request; the limit is {self._s.max_regions_per_request} "
                "(setting max_regions_per_request): split the request",
            )
        await self._require_leader(context)
        # Duplicates within a request are folded; order does not matter.
        return tuple(sorted({(r.datanode_id, r.region_id) for r in regions}))

    async def _not_loading(self, context: grpc.aio.ServicerContext) -> None:
        """Elected, but the state is still loading: nothing the supervisor holds can be read or
        changed yet (its maintenance switches and table are those of before the recovery)."""
        if self._leadership.is_leader() and not self._supervisor.is_leader:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _LOADING)

    async def _require_leader(self, context: grpc.aio.ServicerContext) -> None:
        if not self._leadership.is_leader():
            leader = self._leadership.leader_addr()
            if leader:
                context.set_trailing_metadata(((LEADER_METADATA_KEY, leader),))
            where = f"the leader is {leader}" if leader else "no leader is known right now; retry shortly"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this replica is not the leader; {where}")
        await self._not_loading(context)  # a write now would be lost to the recovery

    async def RegisterDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions, "RegisterDetectors")
        affected = await self._ask(context, lambda reply: Register(pairs, reply))
        return pb.RegisterDetectorsResponse(affected=affected)

    async def DeregisterDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions, "DeregisterDetectors")
        affected = await self._ask(context, lambda reply: Deregister(pairs, reply))
        return pb.DeregisterDetectorsResponse(affected=affected)

    async def ResetDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions, "ResetDetectors")
        affected = await self._ask(context, lambda reply: Reset(pairs, reply))
        return pb.ResetDetectorsResponse(affected=affected)

    # ------------------------------------------------------------ dump

    async def Dump(self, request: pb.DumpRequest, context) -> AsyncIterator[pb.DumpResponse]:
        if request.at_millis < 0:
            await self._invalid(context, "Dump", "out_of_range", f"at_millis must be >= 0, got {request.at_millis}")
        if request.page_size > self._s.max_dump_page_size:
            await self._invalid(
                context, "Dump", "out_of_range",
                f"page_size {request.page_size} is above the limit {self._s.max_dump_page_size} "
                "(setting max_dump_page_size)",
            )
        if len(request.datanode_ids) > self._s.max_regions_per_request:
            await self._invalid(
                context, "Dump", "too_many",
                f"{len(request.datanode_ids)} datanode_ids in one request; the limit is "
                f"{self._s.max_regions_per_request} (setting max_regions_per_request)",
            )
        await self._not_loading(context)
        page_size = request.page_size or min(DEFAULT_DUMP_PAGE, self._s.max_dump_page_size)
        datanodes = frozenset(request.datanode_ids) if request.datanode_ids else None
        snapshot: DumpSnapshot = await self._ask(context, lambda reply: Dump(reply, datanodes))
        at = request.at_millis or snapshot.taken_at_ms
        loop = asyncio.get_running_loop()
        # Building rows is CPU work: do it off the event loop, page by page, so heartbeat
        # streams keep flowing and memory holds one page at a time.
        dump = await loop.run_in_executor(None, DumpPages, snapshot, at, request.only_failed)
        header = dict(
            is_leader=snapshot.is_leader,
            maintenance_mode=snapshot.maintenance,
            at_millis=at,
            total=dump.total,
            leader_addr=self._leadership.leader_addr(),
            holds=list(snapshot.holds),
        )
        if not dump.total:
            yield pb.DumpResponse(**header)
            return
        for build in dump.pages(page_size, header):
            yield await loop.run_in_executor(None, build)

    # ------------------------------------------------------------ maintenance and journal

    async def SetMaintenanceMode(self, request, context):
        await self._require_leader(context)
        if len(request.datanode_ids) > self._s.max_regions_per_request:
            await self._invalid(
                context, "SetMaintenanceMode", "too_many",
                f"{len(request.datanode_ids)} datanode_ids in one request; the limit is "
                f"{self._s.max_regions_per_request} (setting max_regions_per_request)",
            )
        if request.ttl_millis and not request.enabled:
            await self._invalid(context, "SetMaintenanceMode", "out_of_range", "ttl_millis only applies when enabling")
        if request.ttl_millis > MAX_MAINTENANCE_TTL_MS:
            await self._invalid(
                context, "SetMaintenanceMode", "out_of_range",
                f"ttl_millis {request.ttl_millis} is above the limit {MAX_MAINTENANCE_TTL_MS} (100 years); "
                "0 means no expiry",
            )
        event = lambda reply: SetMaintenance(  # noqa: E731
            request.enabled, reply, tuple(sorted(set(request.datanode_ids))), int(request.ttl_millis)
        )
        state: MaintenanceSet = await self._ask(context, event)
        return self._maintenance_response(state.enabled, state.until_ms, dict(state.datanodes), True)

    async def GetMaintenanceMode(self, request, context):
        await self._not_loading(context)
        leader = self._leadership.is_leader()
        sup = self._supervisor
        enabled, until, datanodes = sup.maintenance, sup.maintenance_until_ms, dict(sup.datanode_maintenance)
        if not leader and self._store is not None:
            # A follower holds no state of its own: read the switches from the store.
            try:
                loop = asyncio.get_running_loop()
                enabled, until, datanodes = await loop.run_in_executor(None, self._store.read_maintenance)
            except StoreError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the state store: {exc}")
            except (ValueError, KeyError, TypeError) as exc:
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"the stored maintenance state cannot be read: {short_repr(str(exc))}"
                )
        return self._maintenance_response(enabled, until, datanodes, leader)

    def _maintenance_response(
        self, enabled: bool, until: int, datanodes: dict[int, int], leader: bool
    ) -> pb.MaintenanceModeResponse:
        """The answer, whatever the stored state holds: an expiry past int64 (written by a version that
        took any ttl_millis) is shown as the int64 maximum, a datanode id past uint64 is left out; both
        are logged (once per interval), so that such a state never makes the answer fail."""
        shown = min(max(until, _INT64_MIN), _INT64_MAX)
        rows, dropped = [], []
        for d, u in sorted(datanodes.items()):
            if 0 <= d <= _UINT64_MAX:
                rows.append(pb.DatanodeMaintenance(datanode_id=d, expires_at_millis=min(max(u, _INT64_MIN), _INT64_MAX)))
            else:
                dropped.append(d)
        if shown != until or dropped or any(not _INT64_MIN <= u <= _INT64_MAX for u in datanodes.values()):
            self._log_problem("maintenance_state_out_of_range", logging.WARNING, "maintenance_state_out_of_range",
                              expires_at_millis=short_repr(str(until)), datanode_ids_dropped=short_repr(str(dropped)),
                              hint="switch maintenance off and on to store a clean state")
        return pb.MaintenanceModeResponse(
            enabled=enabled,
            is_leader=leader,
            leader_addr=self._leadership.leader_addr(),
            expires_at_millis=shown,
            datanodes=rows,
        )

    async def GetFailoverHolds(self, request, context):
        await self._not_loading(context)
        guards = self._supervisor.guards
        return pb.FailoverHoldsResponse(
            holds=list(guards.active_holds) if guards is not None else [],
            failed_datanode_fraction=guards.mass_failure_fraction if guards is not None else 0.0,
            is_leader=self._leadership.is_leader(),
        )

    async def ReleaseFailoverHold(self, request, context):
        await self._require_leader(context)
        if self._supervisor.guards is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "guards are off (setting guards_enabled): nothing to release"
            )
        released = await self._ask(context, lambda reply: ReleaseHold(reply))
        guards = self._supervisor.guards
        return pb.FailoverHoldsResponse(
            holds=list(guards.active_holds),
            failed_datanode_fraction=guards.mass_failure_fraction,
            released=bool(released),
            is_leader=True,
        )

    async def ListJournal(self, request, context):
        if self._journal is None:
            return pb.ListJournalResponse(embedded=False)
        limit = request.limit or DEFAULT_JOURNAL_LIMIT
        entries = [
            pb.JournalEntry(
                at_millis=e.at_millis,
                region_ids=e.region_ids,
                from_peer=peer_to_pb(e.from_peer),
                to_peer=peer_to_pb(e.to_peer),
                timeout_millis=e.timeout_ms,
                trigger_reason=pb.TRIGGER_REASON_FAILOVER,
                procedure_id=e.procedure_id,
                leader_term=e.leader_term,
            )
            for e in self._journal.entries(limit)
        ]
        return pb.ListJournalResponse(entries=entries, embedded=True)


class DumpPages:
    """Turns a snapshot into DetectorState pages lazily, so a dump of a million detectors
    never holds a million protobuf rows at once. phi is evaluated per shared history group,
    and a page is encoded with numpy from a few serialized pieces per group
    (`supervisor_service.dumpcodec`), not one Python message per row."""

    def __init__(self, snapshot: DumpSnapshot, at: int, only_failed: bool) -> None:
        self._snapshot = snapshot
        self._at = at
        threshold = snapshot.threshold
        # Failover counts per datanode as sorted region ids and their counts; migrating regions sorted.
        by_node: dict[int, dict[int, int]] = {}
        for (datanode_id, region_id), count in snapshot.failover_counts.items():
            if count:
                by_node.setdefault(datanode_id, {})[region_id] = count
        self._counts = {
            d: (np.array(sorted(c), dtype=np.uint64), [c[r] for r in sorted(c)]) for d, c in by_node.items()
        }
        self._migrating = np.array(sorted(snapshot.migrating), dtype=np.uint64)
        # (node, phi of each group, mask of the rows to show) per datanode.
        self._nodes = []
        self.total = 0
        for node in snapshot.nodes:
            phis = {gid: grp.phi(at) for gid, grp in node.groups.items()}
            if only_failed:
                failed = [gid for gid, phi in phis.items() if phi >= threshold]
                positions = np.flatnonzero(np.isin(node.gids, failed))
            else:
                positions = np.arange(node.regions.size)
            if positions.size:
                self._nodes.append((node, phis, positions))
                self.total += int(positions.size)

    def pages(self, page_size: int, header: dict | None = None):
        """Yields callables that each build one DumpResponse of `page_size` rows (the last may be
        shorter) carrying the `header` fields; run them off the event loop."""
        head = pb.DumpResponse(**(header or {})).SerializeToString()
        pending: list[tuple] = []
        room = page_size
        for node, phis, positions in self._nodes:
            start = 0
            while start < positions.size:
                chunk = positions[start : start + room]
                pending.append((node, phis, chunk))
                start += chunk.size
                room -= chunk.size
                if room == 0:
                    yield lambda parts=pending: self._page(head, parts)
                    pending, room = [], page_size
        if pending:
            yield lambda parts=pending: self._page(head, parts)

    def _page(self, head: bytes, parts: list[tuple]) -> pb.DumpResponse:
        # Serialized messages concatenate into their merge: the header fields, then the rows.
        return pb.DumpResponse.FromString(head + b"".join(self._encoded(*part) for part in parts))

    def _encoded(self, node, phis: dict[int, float], positions: np.ndarray) -> bytes:
        """The rows at `positions` of one datanode, as serialized `DumpResponse.detectors` entries."""
        threshold, regions, gids = self._snapshot.threshold, node.regions[positions], node.gids[positions]
        if len(node.groups) == 1:
            present, index = [next(iter(node.groups))], np.zeros(regions.size, dtype=np.int64)
        else:
            present, index = np.unique(gids, return_inverse=True)
            present = present.tolist()
        group_bytes = []
        for gid in present:
            grp, phi = node.groups[gid], phis[gid]
            group_bytes.append(pb.DetectorState(
                last_heartbeat_millis=grp.last, phi=phi, available=phi < threshold, sample_count=grp.samples,
                mean_interval_millis=grp.observed_mean, std_deviation_millis=grp.observed_std,
            ).SerializeToString())
        counts: dict[int, int] = {}
        counted = self._counts.get(node.datanode_id)
        if counted is not None:
            keys, values = counted
            at = np.minimum(np.searchsorted(keys, regions), keys.size - 1)
            for i in np.flatnonzero(keys[at] == regions).tolist():
                counts[i] = values[int(at[i])]
        migrating = set()
        if self._migrating.size:
            migrating = set(np.flatnonzero(np.isin(regions, self._migrating)).tolist())
        extras = {
            i: pb.DetectorState(failover_count=counts.get(i, 0), migrating=i in migrating).SerializeToString()
            for i in sorted(counts.keys() | migrating)
        }
        prefix = pb.DetectorState(datanode_id=node.datanode_id).SerializeToString()
        return encode_rows(prefix, regions, index, group_bytes, extras)

    def _rows(self, node, phis: dict[int, float], positions: np.ndarray) -> list[pb.DetectorState]:
        """The same rows one message at a time: the reference `_encoded` is tested against."""
        snapshot = self._snapshot
        threshold, counts, migrating = snapshot.threshold, snapshot.failover_counts, snapshot.migrating
        rows = []
        for region_id, gid in zip(node.regions[positions].tolist(), node.gids[positions].tolist()):
            phi = phis[gid]
            grp = node.groups[gid]
            rows.append(
                pb.DetectorState(
                    datanode_id=node.datanode_id,
                    region_id=region_id,
                    last_heartbeat_millis=grp.last,
                    phi=phi,
                    available=phi < threshold,
                    sample_count=grp.samples,
                    mean_interval_millis=grp.observed_mean,
                    std_deviation_millis=grp.observed_std,
                    failover_count=counts.get((node.datanode_id, region_id), 0),
                    migrating=region_id in migrating,
                )
            )
        return rows


async def _abort_unauthenticated(context) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong token: send metadata 'authorization: Bearer <token>' (setting auth_token)",
    )


async def _deny_unary(request, context):
    await _abort_unauthenticated(context)


async def _deny_streaming(request_or_iterator, context):
    await _abort_unauthenticated(context)
    yield  # pragma: no cover - makes this an async generator


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks (probes carry no token)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler is None or method.startswith(f"/{_HEALTH_NAME}/") or metadata.get("authorization") == self._expected:
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_streaming)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny_streaming)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny_unary)
        return grpc.unary_unary_rpc_method_handler(_deny_unary)


class _HandlerCapture:
    """Stands in for the server to a generated `add_*Servicer_to_server`: keeps its method handlers."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers come again below, by method name

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        if service != self.service:
            raise ValueError(f"unexpected service {service!r}")
        self.handlers.update(handlers)


class _HealthServicer(health.aio.HealthServicer):
    """grpc_health's asyncio servicer, with List: it inherits the generated one, which raises
    NotImplementedError (a traceback in the log per call)."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        )


def _bytes_in(
    handler: grpc.RpcMethodHandler, method: str, type_name: str, undecodable: Callable
) -> grpc.RpcMethodHandler:
    """`handler` registered bytes in: each request is parsed inside, so a message that does not
    parse is answered INVALID_ARGUMENT by `undecodable` (grpc would answer UNKNOWN and log a
    traceback per message from its own deserializer)."""
    parse, serialize = handler.request_deserializer, handler.response_serializer

    async def request_of(raw: bytes, context):
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a parser raises on garbage
            await undecodable(context, method, type_name, exc)

    def requests_of(raws, context):
        async def requests():
            async for raw in raws:
                yield await request_of(raw, context)

        return requests()

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(raw: bytes, context):
            return await behavior(await request_of(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        async def stream_in(raws, context):
            return await behavior(requests_of(raws, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_in, response_serializer=serialize)
    streaming_in = handler.stream_stream is not None
    behavior = handler.stream_stream if streaming_in else handler.unary_stream

    async def request_arg(raw, context):
        return requests_of(raw, context) if streaming_in else await request_of(raw, context)

    if inspect.isasyncgenfunction(behavior):
        async def streaming(raw, context):
            async for response in behavior(await request_arg(raw, context), context):
                yield response
    else:  # writes its answers with context.write
        async def streaming(raw, context):
            return await behavior(await request_arg(raw, context), context)

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(streaming, response_serializer=serialize)


def _register(server: grpc.aio.Server, service, handlers: dict[str, grpc.RpcMethodHandler], undecodable) -> None:
    """Register `handlers` of `service` (a descriptor), each that parses its requests bytes in."""
    wrapped = {
        name: handler if handler.request_deserializer is None
        else _bytes_in(handler, name, service.methods_by_name[name].input_type.name, undecodable)
        for name, handler in handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, wrapped),))
    server.add_registered_method_handlers(service.full_name, wrapped)


def build_server(servicer: RegionSupervisorServicer, settings: Settings) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server: one event loop serves every stream (thousands of datanodes)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams + 100),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # grpc sets SO_REUSEPORT by default on Linux: a second supervisor on the same port would
        # start and share the clients with the first. Without it the second fails to bind.
        ("grpc.so_reuseport", 0),
    ]
    interceptors = [_AuthInterceptor(settings.auth_token)] if settings.auth_token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    # The generated handlers, bytes in; SendHeartbeat takes and returns serialized messages.
    generated = _HandlerCapture(SERVICE_NAME)
    pb_grpc.add_RegionSupervisorServicer_to_server(servicer, generated)
    handlers = {**generated.handlers, "SendHeartbeat": grpc.stream_stream_rpc_method_handler(servicer.SendHeartbeat)}
    _register(server, _SERVICE, handlers, servicer.undecodable)
    health_servicer = _HealthServicer()
    generated = _HandlerCapture(_HEALTH_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generated)
    _register(server, _HEALTH, generated.handlers, servicer.undecodable)
    generated = _HandlerCapture(reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME)), generated
    )
    _register(server, _REFLECTION, generated.handlers, servicer.undecodable)
    return server, health_servicer


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    log_event(log, logging.INFO, "health_changed", serving=serving)
