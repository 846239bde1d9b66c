"""Who calls, and may they: the caller's identity (a client certificate or a named bearer token) and
role checked once per call (once per stream for SendHeartbeat), health always open (docs/design.md §14).

The identity of a certificate is only in the handler's context (`context.auth_context()`): an
interceptor of grpc.aio sees the method and the metadata only. So the interceptor wraps the
method's handler, and the wrapper checks the caller before the method runs and leaves the `Caller`
in a context variable (`current_caller`) for the method: SendHeartbeat reads the datanode the caller
may speak for there, once per stream, and the admin calls the identity they audit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import grpc

from supervisor_service.app.metrics import Metrics
from supervisor_service.app.settings import Settings
from supervisor_service.edge.audit import AuditTrail
from supervisor_service.proto import pb
from supervisor_service.security.audit import STATE_CHANGING
from supervisor_service.security.identity import (
    ANONYMOUS,
    Tokens,
    WatchedFile,
    bearer_token,
    certificate_identity,
    load_tokens,
)
from supervisor_service.security.policy import (
    OPEN,
    OPEN_POLICY,
    Policy,
    datanode_of,
    load_policy,
    may_call,
    required_role,
)


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller of the current RPC: its identity, its role (None: no rule matched) and the datanode
    it may heartbeat as (None: any)."""

    identity: str
    role: str | None
    datanode_id: int | None
    token: str | None = None  # the bearer token it presented (None: its certificate, or anonymous)
    revision: int = 0  # Gate.revision when it was checked


_CALLER: ContextVar[Caller | None] = ContextVar("supervisor_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being served (None outside the interceptor's wrapper: tests that build
    the servicer without a server)."""
    return _CALLER.get()


class Gate:
    """The tokens and the policy in force (each re-read when its file changes), and the decision for one call."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        interval = settings.security_file_check_interval_ms / 1000
        legacy = settings.auth_token

        self.revision = 0  # one more at each change of the tokens or the policy in force

        def reloaded(kind: str) -> Callable[[bool], None]:
            def count(ok: bool) -> None:
                self.revision += ok
                metrics.security_file_reloads.labels(file=kind, result="ok" if ok else "rejected").inc()

            return count

        self._tokens: WatchedFile[Tokens] | None = None
        self._legacy = Tokens().with_legacy(legacy)
        if settings.auth_tokens_file:
            self._tokens = WatchedFile(settings.auth_tokens_file, lambda p: load_tokens(p).with_legacy(legacy),
                                       what="tokens", check_interval_s=interval, on_reload=reloaded("tokens"))
        self._policy: WatchedFile[Policy] | None = None
        if settings.authz_policy_file:
            self._policy = WatchedFile(settings.authz_policy_file, load_policy, what="policy",
                                       check_interval_s=interval, on_reload=reloaded("policy"))
        self.tokens_required = bool(settings.auth_tokens_file or legacy)

    def policy(self) -> Policy:
        return self._policy.current() if self._policy is not None else OPEN_POLICY

    def current_revision(self) -> int:
        """`revision`, once the files are checked for a change (at most every check interval)."""
        if self._tokens is not None:
            self._tokens.current()
        if self._policy is not None:
            self._policy.current()
        return self.revision

    def name_of(self, token: str) -> str | None:
        tokens = self._tokens.current() if self._tokens is not None else self._legacy
        return tokens.name_of(token) if token else None

    def identify(self, metadata, context: grpc.aio.ServicerContext) -> tuple[str | None, str]:
        """(identity, '') or (None, why the caller is not authenticated)."""
        token = bearer_token(metadata)
        if token is not None:
            name = self.name_of(token)
            if name is None:
                return None, ("the bearer token is not known: send 'authorization: Bearer <token>' with a token of "
                              "the tokens file (setting auth_tokens_file) or auth_token")
            return name, ""
        identity = certificate_identity(context.auth_context())
        if identity is not None:
            return identity, ""
        if self.tokens_required:
            return None, ("no credential: send 'authorization: Bearer <token>' (settings auth_tokens_file, "
                          "auth_token) or a client certificate")
        return ANONYMOUS, ""


_SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
SERVICE_NAME = _SERVICE.full_name


class Callers(Protocol):
    """What a heartbeat stream asks of the caller checks (`CallerInterceptor`)."""

    def refused(self, identity: str, peer: str, rpc: str, code: str, message: str) -> None: ...
    def revision(self) -> int: ...
    async def recheck(self, caller: Caller, context: grpc.aio.ServicerContext) -> Caller: ...


class _NoCallers:
    """No checks (a HeartbeatStreams built without the servicer, in tests)."""

    def refused(self, identity: str, peer: str, rpc: str, code: str, message: str) -> None:
        pass

    def revision(self) -> int:
        return 0

    async def recheck(self, caller: Caller, context: grpc.aio.ServicerContext) -> Caller:
        return caller


