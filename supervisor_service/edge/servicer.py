"""The one RegionSupervisor servicer object the generated code registers: it builds the heartbeat
streams and the admin calls and hands each RPC to the one that owns it (docs/design.md §9)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import Settings
from supervisor_service.cluster import Leadership
from supervisor_service.core import Clock, CoreStatus
from supervisor_service.edge.admin import AdminCalls
from supervisor_service.edge.audit import AuditTrail
from supervisor_service.edge.auth import CallerInterceptor, Gate
from supervisor_service.edge.heartbeat import HeartbeatStreams
from supervisor_service.edge.insight import InsightCalls
from supervisor_service.edge.planned import PlannedCalls
from supervisor_service.edge.problems import InvalidRequests, ProblemLog
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.remotes import DryRunJournal, PeerDirectory
from supervisor_service.runtime import EventQueue
from supervisor_service.store import StateStore


class RegionSupervisorServicer(pb_grpc.RegionSupervisorServicer):
    """SendHeartbeat goes to `heartbeats`, every other RPC to `admin`; both share one problem log
    (one line per problem per interval across the service) and one count of invalid requests.

    `status` gives the core's last published CoreStatus (e.g. `lambda: supervisor.status`): the
    edge reads the core's state only through it, never the supervisor's attributes."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: EventQueue,
        status: Callable[[], CoreStatus],
        clock: Clock,
        metrics: Metrics,
        directory: PeerDirectory,
        journal: DryRunJournal | None,
        leadership: Leadership,
        store: StateStore | None = None,
    ) -> None:
        log_problem = ProblemLog(clock)
        self.invalid_requests = InvalidRequests(metrics, log_problem)
        self.audit = AuditTrail(
            store=store, leadership=leadership, status=status, clock=clock, metrics=metrics,
            refusal_interval_ms=settings.audit_refusal_interval_ms, log_problem=log_problem,
        )
        self.callers = CallerInterceptor(Gate(settings, metrics), self.audit, self.invalid_requests.invalid)
        self.heartbeats = HeartbeatStreams(
            settings=settings, queue=queue, status=status, clock=clock, metrics=metrics,
            directory=directory, leadership=leadership, log_problem=log_problem,
        )
        self.heartbeats.callers = self.callers
        self.admin = AdminCalls(
            settings=settings, queue=queue, status=status, metrics=metrics, journal=journal,
            leadership=leadership, store=store, invalid_requests=self.invalid_requests, log_problem=log_problem,
        )
        self.planned = PlannedCalls(self.admin, settings, leadership, self.invalid_requests)
        self.insight = InsightCalls(settings=settings, ask=self.admin._ask, require_leader=self.admin._require_leader,
                                    invalid=self.invalid_requests.invalid, embedded_migration=journal is not None)

    def close_streams(self) -> None:
        """End every open heartbeat stream now (`HeartbeatStreams.close_streams`)."""
        self.heartbeats.close_streams()

    async def undecodable(self, context: grpc.aio.ServicerContext, method: str, type_name: str, exc: Exception) -> None:
        """A request of any service that does not parse (`InvalidRequests.undecodable`)."""
        await self.invalid_requests.undecodable(context, method, type_name, exc)

    # ------------------------------------------------------------ the RPCs

    async def SendHeartbeat(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.heartbeats.SendHeartbeat(request_iterator, context)

    async def RegisterDetectors(self, request, context):
        return await self.admin.RegisterDetectors(request, context)

    async def DeregisterDetectors(self, request, context):
        return await self.admin.DeregisterDetectors(request, context)

    async def ResetDetectors(self, request, context):
        return await self.admin.ResetDetectors(request, context)

    async def Dump(self, request: pb.DumpRequest, context) -> AsyncIterator[pb.DumpResponse]:
        async for page in self.admin.Dump(request, context):
            yield page

    async def SetMaintenanceMode(self, request, context):
        return await self.admin.SetMaintenanceMode(request, context)

    async def GetMaintenanceMode(self, request, context):
        return await self.admin.GetMaintenanceMode(request, context)

    async def GetFailoverHolds(self, request, context):
        return await self.admin.GetFailoverHolds(request, context)

    async def ReleaseFailoverHold(self, request, context):
        return await self.admin.ReleaseFailoverHold(request, context)

    async def ListAudit(self, request, context):
        return await self.audit.list(request, context)

    async def ListJournal(self, request, context):
        return await self.insight.ListJournal(request, context)

    # Planned operations (edge/planned.py)
    async def DrainDatanodes(self, request, context):
        return await self.planned.DrainDatanodes(request, context)

    async def GetDrain(self, request, context):
        return await self.planned.GetDrain(request, context)

    async def CancelDrain(self, request, context):
        return await self.planned.CancelDrain(request, context)

    async def SetTablePolicy(self, request, context):
        return await self.planned.SetTablePolicy(request, context)

    async def ListTablePolicies(self, request, context):
        return await self.planned.ListTablePolicies(request, context)

    # Operator insight (edge/insight.py)
    async def ListFailovers(self, request, context):
        return await self.insight.ListFailovers(request, context)

    async def Explain(self, request, context):
        return await self.insight.Explain(request, context)

    async def WhatIf(self, request, context):
        return await self.insight.WhatIf(request, context)
