"""The operator-insight RPCs: ListFailovers, Explain, WhatIf (docs/design.md §18).

Each validates its request, asks the supervisor thread through the event queue (an `Inspect`
event: read only, nothing is stored) and converts the answer. The history and the table live
in the leader: a follower answers FAILED_PRECONDITION with the leader's address, as the other
admin calls do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Future

import grpc

from supervisor_service.app.settings import Settings
from supervisor_service.core import FailoverRecord, MigrationState
from supervisor_service.core.events import Event, Inspect
from supervisor_service.core.insight import DetectorView, ExplainQuery, Explanation, ListFailoversQuery, WhatIfQuery
from supervisor_service.core.whatif import MAX_WHATIF_DATANODES, WhatIfPlan
from supervisor_service.proto import pb
from supervisor_service.remotes import peer_to_pb

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
_INT64_MAX = 2**63 - 1
_TRIGGERS = {"failover": pb.TRIGGER_REASON_FAILOVER, "manual": pb.TRIGGER_REASON_MANUAL}

Ask = Callable[[grpc.aio.ServicerContext, Callable[[Future], Event]], Awaitable[object]]
Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]
Invalid = Callable[[grpc.aio.ServicerContext, str, str, str], Awaitable[None]]


def record_to_pb(rec: FailoverRecord) -> pb.FailoverRecord:
    return pb.FailoverRecord(
        failover_id=rec.failover_id,
        decided_at_millis=rec.decided_at_millis,
        leader_term=rec.leader_term,
        from_peer=peer_to_pb(rec.from_peer),
        to_peer=peer_to_pb(rec.to_peer),
        region_ids=rec.region_ids,
        timeout_millis=rec.timeout_ms,
        evidence=[pb.RegionEvidence(
            region_id=e.region_id, phi=e.phi, last_heartbeat_millis=e.last_heartbeat_millis,
            mean_interval_millis=e.mean_interval_millis, std_deviation_millis=e.std_deviation_millis,
            sample_count=e.sample_count, failover_count=e.failover_count, result=e.result,
        ) for e in rec.evidence],
        threshold=rec.threshold,
        acceptable_heartbeat_pause_millis=rec.acceptable_heartbeat_pause_ms,
        checks=rec.checks,
        procedure_id=rec.procedure_id,
        result=rec.result,
        final_state=rec.final_state.value if isinstance(rec.final_state, MigrationState) else 0,
        finished_at_millis=rec.finished_at_millis,
        trigger_reason=_TRIGGERS.get(rec.trigger_reason, pb.TRIGGER_REASON_UNSPECIFIED),
    )


def _row(v: DetectorView) -> pb.DetectorState:
    return pb.DetectorState(
        datanode_id=v.datanode_id, region_id=v.region_id, last_heartbeat_millis=v.last_heartbeat_millis,
        phi=v.phi, available=v.available, sample_count=v.sample_count, mean_interval_millis=v.mean_interval_millis,
        std_deviation_millis=v.std_deviation_millis, failover_count=v.failover_count, migrating=v.migrating,
        predicted_failure_millis=min(v.predicted_failure_millis, _INT64_MAX),
    )


class InsightCalls:
    """ListFailovers, Explain and WhatIf; `ask`, `require_leader` and `invalid` are the admin calls' own."""

    def __init__(self, *, settings: Settings, ask: Ask, require_leader: Check, invalid: Invalid,
                 embedded_migration: bool = False) -> None:
        self._s = settings
        self._ask = ask
        self._embedded = embedded_migration
        self._require_leader = require_leader
        self._invalid = invalid

    async def _bounded(self, context, method: str, field: str, values) -> None:  # type: ignore[no-untyped-def]
        limit = self._s.max_regions_per_request
        if len(values) > limit:
            await self._invalid(context, method, "too_many",
                                f"{len(values)} {field} in one request; the limit is {limit} "
                                "(setting max_regions_per_request)")

    async def ListFailovers(self, request: pb.ListFailoversRequest, context) -> pb.ListFailoversResponse:
        await self._bounded(context, "ListFailovers", "datanode_ids", request.datanode_ids)
        await self._bounded(context, "ListFailovers", "region_ids", request.region_ids)
        if request.since_millis < 0:
            await self._invalid(context, "ListFailovers", "out_of_range",
                                f"since_millis must be >= 0 (0: any time), got {request.since_millis}")
        if request.limit > MAX_LIST_LIMIT:
            await self._invalid(context, "ListFailovers", "out_of_range",
                                f"limit {request.limit} is above {MAX_LIST_LIMIT}; use since_millis to page back")
        await self._require_leader(context)
        query = ListFailoversQuery(tuple(request.datanode_ids), tuple(request.region_ids), request.since_millis,
                                   request.limit or DEFAULT_LIST_LIMIT)
        records: list[FailoverRecord] = await self._ask(context, lambda reply: Inspect(query, reply))  # type: ignore[assignment]
        return pb.ListFailoversResponse(failovers=[record_to_pb(r) for r in records])

    async def ListJournal(self, request: pb.ListJournalRequest, context) -> pb.ListJournalResponse:
        """The earlier releases' view of the embedded dry run's decisions: the failover history, as
        JournalEntry rows (one record type; the journal keys hold only the dry run's request ids). As
        before, only what the dry run took: a record is made at the decision, before its submission
        leaves, and joins this view once the dry run answered it with a procedure."""
        if not self._embedded:
            return pb.ListJournalResponse(embedded=False)
        query = ListFailoversQuery(limit=request.limit or DEFAULT_LIST_LIMIT)
        records: list[FailoverRecord] = await self._ask(context, lambda reply: Inspect(query, reply))  # type: ignore[assignment]
        return pb.ListJournalResponse(embedded=True, entries=[pb.JournalEntry(
            at_millis=r.decided_at_millis, region_ids=r.region_ids, from_peer=peer_to_pb(r.from_peer),
            to_peer=peer_to_pb(r.to_peer), timeout_millis=r.timeout_ms,
            trigger_reason=_TRIGGERS.get(r.trigger_reason, pb.TRIGGER_REASON_UNSPECIFIED),
            procedure_id=r.procedure_id, leader_term=r.leader_term,
        ) for r in records if r.procedure_id])

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        if request.at_millis < 0:
            await self._invalid(context, "Explain", "out_of_range", f"at_millis must be >= 0 (0: now), got {request.at_millis}")
        await self._require_leader(context)
        query = ExplainQuery(request.datanode_id, request.region_id, request.at_millis)
        ex: Explanation = await self._ask(context, lambda reply: Inspect(query, reply))  # type: ignore[assignment]
        if not ex.found:
            what = f"region {request.region_id} of datanode {request.datanode_id}" if request.region_id else \
                f"datanode {request.datanode_id}"
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no detector for {what}: it never heartbeat here, or was deregistered or failed over "
                                "(see `supervisor-service history`)")
        return pb.ExplainResponse(
            detectors=[_row(v) for v in ex.detectors], verdict=ex.verdict, holds=ex.holds,
            failovers=[record_to_pb(r) for r in ex.failovers],
            predicted_failure_millis=min(ex.predicted_failure_millis, _INT64_MAX),
        )

    async def WhatIf(self, request: pb.WhatIfRequest, context) -> pb.WhatIfResponse:
        if not request.datanode_ids:
            await self._invalid(context, "WhatIf", "empty", "name at least one datanode in datanode_ids")
        await self._bounded(context, "WhatIf", "datanode_ids", request.datanode_ids)
        ids = tuple(sorted(set(request.datanode_ids)))
        if len(ids) > MAX_WHATIF_DATANODES:
            await self._invalid(context, "WhatIf", "too_many", f"{len(ids)} datanodes in one WhatIf; the limit is {MAX_WHATIF_DATANODES}: ask about fewer")
        await self._require_leader(context)
        plan: WhatIfPlan = await self._ask(context, lambda reply: Inspect(WhatIfQuery(ids), reply))  # type: ignore[assignment]
        return pb.WhatIfResponse(
            held_by=plan.held_by,
            plans=[pb.PlannedFailover(datanode_id=p.datanode_id, regions=p.regions,
                                      predicted_failure_millis=min(p.predicted_failure_millis, _INT64_MAX),
                                      earliest_submit_millis=min(p.earliest_submit_millis, _INT64_MAX))
                   for p in plan.plans],
            all_submitted_by_millis=min(plan.all_submitted_by_millis, _INT64_MAX),
            summary=plan.summary,
        )
