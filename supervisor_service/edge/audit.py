"""The audit trail at the edge: accepted state-changing calls and refused calls written through the
state store's write path under the leader's term, and ListAudit (docs/design.md §14.4).

Only the leader writes (its term fences the write, as every other write). A call accepted by the
leader is answered once its audit entry is committed too (or the commit failed: counted, logged;
the change itself is already committed and is not undone). A refused call is never waited for: its
entry is handed to the writer and the refusal answered at once, so a flood of refusals costs the
heartbeat path nothing; refusals of one identity, RPC and code are coalesced per interval. A
follower records no refusal: it counts (supervisor_calls_refused_total) and logs it, rate limited.
A follower forwarding them to the leader would let anyone who can reach a follower make the
leader write, for nothing the follower's own metrics and log do not already show.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future

import grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.cluster import Leadership
from supervisor_service.core import AuditAppend, AuditEntry, Clock, CoreStatus, log_event
from supervisor_service.edge.admin import STORE_FAILING_GRACE_S, STORE_POLL_S  # the admin calls' own bounds
from supervisor_service.edge.problems import ProblemLog
from supervisor_service.proto import pb
from supervisor_service.security.audit import MAX_REASON_CHARS, RefusalCoalescer, clip, refusal_summary, summarize
from supervisor_service.store import StateStore, StoreError

log = logging.getLogger("supervisor_service.server")

DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 10_000
MAX_IDENTITY_FILTER_CHARS = 253
MAX_IDENTITY_CHARS = 253  # a DNS name's length; a certificate may name a longer one, the trail keeps this much
_DURABLE_WAIT_S = 5.0
_ANSWER_MARGIN_S = 0.3  # the answer must leave this long before the caller's deadline


class AuditTrail:
    """Writes and reads the audit trail. Runs on the server's event loop (`refused` from any code
    on it); the store's writer thread commits."""

    def __init__(
        self,
        *,
        store: StateStore | None,
        leadership: Leadership,
        status: Callable[[], CoreStatus],
        clock: Clock,
        metrics: Metrics,
        refusal_interval_ms: int,
        log_problem: ProblemLog,
    ) -> None:
        self._store = store
        self._leadership = leadership
        self._status = status
        self._clock = clock
        self._metrics = metrics
        self._coalescer = RefusalCoalescer(refusal_interval_ms)
        self._interval = refusal_interval_ms
        self._next_sweep = 0
        self._log_problem = log_problem

    def _term(self) -> int | None:
        """The term to write under: this replica leads and has loaded its state (a write before the load
        would be encoded against the last term's view of the trail)."""
        if self._store is None or not self._leadership.is_leader() or not self._status().is_leader:
            return None
        return self._leadership.term

    def _submit(self, entry: AuditEntry, term: int) -> Future:
        done: Future = Future()

        def on_durable(exc: BaseException | None) -> None:
            if exc is None:
                self._metrics.audit_entries.labels(result="written").inc()
            else:
                self._metrics.audit_entries.labels(result="failed").inc()
                log_event(log, logging.ERROR, "audit_write_failed", rpc=entry.rpc, identity=entry.identity,
                          error=str(exc))
            done.set_result(exc)

        assert self._store is not None
        self._store.submit([AuditAppend(entry)], on_durable, term=term)
        return done

    # ------------------------------------------------------------ accepted calls

    async def accepted(self, context: grpc.aio.ServicerContext, identity: str, rpc: str, request: object) -> None:
        """Record an accepted state-changing call and wait (bounded) until the entry is committed."""
        term = self._term()
        if term is None:
            return  # the change was made under a term this replica no longer holds: it was fenced or lost
        entry = AuditEntry(
            at_millis=self._clock.now_ms(), identity=clip(identity, MAX_IDENTITY_CHARS), peer=clip(context.peer() or "", 128), rpc=rpc,
            summary=summarize(rpc, request), code="OK", reason=getattr(request, "reason", ""), leader_term=term,
        )
        done = asyncio.wrap_future(self._submit(entry, term))
        # The change itself is committed: wait for its entry while that can still help the caller, but
        # not past its deadline (a committed change must not answer DEADLINE_EXCEEDED) nor while the
        # store is failing (the writer keeps the entry and retries it).
        remaining = context.time_remaining()
        budget = _DURABLE_WAIT_S if remaining is None else min(_DURABLE_WAIT_S, remaining - _ANSWER_MARGIN_S)
        give_up = self._clock.monotonic() + budget
        while not done.done():
            failing = self._store.unavailable(STORE_FAILING_GRACE_S) if self._store is not None else ""
            left = give_up - self._clock.monotonic()
            if failing or left <= 0:
                log_event(log, logging.WARNING, "audit_write_pending", rpc=rpc, identity=identity,
                          why=f"the store is failing: {failing}" if failing else "the caller's deadline or the wait's bound",
                          hint="answered; the entry stays queued for the store and is written when it recovers")
                return
            await asyncio.wait({done}, timeout=min(STORE_POLL_S, left))

    @staticmethod
    def reason_problem(request: object) -> str:
        """Why the request's `reason` is refused ('' when it is fine)."""
        reason = getattr(request, "reason", "")
        if len(reason) > MAX_REASON_CHARS:
            return f"reason is {len(reason)} characters; at most {MAX_REASON_CHARS}"
        if any(c in reason for c in "\x00\r\n"):
            return "reason must be one line (no newline or NUL)"
        return ""

    # ------------------------------------------------------------ refused calls

    def refused(self, identity: str, peer: str, rpc: str, code: str, message: str) -> None:
        """A refused call (UNAUTHENTICATED, PERMISSION_DENIED, a heartbeat for another datanode):
        counted; recorded when this replica leads, at most once per key per interval. Never waits."""
        self._metrics.calls_refused.labels(method=rpc, code=code).inc()
        self._log_problem(("refused", identity, rpc, code), logging.WARNING, "call_refused",
                          identity=identity, peer=peer, rpc=rpc, code=code, detail=message)
        now = self._clock.now_ms()
        term = self._term()
        if term is None:
            self._metrics.audit_entries.labels(result="not_leader").inc()
            return
        due = self._coalescer.sweep(now) if now >= self._next_sweep else []
        if due:
            self._next_sweep = now + self._interval
        record = self._coalescer.note(identity, rpc, code, now)
        if record is None:
            self._metrics.audit_entries.labels(result="coalesced").inc()
        else:
            due.append(record)
        for c in due:
            summary = refusal_summary(message if c is record else "refused calls like it", c.suppressed, c.since_ms)
            entry = AuditEntry(now, clip(c.identity, MAX_IDENTITY_CHARS), clip(peer, 128) if c is record else "", c.rpc, summary, c.code, "",
                               term)
            self._submit(entry, term)

    # ------------------------------------------------------------ ListAudit

    async def list(self, request, context: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        if request.limit > MAX_AUDIT_LIMIT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"limit {request.limit} is above {MAX_AUDIT_LIMIT}; 0 means {DEFAULT_AUDIT_LIMIT}")
        if request.since_millis < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"since_millis must be >= 0, got {request.since_millis}")
        if len(request.identity) > MAX_IDENTITY_FILTER_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"identity is {len(request.identity)} characters; at most {MAX_IDENTITY_FILTER_CHARS}")
        if self._store is None:
            return pb.ListAuditResponse()
        try:
            entries = await asyncio.get_running_loop().run_in_executor(None, self._store.read_audit)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the audit trail from the state store: {exc} "
                                "(the whole trail is one read: a trail too large for one answer needs a lower "
                                "audit_capacity)")
        limit = request.limit or DEFAULT_AUDIT_LIMIT
        found = []
        for e in reversed(entries):  # newest first
            if e.at_millis < request.since_millis or (request.identity and e.identity != request.identity):
                continue
            found.append(pb.AuditEntry(at_millis=e.at_millis, identity=e.identity, peer=e.peer, rpc=e.rpc,
                                       summary=e.summary, code=e.code, reason=e.reason, leader_term=e.leader_term))
            if len(found) >= limit:
                break
        return pb.ListAuditResponse(entries=found)
