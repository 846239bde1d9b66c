"""The SendHeartbeat stream: the hot path from a serialized HeartbeatRequest to a queued
Heartbeat event and a serialized answer, the checks of the heartbeat's fields, and the reasons a
heartbeat is rejected or a field ignored.

A heartbeat is evidence that its datanode is alive: one that cannot be trusted or applied is
answered `rejected=true` with a reason, one with a bad secondary field is applied with that field
ignored and the reason saying so (docs/design.md §12), and the stream goes on either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import Settings, check_host_port
from supervisor_service.cluster import Leadership
from supervisor_service.core import Clock, CoreStatus, Heartbeat, as_region_array
from supervisor_service.edge.auth import NO_CALLERS, Caller, Callers, current_caller
from supervisor_service.edge.enqueue import Overloaded, when_room
from supervisor_service.edge.problems import ProblemLog
from supervisor_service.edge.wire import restamped, scan_heartbeat
from supervisor_service.proto import pb
from supervisor_service.remotes import PeerDirectory
from supervisor_service.runtime import EventQueue, QueueClosed, Queued

# A peer_addr is a DNS name (253 characters) or a bracketed IPv6 address with a zone, then a colon
# and a port: 300 characters hold any of them, an internationalized name in its own script too.
MAX_PEER_ADDR_CHARS = 300

# Problems of a heartbeat, by the reason counted in supervisor_heartbeat_problems_total. A rejected
# heartbeat is untrustworthy or cannot be applied; for the others the liveness is applied and the
# field is ignored (or the timestamp replaced by the receipt time), and the answer says so.
REJECTING_PROBLEMS = ("undecodable", "wrong_datanode", "stale_epoch", "not_own_datanode")
IGNORED_PROBLEMS = (
    "peer_addr_invalid", "peer_addr_too_long", "too_many_regions",
    "timestamp_missing", "timestamp_ahead", "timestamp_behind", "epoch_new_life",
)

_SHUTTING_DOWN = "the supervisor is shutting down; heartbeat to another replica"

# The supervisor thread is woken for queued heartbeats at most once per interval: the first after a
# quiet interval at once, later ones at its end. Waking a thread costs the waker a futex wake and the
# GIL a hand-off; under a flood the old way (a wake per message while the thread waited) made 500 to
# 1,900 wakes a second for batches of 2 to 7 heartbeats, this about 70 for batches of 40 to 70. Kept
# short because a heartbeat waiting for a deferred wake holds back the ones of a burst behind it,
# and a stream's next heartbeat then supersedes more of them (and a superseded one is an interval
# less in its detectors' history).
WAKE_INTERVAL_S = 0.001


class _Stream:
    """One SendHeartbeat stream: its datanode once accepted, its last request (raw and parsed, with
    what is wrong with its fields), the answer's serialized fields that rarely change, the message
    being answered, and its last queued heartbeat (a newer one supersedes it while it waits)."""

    __slots__ = (
        "owner", "raw", "request", "datanode_id", "n", "peer_addr", "node_epoch", "timestamp_millis",
        "regions", "last_ids", "last_regions", "answer_key", "answer_head", "received", "leader",
        "problems", "addr", "checked_addr", "known_only", "queued", "stamp", "unwoken", "bound", "identity", "peer",
        "caller",
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
        self.stamp: tuple[int, int] | None = None  # where `raw` has its timestamp field (wire.restamped)
        self.unwoken = -1  # `queued` waits for this deferred wake of the supervisor thread (HeartbeatStreams._wakes)
        self.bound: int | None = None  # the one datanode the caller may heartbeat as (edge/auth.py); None: any
        self.caller: Caller | None = None
        self.identity = ""  # the caller's, and its address: for the audit of a refused heartbeat
        self.peer = ""

    def bind(self, caller: Caller | None, context: grpc.aio.ServicerContext) -> None:
        """The caller the interceptor checked once for the stream (edge/auth.py): the datanode it may
        heartbeat as (only that id is compared per message), and who it is, for a refusal's audit."""
        if caller is not None:
            self.caller, self.bound, self.identity = caller, caller.datanode_id, caller.identity
            self.peer = context.peer() or ""

    def not_own(self, callers: Callers) -> str:
        """Why this message, for another datanode than the caller's, is rejected; the refusal is audited."""
        why = (f"{self.identity!r} may heartbeat as datanode {self.bound} only, not as datanode "
               f"{self.datanode_id} (policy bind_datanode_ids)")
        callers.refused(self.identity, self.peer, "SendHeartbeat", "PERMISSION_DENIED", why)
        return why

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
        self.stamp = None
        if request.timestamp_millis:
            # Where the stamp is, so that the next messages (the same but for it) need no parse.
            scan = scan_heartbeat(raw)
            if scan is not None:
                self.stamp = scan.stamp

    def restamp(self, raw: bytes) -> bool:
        """True when `raw` is the last message with another timestamp_millis (now taken): the rest
        of the last parse holds for it."""
        last, stamp = self.raw, self.stamp
        if stamp is None or last is None:
            return False
        found = restamped(raw, last, stamp)
        if found is None:
            return False
        self.timestamp_millis, end = found
        self.raw, self.stamp = raw, (stamp[0], end)
        return True


