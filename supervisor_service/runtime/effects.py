"""The effect runner: the core's remote calls, each answered by exactly one result event (docs/design.md §3.2).

`EffectRunner.start` hands an effect to a small pool of failover workers;
`EffectRunner.run` makes the same call on the calling thread (the simulation
of `evaluate` and tests use it). Either way the call goes to `Remotes` (each
client has its own deadline) and its outcome comes back through `report` as
the effect's result event:

| effect | calls | answered with |
|---|---|---|
| `SelectPeers` | PeerLookup.GetDatanode, then Selector.Select | `SelectionDone` (`error_stage` names the failed call) |
| `SubmitMigration` | RegionMigration.SubmitRegionMigration | `SubmissionDone` (`error_kind`: see `submit_error_kind`) |
| `PollMigration` | RegionMigration.GetMigrationStatus | `StatusPolled` |

An effect whose state could not be made durable makes no call at all:
`not_durable` gives its result event instead (docs/design.md §6.4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import (
    SUBMIT_AMBIGUOUS,
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    Effect,
    Event,
    PollMigration,
    SelectionDone,
    SelectPeers,
    StatusPolled,
    SubmissionDone,
    SubmitMigration,
    log_event,
)
from supervisor_service.remotes import RemoteError, Remotes, StaleLeaderTerm

log = logging.getLogger("supervisor_service.runtime")

# Status codes after which a SubmitRegionMigration may still have been carried out: the deadline
# passed or the connection broke with the request possibly received, or the server failed midway.
# Any other code is the service's answer that it did not do it.
# RESOURCE_EXHAUSTED is among them (the client reports it itself for an answer larger than its
# receive limit, after the server acted), and so is ALREADY_EXISTS (an idempotent service's word
# for a request_id it has seen).
AMBIGUOUS_CODES = frozenset({
    "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "INTERNAL", "CANCELLED", "DATA_LOSS",
    "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
})


def submit_error_kind(exc: RemoteError) -> str:
    """What a failed SubmitRegionMigration says about the migration (events.SUBMIT_*)."""
    if isinstance(exc, StaleLeaderTerm):
        return SUBMIT_NOT_SENT  # refused for our term; the successor owns the decision
    return SUBMIT_AMBIGUOUS if exc.code in AMBIGUOUS_CODES else SUBMIT_REFUSED


def not_durable(effect: Effect, exc: BaseException) -> Event | None:
    """The result event of `effect` when the state changes that justify it could not be committed
    (fenced, or the store gave up): a submission or a selection must not leave. None for an effect
    that may run anyway (a status poll changes nothing)."""
    match effect:
        case SubmitMigration(task):
            return SubmissionDone(task, error=f"state not durable: {exc}", error_kind=SUBMIT_NOT_SENT)
        case SelectPeers(job):
            return SelectionDone(job, error=f"state not durable: {exc}", error_stage="store")
    return None


@dataclass(frozen=True, slots=True)
class _Refused:
    """RegionMigration refused a submission of `leader_term`: a newer term has been seen."""

    leader_term: int
    reason: str


class EffectRunner:
    """Runs effects against `remotes` and reports each one's result event through `report`.

    `leader_term` and `is_leader` are read just before a submission leaves: one decided under a
    term that no longer leads is not sent (docs/design.md §6.5). `on_fenced` is told when
    RegionMigration refuses the term this replica leads under now (another leader exists).
    """

    def __init__(
        self,
        remotes: Remotes,
        metrics: Metrics,
        report: Callable[[Event], None],
        *,
        leader_term: Callable[[], int],
        is_leader: Callable[[], bool] = lambda: True,
        on_fenced: Callable[[str], None] | None = None,
        workers: int = 4,
    ) -> None:
        self.remotes = remotes
        self.metrics = metrics
        self._report = report
        self._leader_term = leader_term
        self._is_leader = is_leader
        self._on_fenced = on_fenced
        # The pool starts its threads on first use: an inline-only runner (run) starts none.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="failover-worker")

    def start(self, effect: Effect) -> None:
        """Run `effect` on a failover worker (never blocks)."""
        try:
            self._pool.submit(self.run, effect)
        except RuntimeError:
            # Shutting down: the workers are gone. Nothing leaves; what was committed (an intent)
            # is resent by the next leadership.
            log_event(log, logging.WARNING, "effect_dropped_at_shutdown", effect=type(effect).__name__)

    def shutdown(self) -> None:
        """No more effects start; the calls under way end at their deadlines, their results unread."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self, effect: Effect) -> None:
        """Make the effect's call on this thread and report its result event.

        A refusal of the current term is passed to `on_fenced` after the result is reported, so
        that the result is queued ahead of whatever stepping down enqueues.
        """
        refused = None
        match effect:
            case SelectPeers():
                result = self._select(effect)
            case SubmitMigration():
                result, refused = self._submit(effect)
            case PollMigration():
                result = self._poll(effect)
        self._report(result)
        # Only a refusal of the term this replica leads under now says another leader exists.
        if refused is not None and self._on_fenced is not None and refused.leader_term == self._leader_term():
            self._on_fenced(refused.reason)

    def _timed(self, service: str, method: str, call):
        started = time.perf_counter()
        try:
            return call()
        except RemoteError as exc:
            self.metrics.remote_errors.labels(service=service, method=method, code=exc.code).inc()
            raise
        except Exception as exc:  # an embedded service's bug counts as an error, not a dead worker
            self.metrics.remote_errors.labels(service=service, method=method, code="INTERNAL").inc()
            raise RemoteError(service, method, "INTERNAL", repr(exc)) from exc
        finally:
            self.metrics.remote_latency.labels(service=service, method=method).observe(
                time.perf_counter() - started
            )

    def _select(self, effect: SelectPeers) -> SelectionDone:
        job = effect.job
        try:
            from_peer = self._timed(
                "PeerLookup", "GetDatanode", lambda: self.remotes.peer_lookup.get_datanode(job.datanode_id)
            )
        except RemoteError as exc:
            return SelectionDone(job, error=str(exc), error_stage="peer_lookup")
        try:
            peers = self._timed(
                "Selector",
                "Select",
                lambda: self.remotes.selector.select(
                    len(job.region_ids), {job.datanode_id, *job.exclude_targets}, job.datanode_id, job.region_ids
                ),
            )
        except RemoteError as exc:
            return SelectionDone(job, error=str(exc), error_stage="select")
        return SelectionDone(job, from_peer=from_peer, peers=tuple(peers))

    def _submit(self, effect: SubmitMigration) -> tuple[SubmissionDone, _Refused | None]:
        """The result, and what RegionMigration said if it refused the decision's term."""
        task = effect.task
        if not self._is_leader() or task.leader_term != self._leader_term():
            # Leadership (of the decision's term) ended after the decision: nothing leaves without
            # its lease. A later leadership resends the committed intent under its own term.
            return SubmissionDone(task, error=f"the leadership of term {task.leader_term} ended; "
                                  "submission not sent", error_kind=SUBMIT_NOT_SENT), None
        try:
            result = self._timed(
                "RegionMigration", "SubmitRegionMigration", lambda: self.remotes.region_migration.submit(task)
            )
        except StaleLeaderTerm as exc:
            refused = _Refused(task.leader_term, str(exc))
            return SubmissionDone(task, error=str(exc), error_kind=submit_error_kind(exc)), refused
        except RemoteError as exc:
            return SubmissionDone(task, error=str(exc), error_kind=submit_error_kind(exc)), None
        return SubmissionDone(task, result=result), None

    def _poll(self, effect: PollMigration) -> StatusPolled:
        pid = effect.procedure_id
        try:
            state, message = self._timed(
                "RegionMigration", "GetMigrationStatus", lambda: self.remotes.region_migration.status(pid)
            )
        except RemoteError as exc:
            return StatusPolled(pid, error=str(exc))
        return StatusPolled(pid, state=state, message=message)
