"""Synchronous clients of the RegionSupervisor service, for the CLI, tools, datanodes and tests.

Both take the list of replicas (comma-separated or a sequence) and follow
the leader: a follower answers FAILED_PRECONDITION with the leader's address
in trailing metadata (`x-supervisor-leader`), or a rejected heartbeat with
`leader_addr`; the client goes there and retries. A replica that answers
"not the leader" without naming one (it does not know who leads), names
itself, cannot be reached, or does not answer within the deadline is left
for the next replica in the list: a replica cut off from the others, or a
stopped process whose port still accepts connections, never holds a client.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from supervisor_service.core import DetectingRegion, log_event
from supervisor_service.proto import LEADER_METADATA_KEY, pb, pb_grpc
from supervisor_service.security.tls import ClientTLS, channel

log = logging.getLogger("supervisor_service.client")



def _addresses(addr: str | Sequence[str]) -> list[str]:
    """Replica addresses from "a,b,c" or a sequence (whose items may be lists too), in order, once each."""
    items = [addr] if isinstance(addr, str) else list(addr)
    out: list[str] = []
    for item in items:
        for a in item.split(","):
            if a.strip() and a.strip() not in out:
                out.append(a.strip())
    return out


def leader_hint(exc: grpc.RpcError) -> str:
    """The leader address a follower put in its FAILED_PRECONDITION, or ''."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return ""
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY:
            return value
    return ""