class HeartbeatStreams:
    """Every open SendHeartbeat stream of this server: the limit on their number, their end at
    shutdown (`close_streams`), and the answer to each message. Runs on the server's event loop only."""

    callers: Callers = NO_CALLERS  # the caller checks (edge/auth.py): refusals audited, open streams checked again

    def __init__(
        self,
        *,
        settings: Settings,
        queue: EventQueue,
        status: Callable[[], CoreStatus],
        clock: Clock,
        metrics: Metrics,
        directory: PeerDirectory,
        leadership: Leadership,
        log_problem: ProblemLog,
    ) -> None:
        self._s = settings
        self._queue = queue
        self._status = status  # the core's last published status (docs/design.md §10)
        self._clock = clock
        self._metrics = metrics
        self._directory = directory
        self._leadership = leadership
        self._log_problem = log_problem
        self._streams = 0
        self._stream_tasks: set[asyncio.Task] = set()  # open SendHeartbeat handlers, ended by close_streams
        self._closing = False
        # Hot-path cache: labelled counter children per heartbeat outcome. (A validated peer_addr is
        # remembered per stream, so what is kept is bounded by the streams and MAX_PEER_ADDR_CHARS.)
        self._outcomes: dict[str, tuple] = {}
        self._time_ms: int | None = None  # the server_time_millis of the last accepted answer...
        self._time_bytes = b""  # ...serialized
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_due = False  # a wake of the supervisor thread is scheduled...
        self._next_wake = 0.0  # ...or may be made at once from this loop time on
        self._wakes = 0  # deferred wakes made so far
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
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        self._stream_tasks.add(task)
        stream = _Stream()
        stream.bind(current_caller(), context)
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            # context.read()/write() rather than iterating the requests and yielding the answers:
            # the same stream, with about a tenth less event-loop time per message (make bench).
            while (raw := await read()) is not eof:
                if stream.caller is not None and stream.caller.revision != self.callers.revision():
                    stream.bind(await self.callers.recheck(stream.caller, context), context)
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
        ignored, and the answer's reason says so (docs/design.md §12)."""
        # Stamp at receipt, before any queueing (the server clock is the default).
        received = stream.received = self._clock.now_ms()
        received_monotonic = self._clock.monotonic()
        if raw != stream.raw and not stream.restamp(raw):
            # Identical bytes parse to an identical message, and the same bytes but for the
            # timestamp to the same message with another timestamp (a datanode's heartbeats are
            # usually one or the other): only the others are parsed.
            try:
                _parse(raw, stream, self._s.max_regions_per_heartbeat)
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
        if stream.bound is not None and datanode_id != stream.bound:
            return self._answer(stream, stream.not_own(self.callers), "rejected_not_own_datanode", "not_own_datanode")
        if not leader:
            where = self._leadership.leader_addr()
            return self._answer(
                stream,
                f"not the leader; send heartbeats to {where}" if where
                else "not the leader, and no leader is known right now; try another replica",
                "rejected_not_leader",
            )
        if not self._status().is_leader:
            return self._answer(stream, "becoming leader: loading the state; retry shortly", "rejected_not_ready")
        problems = stream.problems
        ts = received
        if self._s.heartbeat_clock == "client":
            ts = stream.timestamp_millis
            skew = self._s.max_client_clock_skew_ms
            if ts <= 0 or (skew and not received - skew <= ts <= received + skew):
                problems += (_timestamp_problem(ts, received, skew),)
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
        previous = stream.queued
        if self._wake_due and stream.unwoken == self._wakes:
            # The stream's last heartbeat waits only for the wake deferred for it: superseded now,
            # it would be lost as an interval that an immediate wake would have applied.
            previous = None
        try:
            entry = self._queue.offer_heartbeat(event, previous, wake=False)
        except QueueClosed:
            return self._answer(stream, "the supervisor is shutting down", "rejected_shutdown")
        if entry is None:
            # Its liveness waits (and may be dropped): the overload guard holds convictions meanwhile.
            if self._queue.refusals.note(self._queue.refusal(event)):
                self._metrics.heartbeat_queue_refusals.inc()
            return event, problems
        if self._queue.consumer_waiting:  # a busy supervisor thread takes what is queued without a wake
            if not self._wake_due:
                self._wake_soon()
            if self._wake_due:
                stream.unwoken = self._wakes
        return self._accepted(stream, entry, regions.size, problems)

    def _wake_soon(self) -> None:
        """Wake the supervisor thread for the heartbeats queued (`offer_heartbeat(wake=False)`): at
        once when it was last woken an interval ago or more (a lone heartbeat waits no longer than
        before), else once at the end of that interval, for all those queued meanwhile."""
        now = self._loop.time()
        if now >= self._next_wake:
            self._next_wake = now + WAKE_INTERVAL_S
            self._queue.wake()
        else:
            self._wake_due = True
            self._loop.call_at(self._next_wake, self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        self._wakes += 1
        self._next_wake = self._loop.time() + WAKE_INTERVAL_S
        self._queue.wake()

    async def _heartbeat_when_room(self, pending: tuple[Heartbeat, tuple], stream: _Stream) -> bytes:
        event, problems = pending
        try:
            entry = await when_room(
                self._queue, self._metrics, self._s.enqueue_timeout_ms, event,
                lambda: self._queue.offer_heartbeat(event, stream.queued),
            )
        except Overloaded as exc:
            if self._queue.refusals.note(exc.reason):  # dropped: held from now again
                self._metrics.heartbeat_queue_refusals.inc()
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


# ------------------------------------------------------------ field validation


def _parse(raw: bytes, stream: _Stream, limit: int) -> None:
    """Parse a message that differs from the stream's last, and find what is wrong with its
    secondary fields (`limit`: setting max_regions_per_heartbeat): those problems hold for every
    message with the same bytes."""
    stream.parse(raw)
    problems = []
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


def _timestamp_problem(ts: int, received: int, skew: int) -> tuple[str, str]:
    then = "applied at the server's receipt time"
    if ts <= 0:
        return "timestamp_missing", (
            f"timestamp_millis {ts} is not a time (setting heartbeat_clock=client): {then}")
    ahead = ts > received
    return ("timestamp_ahead" if ahead else "timestamp_behind"), (
        f"timestamp_millis is {abs(ts - received)} ms {'ahead of' if ahead else 'behind'} the server's clock, "
        f"beyond max_client_clock_skew_ms={skew}: {then}")
