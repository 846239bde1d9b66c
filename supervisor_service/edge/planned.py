"""The planned operations' RPCs (docs/design.md §17): DrainDatanodes, GetDrain, CancelDrain,
SetTablePolicy, ListTablePolicies. Validated here, applied by the supervisor thread through its event
queue (`AdminCalls`' wait for the answer: a change is answered once it is durable)."""

from __future__ import annotations

import logging

import grpc

from supervisor_service.app.settings import Settings
from supervisor_service.cluster import Leadership
from supervisor_service.core import (
    CancelDrain,
    DrainRefused,
    DrainView,
    GetDrain,
    ListTablePolicies,
    SetTablePolicy,
    StartDrain,
    TablePolicy,
    log_event,
)
from supervisor_service.core.policy import MAX_TABLE_POLICIES, PolicyRefused
from supervisor_service.edge.admin import AdminCalls
from supervisor_service.edge.problems import InvalidRequests
from supervisor_service.proto import pb

log = logging.getLogger("supervisor_service.edge")

MAX_REASON_LEN = 1024  # the operator's words; a longer one is refused, not cut
MAX_DRAIN_ID_LEN = 200
MAX_DRAIN_DATANODES = 1000


def drain_status(view: DrainView, is_leader: bool) -> pb.DrainStatus:
    return pb.DrainStatus(
        drain_id=view.drain_id, datanode_ids=view.datanode_ids, regions_total=view.regions_total,
        regions_moved=view.regions_moved, regions_in_flight=view.regions_in_flight, state=view.state,
        started_at_millis=view.started_at_ms, finished_at_millis=view.finished_at_ms,
        regions_failed=view.regions_failed, failures=list(view.failures), regions_gone=view.regions_gone,
        reason=view.reason, regions_pending=view.regions_pending, is_leader=is_leader,
    )


def _policies(policies: tuple[TablePolicy, ...]) -> pb.TablePolicyResponse:
    return pb.TablePolicyResponse(policies=[
        pb.TablePolicy(table_id=p.table_id, failover_enabled=p.failover_enabled, priority=p.priority) for p in policies
    ])


class PlannedCalls:
    """Drains and table policies: only the leader answers (a follower names it)."""

    def __init__(self, admin: AdminCalls, settings: Settings, leadership: Leadership,
                 invalid_requests: InvalidRequests) -> None:
        self._admin = admin
        self._s = settings
        self._leadership = leadership
        self._invalid = invalid_requests.invalid

    async def _reason(self, context: grpc.aio.ServicerContext, method: str, reason: str) -> str:
        if len(reason) > MAX_REASON_LEN:
            await self._invalid(context, method, "too_long",
                                f"reason is {len(reason)} characters; the limit is {MAX_REASON_LEN}: say it shorter")
        return reason

    async def _drain_id(self, context: grpc.aio.ServicerContext, method: str, drain_id: str) -> str:
        if len(drain_id) > MAX_DRAIN_ID_LEN:
            await self._invalid(context, method, "too_long",
                                f"drain_id is {len(drain_id)} characters; ids are at most {MAX_DRAIN_ID_LEN}")
        return drain_id

    async def DrainDatanodes(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        method = "DrainDatanodes"
        ids = tuple(sorted(set(request.datanode_ids)))
        if not ids:
            await self._invalid(context, method, "empty", "datanode_ids is empty: name the datanodes to drain")
        if len(ids) > MAX_DRAIN_DATANODES:
            await self._invalid(context, method, "too_many",
                                f"{len(ids)} datanodes in one drain; the limit is {MAX_DRAIN_DATANODES}")
        reason = await self._reason(context, method, request.reason)
        await self._admin._require_leader(context)
        value = await self._admin._ask(context, lambda reply: StartDrain(ids, reason, reply))
        if isinstance(value, DrainRefused):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(value))
        assert isinstance(value, DrainView)
        log_event(log, logging.WARNING, "drain_requested", drain_id=value.drain_id, datanodes=list(ids),
                  regions=value.regions_total, reason=reason, peer=context.peer())
        return pb.DrainResponse(drain_id=value.drain_id)

    async def GetDrain(self, request: pb.GetDrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainStatus:
        drain_id = await self._drain_id(context, "GetDrain", request.drain_id)
        await self._admin._require_leader(context)
        view = await self._admin._ask(context, lambda reply: GetDrain(drain_id, reply))
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no drain {drain_id!r}" if drain_id else "no drain yet")
        return drain_status(view, True)

    async def CancelDrain(self, request: pb.GetDrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainStatus:
        drain_id = await self._drain_id(context, "CancelDrain", request.drain_id)
        reason = await self._reason(context, "CancelDrain", request.reason)
        if not drain_id:
            await self._invalid(context, "CancelDrain", "empty", "drain_id is empty: name the drain to cancel")
        await self._admin._require_leader(context)
        view = await self._admin._ask(context, lambda reply: CancelDrain(drain_id, reason, reply))
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no drain {drain_id!r}")
        log_event(log, logging.WARNING, "drain_cancel_requested", drain_id=drain_id, state=view.state,
                  moved=view.regions_moved, reason=reason, peer=context.peer())
        return drain_status(view, True)

    async def SetTablePolicy(self, request: pb.TablePolicyRequest, context) -> pb.TablePolicyResponse:
        method = "SetTablePolicy"
        ids = tuple(sorted(set(request.table_ids)))
        if not ids:
            await self._invalid(context, method, "empty", "table_ids is empty: name the tables")
        if len(ids) > MAX_TABLE_POLICIES:
            await self._invalid(context, method, "too_many",
                                f"{len(ids)} table_ids in one request; the limit is {MAX_TABLE_POLICIES}")
        reason = await self._reason(context, method, request.reason)
        await self._admin._require_leader(context)
        enabled = request.failover_enabled if request.HasField("failover_enabled") else None
        priority = request.priority if request.HasField("priority") else None
        if enabled is None and priority is None:
            await self._invalid(context, method, "empty",
                                "neither failover_enabled nor priority is set: say what to change")
        policies = await self._admin._ask(
            context, lambda reply: SetTablePolicy(ids, enabled, priority, reason, reply))
        if isinstance(policies, PolicyRefused):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(policies))
        log_event(log, logging.WARNING, "table_policy_requested", tables=len(ids), failover_enabled=enabled,
                  priority=priority, reason=reason, peer=context.peer())
        return _policies(policies)

    async def ListTablePolicies(self, request: pb.ListTablePoliciesRequest, context) -> pb.TablePolicyResponse:
        if len(request.table_ids) > self._s.max_regions_per_request:
            await self._invalid(context, "ListTablePolicies", "too_many",
                                f"{len(request.table_ids)} table_ids in one request; the limit is "
                                f"{self._s.max_regions_per_request} (setting max_regions_per_request)")
        ids = tuple(sorted(set(request.table_ids)))
        await self._admin._require_leader(context)
        policies = await self._admin._ask(context, lambda reply: ListTablePolicies(ids, reply))
        return _policies(policies)
