"""The gRPC edge: RegionSupervisor servicer, validation, health, reflection, auth.

Handlers convert protobuf to domain values, validate, enqueue and convert the
answer back. They never touch the detector table: what needs the table
travels through the event queue with a reply future. Errors leave through
`context.abort(code, details)` with a message an operator can act on; a bad
heartbeat is answered with `rejected=true` and a reason, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from supervisor_service._log import log_event
from supervisor_service.clock import Clock
from supervisor_service.dumpcodec import encode_rows
from supervisor_service.events import (
    Deregister,
    DetectingRegion,
    Dump,
    Event,
    EventQueue,
    Heartbeat,
    QueueClosed,
    Register,
    ReleaseHold,
    Reset,
    SetMaintenance,
)
from supervisor_service.leadership import Leadership
from supervisor_service.metrics import Metrics
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.remotes import DryRunJournal, PeerDirectory, peer_to_pb
from supervisor_service.settings import Settings, check_host_port
from supervisor_service.store import MaintenanceSet, StateStore, StoreError
from supervisor_service.supervisor import DumpSnapshot, Supervisor
from supervisor_service.table import as_region_array

log = logging.getLogger("supervisor_service.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegionSupervisor"].full_name
_HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_DUMP_PAGE = 1000
LEADER_METADATA_KEY = "x-supervisor-leader"  # trailing metadata of a follower's FAILED_PRECONDITION
_VALID_PEER_ADDRS_KEPT = 100_000  # validated peer_addr values remembered (cleared when full)
DEFAULT_JOURNAL_LIMIT = 100
_SHUTTING_DOWN = "the supervisor is shutting down; heartbeat to another replica"


class Overloaded(Exception):
    pass


class _Stream:
    """One SendHeartbeat stream: its datanode once accepted, its last request (raw and parsed),
    the answer's serialized fields that rarely change, and the message being answered."""

    __slots__ = (
        "owner", "raw", "request", "datanode_id", "n", "peer_addr", "node_epoch", "timestamp_millis",
        "regions", "last_ids", "last_regions", "answer_key", "answer_head", "received", "leader",
    )

    def __init__(self) -> None:
        self.owner: int | None = None
        self.raw: bytes | None = None
        self.regions: np.ndarray | None = None  # of `raw`, once validated
        self.last_ids = b""  # the region ids of the last request whose array was built...
        self.last_regions: np.ndarray | None = None  # ...and that array
        self.answer_key: tuple | None = None
        self.answer_head = b""
        self.received = 0
        self.leader = False

    def regions_of(self, region_ids) -> np.ndarray:
        """The request's region ids as a sorted unique array. A datanode names the same regions
        in heartbeat after heartbeat (whatever else changes, as the client clock's timestamp):
        those reuse the array built last time, after a byte compare."""
        raw = np.asarray(region_ids, dtype=np.uint64)
        key = raw.tobytes()
        if key != self.last_ids or self.last_regions is None:
            regions = as_region_array(raw)
            regions.flags.writeable = False  # shared by the events of later heartbeats
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
        # Hot-path caches: labelled counter children per heartbeat outcome, and peer
        # addresses already validated (a datanode sends the same one every time).
        self._outcomes: dict[str, tuple] = {}
        self._valid_peer_addrs: set[str] = set()
        self._time_ms: int | None = None  # the server_time_millis of the last accepted answer...
        self._time_bytes = b""  # ...serialized

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
        if self._queue.offer(event):
            return
        deadline = self._clock.monotonic() + self._s.enqueue_timeout_ms / 1000
        delay = 0.001
        while self._clock.monotonic() < deadline:
            await asyncio.sleep(delay)
            if self._queue.offer(event):
                return
            delay = min(delay * 2, 0.05)
        self._metrics.events_rejected.labels(type=type(event).__name__, reason="queue_full").inc()
        raise Overloaded(
            f"the supervisor's event queue is full ({self._queue.capacity} events) for "
            f"{self._s.enqueue_timeout_ms} ms; retry with backoff"
        )

    async def _ask(self, context: grpc.aio.ServicerContext, make: Callable[[Future], Event]) -> object:
        """Enqueue an event with a reply future and wait for the supervisor thread's answer."""
        reply: Future = Future()
        try:
            await self._enqueue(make(reply))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except QueueClosed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the supervisor is shutting down")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(reply), timeout=30)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the supervisor thread did not answer within 30 s"
            )
        except QueueClosed as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry against a healthy replica")
        except StoreError as exc:
            # Not committed: the change may or may not survive, so the caller must retry.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the change could not be made durable: {exc}")

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

    def _heartbeat(self, raw: bytes, stream: _Stream) -> bytes | Heartbeat:
        """The serialized answer to one serialized heartbeat, or its event when the queue is full
        (`_heartbeat_when_room` then waits for room). Runs to the end without awaiting: a
        coroutine per message costs more than the rest of the accepted path."""
        # Stamp at receipt, before any queueing (the server clock is the default).
        received = stream.received = self._clock.now_ms()
        received_monotonic = self._clock.monotonic()
        if raw != stream.raw:
            # Identical bytes parse to an identical message (the server stamps its own time,
            # so a datanode's heartbeats are usually byte for byte the same).
            stream.parse(raw)
        datanode_id, n, owner = stream.datanode_id, stream.n, stream.owner
        leader = stream.leader = self._leadership.is_leader()
        if owner is not None and datanode_id != owner:
            return self._answer(
                stream,
                reason=f"this stream belongs to datanode {owner}; open one stream per datanode",
                outcome="rejected_invalid",
            )
        if not leader:
            return self._answer(
                stream,
                reason=f"not the leader; send heartbeats to {self._leadership.leader_addr()}",
                outcome="rejected_not_leader",
            )
        if not self._supervisor.is_leader:
            return self._answer(
                stream, reason="becoming leader: loading the state; retry shortly", outcome="rejected_not_ready"
            )
        if n > self._s.max_regions_per_heartbeat:
            return self._answer(
                stream,
                reason=f"{n} regions in one heartbeat; the limit is {self._s.max_regions_per_heartbeat} "
                "(setting max_regions_per_heartbeat)",
                outcome="rejected_invalid",
            )
        peer_addr = stream.peer_addr
        if peer_addr and peer_addr not in self._valid_peer_addrs:
            try:
                check_host_port(peer_addr, allow_empty=False, allow_port_zero=False)
            except ValueError as exc:
                return self._answer(stream, reason=f"peer_addr: {exc}", outcome="rejected_invalid")
            if len(self._valid_peer_addrs) >= _VALID_PEER_ADDRS_KEPT:
                self._valid_peer_addrs.clear()
            self._valid_peer_addrs.add(peer_addr)
        if self._s.heartbeat_clock == "client":
            if stream.timestamp_millis <= 0:
                return self._answer(
                    stream,
                    reason="timestamp_millis must be > 0 when the service uses the client clock "
                    "(setting heartbeat_clock=client)",
                    outcome="rejected_invalid",
                )
            ts = stream.timestamp_millis
        else:
            ts = received
        if self._s.reject_stale_epochs and not self._directory.epoch_current(datanode_id, stream.node_epoch):
            return self._answer(
                stream,
                reason=f"node_epoch {stream.node_epoch} is older than {self._directory.epoch(datanode_id)}, "
                "the newest seen for this datanode: a heartbeat from an earlier life of the datanode",
                outcome="rejected_stale_epoch",
            )
        regions = stream.regions
        if regions is None:
            regions = stream.regions = stream.regions_of(stream.request.region_ids)
            stream.request = None  # the parsed message is not needed again: a thousand streams' worth is MiBs
        event = Heartbeat(datanode_id, regions, ts, received_monotonic)
        try:
            if not self._queue.offer(event):
                return event
        except QueueClosed:
            return self._answer(stream, reason="the supervisor is shutting down", outcome="rejected_shutdown")
        return self._accepted(stream)

    async def _heartbeat_when_room(self, event: Heartbeat, stream: _Stream) -> bytes:
        try:
            await self._enqueue(event)
        except Overloaded as exc:
            return self._answer(stream, reason=str(exc), outcome="rejected_overloaded")
        except QueueClosed:
            return self._answer(stream, reason="the supervisor is shutting down", outcome="rejected_shutdown")
        return self._accepted(stream)

    def _accepted(self, stream: _Stream) -> bytes:
        """The answer to a queued heartbeat: the stream's cached serialized fields 1-4 (they change
        only with the accepted count or the leadership), then server_time_millis, the last field
        set, cached for the current millisecond: together the bytes SerializeToString gives."""
        datanode_id, n = stream.datanode_id, stream.n
        self._directory.observe(datanode_id, stream.peer_addr, stream.node_epoch)
        stream.owner = datanode_id
        messages, regions_counter = self._outcome_counters("accepted")
        messages.inc()
        regions_counter.inc(n)
        key = (datanode_id, stream.regions.size, stream.leader, self._leadership.leader_addr())
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

    def _answer(self, stream: _Stream, reason: str, outcome: str) -> bytes:
        """A rejection, counted under `outcome`."""
        messages, regions_counter = self._outcome_counters(outcome)
        messages.inc()
        regions_counter.inc(stream.n)
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

    async def _pairs(self, context: grpc.aio.ServicerContext, regions) -> tuple[DetectingRegion, ...]:
        if len(regions) > self._s.max_regions_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(regions)} regions in one request; the limit is {self._s.max_regions_per_request} "
                "(setting max_regions_per_request): split the request",
            )
        await self._require_leader(context)
        # Duplicates within a request are folded; order does not matter.
        return tuple(sorted({(r.datanode_id, r.region_id) for r in regions}))

    async def _require_leader(self, context: grpc.aio.ServicerContext) -> None:
        if not self._leadership.is_leader():
            leader = self._leadership.leader_addr()
            context.set_trailing_metadata(((LEADER_METADATA_KEY, leader),))
            where = f"the leader is {leader}" if leader else "no leader is known right now; retry shortly"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this replica is not the leader; {where}")
        if not self._supervisor.is_leader:
            # Elected, but the state is still loading: a write now would be lost to the recovery.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this replica is becoming leader and loading its state; retry shortly"
            )

    async def RegisterDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions)
        affected = await self._ask(context, lambda reply: Register(pairs, reply))
        return pb.RegisterDetectorsResponse(affected=affected)

    async def DeregisterDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions)
        affected = await self._ask(context, lambda reply: Deregister(pairs, reply))
        return pb.DeregisterDetectorsResponse(affected=affected)

    async def ResetDetectors(self, request, context):
        pairs = await self._pairs(context, request.regions)
        affected = await self._ask(context, lambda reply: Reset(pairs, reply))
        return pb.ResetDetectorsResponse(affected=affected)

    # ------------------------------------------------------------ dump

    async def Dump(self, request: pb.DumpRequest, context) -> AsyncIterator[pb.DumpResponse]:
        if request.at_millis < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at_millis must be >= 0, got {request.at_millis}")
        if request.page_size > self._s.max_dump_page_size:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size {request.page_size} is above the limit {self._s.max_dump_page_size} "
                "(setting max_dump_page_size)",
            )
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
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.datanode_ids)} datanode_ids in one request; the limit is "
                f"{self._s.max_regions_per_request} (setting max_regions_per_request)",
            )
        if request.ttl_millis and not request.enabled:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl_millis only applies when enabling")
        event = lambda reply: SetMaintenance(  # noqa: E731
            request.enabled, reply, tuple(sorted(set(request.datanode_ids))), int(request.ttl_millis)
        )
        state: MaintenanceSet = await self._ask(context, event)
        return self._maintenance_response(state.enabled, state.until_ms, dict(state.datanodes), True)

    async def GetMaintenanceMode(self, request, context):
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
        return self._maintenance_response(enabled, until, datanodes, leader)

    def _maintenance_response(
        self, enabled: bool, until: int, datanodes: dict[int, int], leader: bool
    ) -> pb.MaintenanceModeResponse:
        return pb.MaintenanceModeResponse(
            enabled=enabled,
            is_leader=leader,
            leader_addr=self._leadership.leader_addr(),
            expires_at_millis=until,
            datanodes=[pb.DatanodeMaintenance(datanode_id=d, expires_at_millis=u) for d, u in sorted(datanodes.items())],
        )

    async def GetFailoverHolds(self, request, context):
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
    """Stands in for the server to `add_RegionSupervisorServicer_to_server`: keeps its method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers come again below, by method name

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        if service != SERVICE_NAME:
            raise ValueError(f"unexpected service {service!r}")
        self.handlers.update(handlers)


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
    # The generated handlers, except SendHeartbeat: it takes and returns serialized messages.
    generated = _HandlerCapture()
    pb_grpc.add_RegionSupervisorServicer_to_server(servicer, generated)
    handlers = {**generated.handlers, "SendHeartbeat": grpc.stream_stream_rpc_method_handler(servicer.SendHeartbeat)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME), server)
    return server, health_servicer


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    log_event(log, logging.INFO, "health_changed", serving=serving)
