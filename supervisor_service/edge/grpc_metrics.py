"""The gRPC server metrics interceptor: every call of a registered method counted when it starts and
when it ends (by status code, in go-grpc-prometheus's code names), timed, and its stream messages
counted (docs/design.md §15; the families are `GrpcServerMetrics` in `app/metrics.py`).

It must be the first interceptor of the server: grpc.aio runs them in order, each wrapping what the
next returns, so the first one sees the handler another interceptor substitutes to refuse a call
(UNAUTHENTICATED, PERMISSION_DENIED) and counts that refusal too. Placed after them, refused calls
would not exist in `grpc_server_handled_total` and an error-ratio alert would miss an attack or a
misconfigured client.

Unknown methods (a caller's choice of name) get no series: their number would be the caller's to
choose. grpc answers them UNIMPLEMENTED before any handler runs, as grpc-go does before its
interceptors.

Cost on the heartbeat stream: one more coroutine frame per `context.read()` and `context.write()`
and an addition to a plain number each (`_LoopCounter`); nothing per message beyond that.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from supervisor_service.app.metrics import GRPC_TYPES, GrpcServerMetrics

# grpc-go's `codes.Code.String()`: the label values the usual gRPC alerts match on.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_MAX_CACHED_METHODS = 1024  # registered methods only reach the cache; a bound all the same


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with. A code the handler aborted with or set stands, whatever it
    raised afterwards (a write racing the abort of its stream fails once the status is sent);
    DEADLINE_EXCEEDED once the deadline has passed (the client has that answer, whatever the handler
    did); CANCELLED for a call the client cancelled (its handler may just see the end of the stream)
    or a handler cancelled; UNKNOWN for any other exception, as grpc answers it."""
    code = context.code()
    decided = code if isinstance(code, grpc.StatusCode) else None
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        return decided or grpc.StatusCode.UNKNOWN
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if exc is not None or context.cancelled():
        return grpc.StatusCode.CANCELLED
    return decided or grpc.StatusCode.OK


class _Series:
    """The label children of one method, looked up once (a `labels()` call costs microseconds)."""

    __slots__ = ("started", "received", "sent", "seconds", "_handled", "_labels", "_metrics")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics, self._labels = metrics, labels
        self.started = metrics.started.labels(*labels)
        self.received = metrics.msg_received.labels(*labels)
        self.sent = metrics.msg_sent.labels(*labels)
        self.seconds = metrics.handling_seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, object] = {}

    def begin(self, context: grpc.aio.ServicerContext) -> list[BaseException | None]:
        """Count a call's start; its end is counted when grpc reports the call done (only then does
        the context know that the client cancelled it). The handler puts what it raised in the box."""
        self.started.value += 1
        begun, box = time.perf_counter(), [None]
        context.add_done_callback(lambda done: self._finish(begun, done, box[0]))
        return box

    def _finish(self, begun: float, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        code = _code_of(context, exc)
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.handled.labels(*self._labels, GO_CODE_NAMES[code])
        child.value += 1  # type: ignore[attr-defined]
        self.seconds.observe(time.perf_counter() - begun)


class _CountingContext:
    """The call's context, with `read` and `write` counting the messages they carry; everything else
    is the context's own. Only for streaming calls (the heartbeat stream reads and writes this way)."""

    def __init__(self, context: grpc.aio.ServicerContext, series: _Series) -> None:
        self._context = context
        inner_read, inner_write, eof = context.read, context.write, grpc.aio.EOF
        received, sent = series.received, series.sent

        async def read():
            message = await inner_read()
            if message is not eof:
                received.value += 1
            return message

        async def write(message) -> None:
            await inner_write(message)
            sent.value += 1

        self.read, self.write = read, write

    def __getattr__(self, name: str):
        return getattr(self._context, name)


async def _counted(requests: AsyncIterator, series: _Series) -> AsyncIterator:
    async for request in requests:
        series.received.value += 1
        yield request


async def _finished(series: _Series, context, answer: Awaitable, *, one_sent: bool):
    """Await a handler's `answer` as one counted and timed call (`one_sent`: its result is a message)."""
    box = series.begin(context)
    try:
        result = await answer
    except BaseException as exc:
        box[0] = exc
        raise
    if one_sent:
        series.sent.value += 1
    return result


def _wrap(handler: grpc.RpcMethodHandler, series: _Series) -> grpc.RpcMethodHandler:
    """`handler` with its calls counted and timed by `series`."""
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if not streaming_in and not streaming_out:
        behavior = handler.unary_unary

        async def unary(request, context):
            series.received.value += 1
            return await _finished(series, context, behavior(request, context), one_sent=True)

        return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)
    if streaming_in and not streaming_out:
        behavior = handler.stream_unary

        async def stream_in(requests, context):
            answer = behavior(_counted(requests, series), _CountingContext(context, series))
            return await _finished(series, context, answer, one_sent=True)

        return grpc.stream_unary_rpc_method_handler(stream_in, deserialize, serialize)
    behavior = handler.stream_stream if streaming_in else handler.unary_stream

    def arguments(request, context):
        if streaming_in:
            return _counted(request, series), _CountingContext(context, series)
        series.received.value += 1
        return request, _CountingContext(context, series)

    if inspect.isasyncgenfunction(behavior):  # yields its answers
        async def streaming(request, context):
            box = series.begin(context)
            try:
                async for response in behavior(*arguments(request, context)):
                    series.sent.value += 1
                    yield response
            except BaseException as exc:
                box[0] = exc
                raise
    else:  # writes its answers with context.write (counted by _CountingContext)
        async def streaming(request, context):
            return await _finished(series, context, behavior(*arguments(request, context)), one_sent=False)

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(streaming, deserialize, serialize)


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call of a method the server has; the first interceptor of the server."""

    def __init__(self, metrics: GrpcServerMetrics, services: Iterable = ()) -> None:
        """`services`: the descriptors of the server's services, whose every method starts at zero
        (`GrpcServerMetrics.initialize`)."""
        self._metrics = metrics
        self._series: dict[str, _Series] = {}
        # method -> (the handler last wrapped, its wrapper): a registered method's handler is the
        # same object call after call, so it is wrapped once; a refusal's handler is wrapped per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        for service in services:
            for method in service.methods:
                kind = GRPC_TYPES[(method.client_streaming, method.server_streaming)]
                metrics.initialize(kind, service.full_name, method.name)

    async def intercept_service(self, continuation: Callable, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        series = self._series.get(method)
        if series is None:
            service, _, name = method.lstrip("/").rpartition("/")
            kind = GRPC_TYPES[(handler.request_streaming, handler.response_streaming)]
            series = _Series(self._metrics, (kind, service, name))
            if len(self._series) < _MAX_CACHED_METHODS:
                self._series[method] = series
        wrapped = _wrap(handler, series)
        if len(self._wrapped) < _MAX_CACHED_METHODS or method in self._wrapped:
            self._wrapped[method] = (handler, wrapped)
        return wrapped
