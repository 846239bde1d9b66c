"""In-process fakes of the remote services the supervisor calls (the wire: docs/design.md §7).

Each fake is a real synchronous gRPC server (`grpc.server(ThreadPoolExecutor)`)
on 127.0.0.1 with a free port, so the supervisor reaches it through its
ordinary gRPC clients, deadlines and error handling included. Each exposes
`.endpoint` ("127.0.0.1:port") for the `*_endpoint` settings, records what
it received (with the arrival time on `time.monotonic()`), and `.stop()`.

Faults are injected per fake, for the next `times` calls (None: until
cleared with `clear_faults()`):

- `fail(code, times=..., details=...)`: answer with that gRPC status;
- `hang(seconds, times=..., after=False)`: sleep that long before answering
  normally (`stop()` wakes a hanging handler at once); with `after=True` the
  call is carried out first and only its answer is late (the client may have
  given up on a call that happened).

    with FakeRegionMigration() as rm:
        rm.fail(grpc.StatusCode.UNAVAILABLE, times=2)
        ... settings region_migration_endpoint=rm.endpoint ...
        assert len(rm.submissions) == 1

Proto classes come only from `supervisor_service.proto`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from supervisor_service.proto import pb, pb_grpc
from tests.support.waiting import wait_for

__all__ = [
    "Call",
    "FakePeerLookup",
    "FakeRegionMigration",
    "FakeSelector",
    "peer",
    "wait_for",  # re-exported: tests written before tests.support.waiting import it from here
]


def peer(peer_id: int, addr: str = "") -> pb.Peer:
    return pb.Peer(id=peer_id, addr=addr)


@dataclass
class Call:
    """One RPC received by a fake."""

    method: str
    request: Any
    at: float  # time.monotonic() at arrival
    outcome: str = "pending"  # "OK", the status code name it was answered with, or "CLIENT_GONE"
    response: Any = None
    done_at: float | None = None
    peer: str = ""  # the caller's address as gRPC saw it ("ipv4:127.0.0.1:54321")

    @property
    def ok(self) -> bool:
        return self.outcome == "OK"


@dataclass
class _Fault:
    kind: str  # "fail" | "hang"
    remaining: int | None  # None: until cleared
    code: grpc.StatusCode | None = None
    details: str = ""
    seconds: float = 0.0
    methods: frozenset[str] | None = None  # None: every method
    after: bool = False  # hang after carrying the call out, not before


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _FakeServer:
    """Common part: the server, call log, fault injection, stop."""

    service_name = ""

    def __init__(self, *, max_workers: int = 16, credentials: grpc.ServerCredentials | None = None) -> None:
        """`credentials`: serve TLS only (grpc.ssl_server_credentials), else plaintext."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._faults: list[_Fault] = []
        self.calls: list[Call] = []
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"fake-{self.service_name}")
        self._server = grpc.server(self._pool)
        self._register(self._server)
        port = (self._server.add_insecure_port("127.0.0.1:0") if credentials is None
                else self._server.add_secure_port("127.0.0.1:0", credentials))
        if port == 0:
            raise OSError("cannot bind a fake service on 127.0.0.1")
        self.endpoint = f"127.0.0.1:{port}"
        self._server.start()

    # ---------------------------------------------------------------- subclass hooks

    def _register(self, server: grpc.Server) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------- faults

    def fail(
        self, code: grpc.StatusCode, *, times: int | None = None, details: str = "injected fault",
        methods: Iterable[str] | None = None,
    ) -> None:
        """Answer the next `times` calls (None: all, until `clear_faults`) with status `code`."""
        with self._lock:
            self._faults.append(_Fault("fail", times, code=code, details=details,
                                       methods=frozenset(methods) if methods else None))

    def hang(
        self, seconds: float, *, times: int | None = None, methods: Iterable[str] | None = None, after: bool = False
    ) -> None:
        """Sleep `seconds` before answering the next `times` calls (None: all, until `clear_faults`);
        `after`: the call is carried out before the sleep (its answer is what is late)."""
        with self._lock:
            self._faults.append(_Fault("hang", times, seconds=seconds,
                                       methods=frozenset(methods) if methods else None, after=after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.methods is not None and method not in fault.methods:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # ---------------------------------------------------------------- call log

    def calls_of(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    @property
    def in_progress(self) -> int:
        """Calls received and not answered yet (e.g. hanging)."""
        with self._lock:
            return sum(1 for c in self.calls if c.done_at is None)

    def _serve(self, method: str, request, context: grpc.ServicerContext, answer: Callable[[Any], Any]):
        call = Call(method, request, time.monotonic(), peer=context.peer())
        with self._lock:
            self.calls.append(call)
        try:
            fault = self._take_fault(method)
            if fault is not None and fault.kind == "hang" and not fault.after:
                self._stopping.wait(fault.seconds)
            if fault is not None and fault.kind == "fail":
                raise _Aborted(fault.code, fault.details)
            response = answer(request)
            if fault is not None and fault.kind == "hang" and fault.after:
                self._stopping.wait(fault.seconds)
        except _Aborted as exc:
            call.outcome, call.done_at = exc.code.name, time.monotonic()
            context.abort(exc.code, exc.details)
        except Exception as exc:  # a bug in a test's callable: visible in the log and to the client
            call.outcome, call.done_at = "INTERNAL", time.monotonic()
            context.abort(grpc.StatusCode.INTERNAL, f"fake {self.service_name} raised {exc!r}")
        # A client that gave up (deadline, cancel) never saw the answer: not a success for it.
        outcome = "OK" if context.is_active() else "CLIENT_GONE"
        call.response, call.outcome, call.done_at = response, outcome, time.monotonic()
        return response

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(grace=None).wait(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- RegionMigration


class FakeRegionMigration(_FakeServer):
    """RegionMigration: records every submission, answers from `respond`, tracks procedures.

    - `respond(request) -> SubmitRegionMigrationResponse`: the answer per call;
      by default every region is `submitted` under a fresh procedure id
      "proc-1", "proc-2", ...
    - GetMigrationStatus answers `statuses[procedure_id]` (a dict a test may
      change at any time), else `default_state` (RUNNING).
    - A leader_term lower than the highest seen is refused with
      FAILED_PRECONDITION "stale leader term ..." (the refusal is recorded).
    - Idempotent on `request_id`, as the contract asks of the real service: a
      request_id answered before gets the same answer and starts nothing new
      (also when the first call's client gave up waiting: its migration
      exists). `migrations` lists what was really started, one per request_id.
    """

    service_name = "RegionMigration"

    def __init__(
        self,
        respond: Callable[[pb.SubmitRegionMigrationRequest], pb.SubmitRegionMigrationResponse] | None = None,
        *,
        statuses: Mapping[str, int] | None = None,
        default_state: int = pb.MIGRATION_STATE_RUNNING,
        **kwargs,
    ) -> None:
        self.respond = respond or self.submit_all
        self.statuses: dict[str, int] = dict(statuses or {})
        self.default_state = default_state
        self.highest_term = 0
        self._ids = itertools.count(1)
        self._idempotency = threading.Lock()
        self._by_request: dict[str, pb.SubmitRegionMigrationResponse] = {}
        self.migrations: list[tuple[str, pb.SubmitRegionMigrationRequest, pb.SubmitRegionMigrationResponse]] = []
        super().__init__(**kwargs)

    def _register(self, server: grpc.Server) -> None:
        fake = self

        class Servicer(pb_grpc.RegionMigrationServicer):
            def SubmitRegionMigration(self, request, context):
                return fake._serve("SubmitRegionMigration", request, context, fake._submit)

            def GetMigrationStatus(self, request, context):
                return fake._serve("GetMigrationStatus", request, context, fake._status)

        pb_grpc.add_RegionMigrationServicer_to_server(Servicer(), server)

    def next_procedure_id(self) -> str:
        return f"proc-{next(self._ids)}"

    def submit_all(self, request: pb.SubmitRegionMigrationRequest) -> pb.SubmitRegionMigrationResponse:
        """The default answer: every region submitted under a new procedure id."""
        return pb.SubmitRegionMigrationResponse(
            submitted=list(request.region_ids), procedure_id=self.next_procedure_id()
        )

    def _submit(self, request: pb.SubmitRegionMigrationRequest) -> pb.SubmitRegionMigrationResponse:
        with self._lock:
            if request.leader_term < self.highest_term:
                raise _Aborted(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"stale leader term {request.leader_term}: {self.highest_term} has been seen",
                )
            self.highest_term = request.leader_term
        with self._idempotency:
            if request.request_id and request.request_id in self._by_request:
                return self._by_request[request.request_id]
            response = self.respond(request)
            if request.request_id:
                self._by_request[request.request_id] = response
            self.migrations.append((request.request_id, request, response))
            return response

    def _status(self, request: pb.GetMigrationStatusRequest) -> pb.GetMigrationStatusResponse:
        with self._lock:
            state = self.statuses.get(request.procedure_id, self.default_state)
        return pb.GetMigrationStatusResponse(state=state, message=f"fake: {pb.MigrationState.Name(state)}")

    def set_status(self, procedure_id: str, state: int) -> None:
        with self._lock:
            self.statuses[procedure_id] = state

    @property
    def submissions(self) -> list[Call]:
        """SubmitRegionMigration calls answered OK, in arrival order."""
        return [c for c in self.calls_of("SubmitRegionMigration") if c.ok]

    @property
    def attempts(self) -> list[Call]:
        """Every SubmitRegionMigration received, whatever the answer."""
        return self.calls_of("SubmitRegionMigration")

    @property
    def status_polls(self) -> list[Call]:
        return self.calls_of("GetMigrationStatus")


# ---------------------------------------------------------------- Selector


class FakeSelector(_FakeServer):
    """Selector.Select, answered (first that applies):

    - `respond(request) -> SelectResponse`;
    - `peers`: exactly that list, whatever was asked;
    - round-robin over `candidates` minus `exclude_peer_ids`, `min_required_items`
      peers (duplicates allowed). With `per_call=True` every call gets one
      target for all its items (so one batch per failed datanode); otherwise
      the cursor moves per item, as the embedded selector does.
    """

    service_name = "Selector"

    def __init__(
        self,
        candidates: Sequence[pb.Peer] = (),
        *,
        peers: Sequence[pb.Peer] | None = None,
        respond: Callable[[pb.SelectRequest], pb.SelectResponse] | None = None,
        per_call: bool = False,
        **kwargs,
    ) -> None:
        self.candidates = list(candidates)
        self.peers = None if peers is None else list(peers)
        self.respond = respond
        self.per_call = per_call
        self._cursor = 0
        super().__init__(**kwargs)

    def _register(self, server: grpc.Server) -> None:
        fake = self

        class Servicer(pb_grpc.SelectorServicer):
            def Select(self, request, context):
                return fake._serve("Select", request, context, fake._select)

        pb_grpc.add_SelectorServicer_to_server(Servicer(), server)

    def _select(self, request: pb.SelectRequest) -> pb.SelectResponse:
        if self.respond is not None:
            return self.respond(request)
        if self.peers is not None:
            return pb.SelectResponse(peers=self.peers)
        excluded = set(request.exclude_peer_ids)
        eligible = [p for p in self.candidates if p.id not in excluded]
        if not eligible:
            return pb.SelectResponse()
        n = request.min_required_items
        with self._lock:
            start = self._cursor
            self._cursor += 1 if self.per_call else n
        if self.per_call:
            return pb.SelectResponse(peers=[eligible[start % len(eligible)]] * n)
        return pb.SelectResponse(peers=[eligible[(start + i) % len(eligible)] for i in range(n)])

    @property
    def requests(self) -> list[pb.SelectRequest]:
        return [c.request for c in self.calls_of("Select")]


# ---------------------------------------------------------------- PeerLookup


class FakePeerLookup(_FakeServer):
    """PeerLookup.GetDatanode from a dict datanode_id -> addr (a test may change it at any time)."""

    service_name = "PeerLookup"

    def __init__(self, addrs: Mapping[int, str] | None = None, **kwargs) -> None:
        self.addrs: dict[int, str] = dict(addrs or {})
        super().__init__(**kwargs)

    def _register(self, server: grpc.Server) -> None:
        fake = self

        class Servicer(pb_grpc.PeerLookupServicer):
            def GetDatanode(self, request, context):
                return fake._serve("GetDatanode", request, context, fake._lookup)

        pb_grpc.add_PeerLookupServicer_to_server(Servicer(), server)

    def _lookup(self, request: pb.GetDatanodeRequest) -> pb.GetDatanodeResponse:
        addr = self.addrs.get(request.datanode_id)
        if addr is None:
            return pb.GetDatanodeResponse(found=False)
        return pb.GetDatanodeResponse(found=True, peer=pb.Peer(id=request.datanode_id, addr=addr))

    @property
    def requests(self) -> list[pb.GetDatanodeRequest]:
        return [c.request for c in self.calls_of("GetDatanode")]
