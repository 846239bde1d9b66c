"""The admin calls of RegionSupervisor: Register/Deregister/Reset, Dump, maintenance, failover
holds (the journal: edge/insight.py); the leader checks they share, and the wait for their answer from the
supervisor thread (for a durable change: until it is committed, docs/design.md §6).

Handlers convert protobuf to domain values, validate, enqueue an event with a reply future and
convert the answer back. They never touch the detector table. Errors leave through
`context.abort(code, details)` with a message an operator can act on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

import grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import Settings, short_repr
from supervisor_service.cluster import Leadership
from supervisor_service.core import (
    CoreStatus,
    Deregister,
    DetectingRegion,
    Dump,
    DumpSnapshot,
    Event,
    MaintenanceSet,
    Register,
    ReleaseHold,
    Reset,
    SetMaintenance,
)
from supervisor_service.edge.dump import DEFAULT_DUMP_PAGE, dump_responses
from supervisor_service.edge.enqueue import Overloaded, when_room
from supervisor_service.edge.problems import InvalidRequests, ProblemLog
from supervisor_service.proto import LEADER_METADATA_KEY, MAX_MAINTENANCE_TTL_MS, pb
from supervisor_service.remotes import DryRunJournal
from supervisor_service.runtime import EventQueue, QueueClosed
from supervisor_service.store import FencedOut, StateStore, StoreError, StoreGone

# Calls answered only once their change is committed: while the store is failing they are told so.
_DURABLE_EVENTS = (Register, Deregister, Reset, SetMaintenance)
STORE_FAILING_GRACE_S = 0.5  # a store failing this long makes waiting writes answer UNAVAILABLE
STORE_POLL_S = 0.1
_LOADING = "this replica is becoming leader and loading its state; retry shortly"
_NOT_COMMITTED_HINT = "the change may not have been committed: retry (Register, Deregister and Reset are idempotent)"
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


class AdminCalls:
    """The unary and Dump RPCs of RegionSupervisor (SendHeartbeat is `HeartbeatStreams`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: EventQueue,
        status: Callable[[], CoreStatus],
        metrics: Metrics,
        journal: DryRunJournal | None,
        leadership: Leadership,
        store: StateStore | None,
        invalid_requests: InvalidRequests,
        log_problem: ProblemLog,
    ) -> None:
        self._s = settings
        self._queue = queue
        # The core's last published status: never its attributes, which its thread changes (docs/design.md §10).
        self._status = status
        self._metrics = metrics
        self._journal = journal
        self._leadership = leadership
        self._store = store
        self._invalid = invalid_requests.invalid
        self._log_problem = log_problem

    # ------------------------------------------------------------ the supervisor thread's answer

    async def _ask(self, context: grpc.aio.ServicerContext, make: Callable[[Future], Event]) -> object:
        """Enqueue an event with a reply future and wait for the supervisor thread's answer.

        A call whose answer waits for the state store is answered UNAVAILABLE as soon as the
        store has been failing for `STORE_FAILING_GRACE_S` (the writer keeps retrying the change
        in the background: it may still be committed), not after the 30 s bound."""
        reply: Future = Future()
        event = make(reply)
        if isinstance(event, _DURABLE_EVENTS) and self._store is not None and (full := self._store.backlogged()):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(full))  # turned away before the core applies it
        try:
            await when_room(self._queue, self._metrics, self._s.enqueue_timeout_ms, event, lambda: self._queue.offer(event))
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
            await asyncio.wait((waiter,), timeout=min(left, STORE_POLL_S) if store is not None else left)
            if store is not None and not waiter.done() and (error := store.unavailable(STORE_FAILING_GRACE_S)):
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
        if self._leadership.is_leader() and not self._status().is_leader:
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
        async for page in dump_responses(snapshot, at, request.only_failed, page_size, self._leadership.leader_addr):
            yield page

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
        status = self._status()
        enabled, until, datanodes = status.maintenance, status.maintenance_until_ms, dict(status.datanode_maintenance)
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
        # Every active hold, guards on or off: maintenance and warm-up hold failover either way.
        status = self._status()
        return pb.FailoverHoldsResponse(
            holds=list(status.holds),
            failed_datanode_fraction=status.failed_datanode_fraction,
            is_leader=self._leadership.is_leader(),
        )

    async def ReleaseFailoverHold(self, request, context):
        await self._require_leader(context)
        if not self._status().guards_enabled:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "guards are off (setting guards_enabled): nothing to release"
            )
        released = await self._ask(context, lambda reply: ReleaseHold(reply))
        status = self._status()  # published by the core before it resolved the reply (docs/design.md §10)
        return pb.FailoverHoldsResponse(
            holds=list(status.holds),
            failed_datanode_fraction=status.failed_datanode_fraction,
            released=bool(released),
            is_leader=True,
        )