def _not_leader(exc: grpc.RpcError) -> bool:
    """A follower's refusal (as opposed to another FAILED_PRECONDITION, such as "guards are off")."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    if any(key == LEADER_METADATA_KEY for key, _ in exc.trailing_metadata() or ()):
        return True
    return "not the leader" in (exc.details() or "")


class SupervisorClient:
    """Admin client. `addr` may list several replicas (comma-separated or a sequence).

    Writes go to the leader: a follower's FAILED_PRECONDITION is followed to
    the leader it names, or, when it names none (or itself), to the next
    replica in the list. Every call has a deadline of `timeout` seconds per
    replica; with several replicas, one that cannot be reached or does not
    answer in time is skipped (the writes are idempotent, so a retry
    elsewhere is safe). Reads (Dump, maintenance status, holds) answer on any
    replica; given several, the client prefers the leader's answer and falls
    back to a follower's when no replica leads.
    """

    def __init__(
        self, addr: str | Sequence[str], *, token: str = "", timeout: float = 10.0, follow_leader: bool = True,
        tls: ClientTLS | None = None,
    ) -> None:
        self.addrs = _addresses(addr)
        self._tls = tls
        if not self.addrs:
            raise ValueError("no address given")
        self._timeout = timeout
        self._follow = follow_leader
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._unreachable: set[str] = set()
        self._connect(self.addrs[0])

    def _connect(self, addr: str) -> None:
        self.addr = addr
        self._channel = channel(addr, self._tls)
        self.stub = pb_grpc.RegionSupervisorStub(self._channel)

    def _switch(self, addr: str) -> None:
        self._channel.close()
        self._connect(addr)

    def _next_addr(self) -> str:
        """The replica after the current one in the list (the first, after an address that is not listed)."""
        if self.addr in self.addrs:
            return self.addrs[(self.addrs.index(self.addr) + 1) % len(self.addrs)]
        return self.addrs[0]

    def _call(self, fn: Callable[[], object]) -> object:
        """Run `fn` against the current replica, following leader hints and skipping replicas that
        do not lead, cannot be reached or do not answer within the deadline."""
        several = len(self.addrs) > 1
        attempts = max(10, 2 * len(self.addrs) + 1)
        silent = 0  # replicas in a row that could not be reached or did not answer
        self._unreachable: set[str] = set()  # ...by address, for _read
        for attempt in range(attempts):
            try:
                return fn()
            except grpc.RpcError as exc:
                if not self._follow or attempt == attempts - 1:
                    raise
                code, hint = exc.code(), leader_hint(exc)
                loading = code == grpc.StatusCode.UNAVAILABLE and "becoming leader" in (exc.details() or "")
                unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not loading
                silent = silent + 1 if unreachable else 0
                if unreachable:
                    self._unreachable.add(self.addr)
                if silent >= len(self.addrs):
                    raise  # none of them answers: say so now, not after `attempts` deadlines
                if _not_leader(exc):
                    if hint and hint != self.addr:
                        self._switch(hint)
                    elif several:
                        self._switch(self._next_addr())  # it does not know who leads: ask another
                    else:
                        time.sleep(0.5)  # the only replica named: an election is under way
                elif loading:
                    time.sleep(0.2)  # elected, loading its state
                elif unreachable and several:
                    self._switch(self._next_addr())
                else:
                    raise
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[], object], leads: Callable[[object], tuple[bool, str]]) -> object:
        """A read any replica answers: the leader's answer when one of the replicas leads (following
        the answer's leader address, else the list), otherwise the first answer."""
        first = self._call(fn)
        if not self._follow:
            return first
        is_leader, hint = leads(first)
        tried = {self.addr} | self._unreachable  # a follower may still name a leader that stopped answering
        answer = first
        while not is_leader and len(tried) < len(self.addrs) + 1:
            nxt = hint if hint and hint not in tried else next((a for a in self.addrs if a not in tried), "")
            if not nxt:
                break
            tried.add(nxt)
            self._switch(nxt)
            try:
                answer = fn()
            except grpc.RpcError:
                continue
            is_leader, hint = leads(answer)
        return answer if is_leader else first

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _kw(self) -> dict:
        return {"timeout": self._timeout, "metadata": self._metadata}

    @staticmethod
    def _regions(pairs: list[DetectingRegion]) -> list[pb.DetectingRegion]:
        return [pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs]

    def register(self, pairs: list[DetectingRegion], reason: str = "") -> int:
        request = pb.RegisterDetectorsRequest(regions=self._regions(pairs), reason=reason)
        return self._call(lambda: self.stub.RegisterDetectors(request, **self._kw()).affected)

    def deregister(self, pairs: list[DetectingRegion], reason: str = "") -> int:
        request = pb.DeregisterDetectorsRequest(regions=self._regions(pairs), reason=reason)
        return self._call(lambda: self.stub.DeregisterDetectors(request, **self._kw()).affected)

    def reset(self, pairs: list[DetectingRegion], reason: str = "") -> int:
        request = pb.ResetDetectorsRequest(regions=self._regions(pairs), reason=reason)
        return self._call(lambda: self.stub.ResetDetectors(request, **self._kw()).affected)

    def dump(
        self, *, datanode_ids: list[int] = (), only_failed: bool = False, at_millis: int = 0, page_size: int = 0
    ) -> tuple[pb.DumpResponse, list[pb.DetectorState]]:
        """(first page header, all rows)."""
        request = pb.DumpRequest(
            datanode_ids=list(datanode_ids), only_failed=only_failed, at_millis=at_millis, page_size=page_size
        )

        def read() -> tuple[pb.DumpResponse, list[pb.DetectorState]]:
            header, rows = None, []
            for page in self.stub.Dump(request, **self._kw()):
                header = header or page
                rows.extend(page.detectors)
            return header or pb.DumpResponse(), rows

        return self._read(read, lambda answer: (answer[0].is_leader, answer[0].leader_addr))

    def set_maintenance(self, enabled: bool, reason: str = "") -> bool:
        """The global switch; returns its new value."""
        return self.set_maintenance_scope(enabled, reason=reason).enabled

    def set_maintenance_scope(
        self, enabled: bool, datanode_ids: Sequence[int] = (), ttl_millis: int = 0, reason: str = ""
    ) -> pb.MaintenanceModeResponse:
        """Global (no datanodes) or per-datanode maintenance, optionally expiring after `ttl_millis`;
        `reason`: the caller's words in the audit trail."""
        request = pb.SetMaintenanceModeRequest(enabled=enabled, datanode_ids=list(datanode_ids), ttl_millis=ttl_millis,
                                               reason=reason)
        return self._call(lambda: self.stub.SetMaintenanceMode(request, **self._kw()))

    def holds(self) -> pb.FailoverHoldsResponse:
        return self._read(
            lambda: self.stub.GetFailoverHolds(pb.GetFailoverHoldsRequest(), **self._kw()),
            lambda answer: (answer.is_leader, ""),
        )

    def release_hold(self, reason: str = "") -> pb.FailoverHoldsResponse:
        request = pb.ReleaseFailoverHoldRequest(reason=reason)
        return self._call(lambda: self.stub.ReleaseFailoverHold(request, **self._kw()))

    def get_maintenance(self) -> bool:
        return self.maintenance_status().enabled

    def maintenance_status(self) -> pb.MaintenanceModeResponse:
        return self._read(
            lambda: self.stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), **self._kw()),
            lambda answer: (answer.is_leader, answer.leader_addr),
        )

    # Planned operations (DESIGN.md section 10)
    def drain(self, datanode_ids: Sequence[int], reason: str = "") -> str:
        request = pb.DrainRequest(datanode_ids=list(datanode_ids), reason=reason)
        return self._call(lambda: self.stub.DrainDatanodes(request, **self._kw()).drain_id)

    def get_drain(self, drain_id: str = "") -> pb.DrainStatus:
        return self._call(lambda: self.stub.GetDrain(pb.GetDrainRequest(drain_id=drain_id), **self._kw()))

    def cancel_drain(self, drain_id: str, reason: str = "") -> pb.DrainStatus:
        request = pb.GetDrainRequest(drain_id=drain_id, reason=reason)
        return self._call(lambda: self.stub.CancelDrain(request, **self._kw()))

    def set_table_policy(
        self, table_ids: Sequence[int], failover_enabled: bool | None = None, priority: int | None = None,
        reason: str = "",
    ) -> list[pb.TablePolicy]:
        """None leaves that part of each table's policy as it is."""
        request = pb.TablePolicyRequest(table_ids=list(table_ids), failover_enabled=failover_enabled,
                                        priority=priority, reason=reason)
        return list(self._call(lambda: self.stub.SetTablePolicy(request, **self._kw())).policies)

    def table_policies(self, table_ids: Sequence[int] = ()) -> list[pb.TablePolicy]:
        request = pb.ListTablePoliciesRequest(table_ids=list(table_ids))
        return list(self._call(lambda: self.stub.ListTablePolicies(request, **self._kw())).policies)

    def audit(self, *, since_millis: int = 0, identity: str = "", limit: int = 0) -> list[pb.AuditEntry]:
        """The audit trail, newest first (any replica answers: it is read from the store)."""
        request = pb.ListAuditRequest(since_millis=since_millis, identity=identity, limit=limit)
        return list(self._call(lambda: self.stub.ListAudit(request, **self._kw())).entries)

    def journal(self, limit: int = 100) -> tuple[bool, list[pb.JournalEntry]]:
        resp = self._call(lambda: self.stub.ListJournal(pb.ListJournalRequest(limit=limit), **self._kw()))
        return resp.embedded, list(resp.entries)

    def failovers(self, datanode_ids: Sequence[int] = (), region_ids: Sequence[int] = (), since_millis: int = 0,
                  limit: int = 100) -> list[pb.FailoverRecord]:
        """The failover history, newest first (ListFailovers; the leader answers)."""
        request = pb.ListFailoversRequest(datanode_ids=list(datanode_ids), region_ids=list(region_ids),
                                          since_millis=since_millis, limit=limit)
        return list(self._call(lambda: self.stub.ListFailovers(request, **self._kw())).failovers)

    def explain(self, datanode_id: int, region_id: int = 0, at_millis: int = 0) -> pb.ExplainResponse:
        request = pb.ExplainRequest(datanode_id=datanode_id, region_id=region_id, at_millis=at_millis)
        return self._call(lambda: self.stub.Explain(request, **self._kw()))

    def what_if(self, datanode_ids: Sequence[int]) -> pb.WhatIfResponse:
        request = pb.WhatIfRequest(datanode_ids=list(datanode_ids))
        return self._call(lambda: self.stub.WhatIf(request, **self._kw()))


