"""Bearer-token auth for every RPC except the health checks (setting auth_token)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

_HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


async def _abort_unauthenticated(context) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong token: send metadata 'authorization: Bearer <token>' (setting auth_token)",
    )


async def _deny_unary(request, context):
    await _abort_unauthenticated(context)


async def _deny_streaming(request_or_iterator, context):
    await _abort_unauthenticated(context)
    yield  # pragma: no cover - makes this an async generator


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks (probes carry no token)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler is None or method.startswith(f"/{_HEALTH_NAME}/") or metadata.get("authorization") == self._expected:
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_streaming)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny_streaming)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny_unary)
        return grpc.unary_unary_rpc_method_handler(_deny_unary)
