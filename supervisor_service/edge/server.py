"""The gRPC server: a grpc.aio server with RegionSupervisor, health and reflection, each request
parsed inside its handler (bytes in), auth, message size and stream limits; `set_health`.

Handler capture relies on grpcio APIs newer than most: see `_HandlerCapture` and `_register`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from supervisor_service.app.settings import Settings
from supervisor_service.core import log_event
from supervisor_service.edge.auth import AuthInterceptor
from supervisor_service.edge.servicer import RegionSupervisorServicer
from supervisor_service.proto import pb, pb_grpc

log = logging.getLogger("supervisor_service.server")

_SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
SERVICE_NAME = _SERVICE.full_name
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
_HEALTH_NAME = _HEALTH.full_name
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


class _HandlerCapture:
    """Stands in for the server to a generated `add_*Servicer_to_server`: keeps its method handlers."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers come again below, by method name

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        if service != self.service:
            raise ValueError(f"unexpected service {service!r}")
        self.handlers.update(handlers)


class _HealthServicer(health.aio.HealthServicer):
    """grpc_health's asyncio servicer, with List: it inherits the generated one, which raises
    NotImplementedError (a traceback in the log per call)."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        )


def _bytes_in(
    handler: grpc.RpcMethodHandler, method: str, type_name: str, undecodable: Callable
) -> grpc.RpcMethodHandler:
    """`handler` registered bytes in: each request is parsed inside, so a message that does not
    parse is answered INVALID_ARGUMENT by `undecodable` (grpc would answer UNKNOWN and log a
    traceback per message from its own deserializer)."""
    parse, serialize = handler.request_deserializer, handler.response_serializer

    async def request_of(raw: bytes, context):
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a parser raises on garbage
            await undecodable(context, method, type_name, exc)

    def requests_of(raws, context):
        async def requests():
            async for raw in raws:
                yield await request_of(raw, context)

        return requests()

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(raw: bytes, context):
            return await behavior(await request_of(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        async def stream_in(raws, context):
            return await behavior(requests_of(raws, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_in, response_serializer=serialize)
    streaming_in = handler.stream_stream is not None
    behavior = handler.stream_stream if streaming_in else handler.unary_stream

    async def request_arg(raw, context):
        return requests_of(raw, context) if streaming_in else await request_of(raw, context)

    if inspect.isasyncgenfunction(behavior):
        async def streaming(raw, context):
            async for response in behavior(await request_arg(raw, context), context):
                yield response
    else:  # writes its answers with context.write
        async def streaming(raw, context):
            return await behavior(await request_arg(raw, context), context)

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(streaming, response_serializer=serialize)


def _register(server: grpc.aio.Server, service, handlers: dict[str, grpc.RpcMethodHandler], undecodable) -> None:
    """Register `handlers` of `service` (a descriptor), each that parses its requests bytes in."""
    wrapped = {
        name: handler if handler.request_deserializer is None
        else _bytes_in(handler, name, service.methods_by_name[name].input_type.name, undecodable)
        for name, handler in handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, wrapped),))
    server.add_registered_method_handlers(service.full_name, wrapped)


def build_server(servicer: RegionSupervisorServicer, settings: Settings) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server: one event loop serves every stream (thousands of datanodes)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams + 100),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # grpc sets SO_REUSEPORT by default on Linux: a second supervisor on the same port would
        # start and share the clients with the first. Without it the second fails to bind.
        ("grpc.so_reuseport", 0),
    ]
    interceptors = [AuthInterceptor(settings.auth_token)] if settings.auth_token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    # The generated handlers, bytes in; SendHeartbeat takes and returns serialized messages.
    generated = _HandlerCapture(SERVICE_NAME)
    pb_grpc.add_RegionSupervisorServicer_to_server(servicer, generated)
    handlers = {**generated.handlers, "SendHeartbeat": grpc.stream_stream_rpc_method_handler(servicer.SendHeartbeat)}
    _register(server, _SERVICE, handlers, servicer.undecodable)
    health_servicer = _HealthServicer()
    generated = _HandlerCapture(_HEALTH_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generated)
    _register(server, _HEALTH, generated.handlers, servicer.undecodable)
    generated = _HandlerCapture(reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME)), generated
    )
    _register(server, _REFLECTION, generated.handlers, servicer.undecodable)
    return server, health_servicer


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    log_event(log, logging.INFO, "health_changed", serving=serving)