_KINDS_KEPT = 32  # distinct rejection kinds counted; the rest count as "other"
_LOG_EVERY_S = 10.0  # one log line per kind and address per interval, with the count of the others


def reason_kind(reason: str) -> str:
    """A short, bounded key of a rejection or warning reason for counting: its first clause with
    the numbers taken out ("node_epoch N is older than N, ..." -> one key for every epoch)."""
    if reason.startswith("not the leader"):
        return "not_leader"
    if reason.startswith("becoming leader"):
        return "not_ready"
    clause = re.split(r"[:;,(]", reason, maxsplit=1)[0]
    return re.sub(r"\d+", "N", clause).strip()[:60] or "unspecified"


@dataclass(frozen=True)
class Rejection:
    """A heartbeat answer that refused the heartbeat, or accepted it with a warning."""

    addr: str
    """The replica that answered."""
    reason: str
    """The server's words."""
    kind: str
    """`reason_kind(reason)`: the key it is counted under."""
    at: float
    """time.monotonic() of the answer."""


class DatanodeHeartbeater:
    """One datanode's heartbeat stream that follows the leader among `addrs`.

    Sends `regions()` every `interval_s` on one SendHeartbeat stream and waits
    at most `answer_timeout_s` (default: three intervals, at least 2 s) for each
    answer. It moves to another replica when:

    - the answer is "not the leader": to the `leader_addr` it names, or, when
      it names none or itself, to the next address in the list;
    - no answer comes within `answer_timeout_s` (a stopped process, a
      blackholed link), or the stream breaks: to the next address.

    A replica that names a leader is believed until a whole round of the
    list has gone by without an accepted heartbeat; then the list is walked
    in order, with a pause of one interval between rounds.

    Every answer is passed to `on_response(addr, response)`. Refused
    heartbeats (and accepted ones carrying a warning in `reason`) are kept:
    `last_rejection`, `last_warning`, `rejections` and `warnings` (counts by
    `reason_kind`), logged at WARNING (once per kind per 10 s, with the count
    in between), and passed to `on_rejection(rejection, response)`, so a
    datanode knows when its heartbeats are refused. `errors` counts broken
    streams and unanswered heartbeats by cause.
    """

    def __init__(
        self,
        addrs: str | Sequence[str],
        datanode_id: int,
        regions: Callable[[], Sequence[int]],
        *,
        interval_s: float = 1.0,
        answer_timeout_s: float | None = None,
        peer_addr: str = "",
        node_epoch: int = 0,
        token: str = "",
        on_response: Callable[[str, pb.HeartbeatResponse], None] | None = None,
        on_rejection: Callable[[Rejection, pb.HeartbeatResponse], None] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.addrs = _addresses(addrs)
        self._tls = tls
        if not self.addrs:
            raise ValueError("no address given")
        self.datanode_id = datanode_id
        self._regions = regions
        self._interval = interval_s
        self.answer_timeout_s = answer_timeout_s if answer_timeout_s is not None else max(3 * interval_s, 2.0)
        self._peer_addr = peer_addr
        self._epoch = node_epoch
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._on_response = on_response
        self._on_rejection = on_rejection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.Future | None = None  # the open stream, cancelled by stop()
        self.addr = self.addrs[0]
        self.sent = 0
        self.accepted = 0
        self.last_response: pb.HeartbeatResponse | None = None
        self.last_accepted_at: float | None = None
        """time.monotonic() of the last accepted heartbeat."""
        self.last_rejection: Rejection | None = None
        self.last_warning: Rejection | None = None
        self.last_error = ""
        self.rejections: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.switches = 0
        """How many times the heartbeater moved to another replica."""
        self._misses = 0  # streams in a row that ended without an accepted heartbeat
        self._cursor = 0  # index in `addrs` of the last listed address tried
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # (what, kind) -> (last log time, not logged)

    def start(self) -> DatanodeHeartbeater:
        self._thread = threading.Thread(target=self._run, name=f"datanode-{self.datanode_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()  # wakes the wait for an answer
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def rejected(self) -> bool:
        """True while the last answer refused the heartbeat."""
        return self.last_response is not None and self.last_response.rejected

    def _requests(self, outbox: queue.Queue) -> object:
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                next_addr = self._stream_once(self.addr)
            except Exception as exc:  # noqa: BLE001 - a failing callback or regions() must not end the heartbeats
                self._error(self.addr, "client_error", repr(exc))
                next_addr = self.addr
                self._stop.wait(self._interval)
            if self._stop.is_set():
                return
            if next_addr != self.addr:
                self.switches += 1
            self.addr = next_addr
            # A whole round of the list without an accepted heartbeat: pause before the next.
            pause = self._interval if self._misses and self._misses % len(self.addrs) == 0 else 0.1
            self._stop.wait(min(pause, 5.0))

    def _next_addr(self, addr: str, hint: str = "") -> str:
        """The leader `hint`, unless hints have not led to an accepted heartbeat for a whole round;
        else the address after the last listed one tried (a hint may name an unlisted address)."""
        if hint and hint != addr and self._misses < len(self.addrs):
            return hint
        if addr in self.addrs:
            self._cursor = self.addrs.index(addr)
        return self.addrs[(self._cursor + 1) % len(self.addrs)]

    def _stream_once(self, addr: str) -> str:
        """Heartbeat on one stream until it breaks, stops answering or points elsewhere; returns
        where to go next."""
        outbox: queue.Queue = queue.Queue()
        inbox: queue.Queue = queue.Queue()
        stream_channel = channel(addr, self._tls)
        stub = pb_grpc.RegionSupervisorStub(stream_channel)
        call = self._call = stub.SendHeartbeat(self._requests(outbox), metadata=self._metadata)
        reader = threading.Thread(
            target=self._read_answers, args=(call, inbox), name=f"datanode-{self.datanode_id}-answers", daemon=True
        )
        reader.start()
        accepted = False
        try:
            while not self._stop.is_set():
                outbox.put(pb.HeartbeatRequest(
                    datanode_id=self.datanode_id,
                    timestamp_millis=int(time.time() * 1000),
                    region_ids=list(self._regions()),
                    peer_addr=self._peer_addr,
                    node_epoch=self._epoch,
                ))
                self.sent += 1
                try:
                    answer = inbox.get(timeout=self.answer_timeout_s)
                except queue.Empty:
                    self._error(addr, "no_answer", f"no answer within {self.answer_timeout_s:g} s")
                    return self._next_addr(addr)
                if isinstance(answer, BaseException):
                    if self._stop.is_set():
                        return addr
                    if isinstance(answer, grpc.RpcError):
                        self._error(addr, answer.code().name if answer.code() else "UNKNOWN", answer.details() or "")
                    else:
                        self._error(addr, "stream_ended", str(answer))
                    return self._next_addr(addr)
                self._observe(addr, answer)
                if not answer.rejected:
                    accepted = True
                    self._misses = 0
                elif not answer.is_leader:
                    hint = answer.leader_addr if answer.leader_addr != addr else ""
                    nxt = self._next_addr(addr, hint)
                    if nxt != addr:
                        return nxt
                    # The only replica, and it does not know who leads: wait for an election here.
                self._stop.wait(self._interval)
            return addr
        finally:
            if not accepted:
                self._misses += 1
            self._call = None
            outbox.put(None)
            call.cancel()
            stream_channel.close()

    @staticmethod
    def _read_answers(call, inbox: queue.Queue) -> None:
        """The stream's answers into `inbox`, then what ended it (a thread, so that waiting for an
        answer can time out)."""
        try:
            for response in call:
                inbox.put(response)
            inbox.put(EOFError("the replica ended the stream"))
        except grpc.RpcError as exc:
            inbox.put(exc)
        except Exception as exc:  # noqa: BLE001 - any end of the stream is reported, never lost
            inbox.put(exc)

    def _observe(self, addr: str, response: pb.HeartbeatResponse) -> None:
        self.last_response = response
        if self._on_response is not None:
            self._callback(self._on_response, addr, response)
        if not response.rejected:
            self.accepted += 1
            self.last_accepted_at = time.monotonic()
            if not response.reason:
                return
        kind = reason_kind(response.reason)
        note = Rejection(addr, response.reason, kind, time.monotonic())
        counts = self.warnings if not response.rejected else self.rejections
        if kind not in counts and len(counts) >= _KINDS_KEPT:
            kind = "other"
        counts[kind] += 1
        if response.rejected:
            self.last_rejection = note
        else:
            self.last_warning = note
        # Being sent to the leader is routine; anything else means this datanode's liveness may not count.
        if kind != "not_leader":
            self._log("heartbeat_rejected" if response.rejected else "heartbeat_warning", kind, addr=addr,
                      reason=response.reason)
        if self._on_rejection is not None:
            self._callback(self._on_rejection, note, response)

    def _callback(self, fn: Callable, *args: object) -> None:
        """A user's callback; its failure is logged, never the end of the heartbeats."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            self._error(self.addr, "callback_failed", repr(exc))

    def _error(self, addr: str, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.last_error = f"{addr}: {kind}: {detail}"
        self._log("heartbeat_stream_failed", kind, addr=addr, error=detail)

    def _log(self, event: str, kind: str, **fields: object) -> None:
        """One line per (event, kind) per _LOG_EVERY_S, saying how many were not logged in between."""
        now = time.monotonic()
        last, skipped = self._logged.get((event, kind), (None, 0))
        if last is not None and now - last < _LOG_EVERY_S:
            self._logged[(event, kind)] = (last, skipped + 1)
            return
        if len(self._logged) >= 4 * _KINDS_KEPT:
            self._logged.clear()
        self._logged[(event, kind)] = (now, 0)
        log_event(log, logging.WARNING, event, datanode_id=self.datanode_id, kind=kind, not_logged=skipped, **fields)