NO_CALLERS: Callers = _NoCallers()


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call but health; refusals are counted and audited by the
    trail's `refused`, accepted state-changing calls (security.audit.STATE_CHANGING) recorded by its
    `accepted`, whichever RPC they are: a state-changing RPC added to the service is audited as it lands."""

    def __init__(self, gate: Gate, audit: AuditTrail, invalid: Callable) -> None:
        self._gate = gate
        self._on_refused = audit.refused
        self._audit = audit
        self._invalid = invalid  # InvalidRequests.invalid: INVALID_ARGUMENT, counted

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method or "")
        needed = required_role(service, method)
        if needed == OPEN:
            return handler
        metadata = handler_call_details.invocation_metadata

        async def admit(context):
            await self._admit(context, metadata, method, needed)

        if method in STATE_CHANGING and handler.unary_unary is not None:
            return handler._replace(unary_unary=self._audited(handler.unary_unary, admit, service, method))
        return _guarded(handler, admit)

    def _audited(self, behavior, admit, service: str, method: str):
        """A state-changing unary call (bytes in): admitted, its `reason` checked, and recorded once accepted."""
        request_type = getattr(pb, _SERVICE.methods_by_name[method].input_type.name) if service == SERVICE_NAME else None

        async def call(raw: bytes, context):
            await admit(context)
            try:
                request = request_type.FromString(raw) if request_type is not None else None
            except Exception:  # noqa: BLE001 - the method's own parse answers INVALID_ARGUMENT
                request = None
            if request is not None and (problem := self._audit.reason_problem(request)):
                await self._invalid(context, method, "out_of_range", problem)
            response = await behavior(raw, context)
            if request is not None:
                caller = current_caller()
                await self._audit.accepted(context, caller.identity if caller else "", method, request)
            return response

        return call

    async def _admit(self, context: grpc.aio.ServicerContext, metadata, method: str, needed: str | None) -> None:
        revision = self._gate.current_revision()
        identity, why = self._gate.identify(metadata, context)
        if identity is None:
            await self._refuse(context, ANONYMOUS, method, grpc.StatusCode.UNAUTHENTICATED, why)
            return
        _CALLER.set(await self._authorize(context, identity, bearer_token(metadata), method, needed, revision))

    async def _authorize(self, context, identity: str, token: str | None, method: str, needed: str | None,
                         revision: int) -> Caller:
        policy = self._gate.policy()
        role = policy.role_of(identity)
        if not may_call(role, needed):
            wanted = f"role {needed} (or admin)" if needed not in (None, "admin") else "role admin"
            has = f"role {role}" if role else "no role"
            await self._refuse(
                context, identity, method, grpc.StatusCode.PERMISSION_DENIED,
                f"{identity!r} may not call {method}: it needs {wanted}, and the policy ({policy.source}) gives it "
                f"{has}",
            )
        bound = datanode_of(identity) if policy.bind_datanode_ids else None
        return Caller(identity, role, bound, token, revision)

    # ------------------------------------------------------------ open heartbeat streams

    def revision(self) -> int:
        """Per heartbeat message: has the tokens file or the policy changed since the stream's check?"""
        return self._gate.current_revision()

    async def recheck(self, caller: Caller, context: grpc.aio.ServicerContext) -> Caller:
        """The stream's caller checked again after a change of the tokens or the policy: a revoked
        token or a role that no longer allows SendHeartbeat ends the stream (audited)."""
        revision = self._gate.current_revision()
        if caller.token is not None and self._gate.name_of(caller.token) != caller.identity:
            await self._refuse(context, caller.identity, "SendHeartbeat", grpc.StatusCode.UNAUTHENTICATED,
                               "the token of this stream is no longer known (tokens file changed): the stream ends")
        return await self._authorize(context, caller.identity, caller.token, "SendHeartbeat", "datanode", revision)

    def refused(self, identity: str, peer: str, rpc: str, code: str, message: str) -> None:
        self._on_refused(identity, peer, rpc, code, message)

    async def _refuse(self, context, identity: str, method: str, code: grpc.StatusCode, message: str) -> None:
        self._on_refused(identity, context.peer() or "", method, code.name, message)
        await context.abort(code, message)


def _guarded(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """`handler` with `admit(context)` awaited before its behaviour, in the same task (so the
    behaviour sees the context variable `admit` set)."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            break
    if inspect.isasyncgenfunction(behavior):
        async def streaming(request, context):
            await admit(context)
            async for response in behavior(request, context):
                yield response

        return handler._replace(**{kind: streaming})

    async def call(request, context):
        await admit(context)
        return await behavior(request, context)

    return handler._replace(**{kind: call})
