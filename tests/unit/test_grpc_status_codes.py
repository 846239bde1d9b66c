"""How the gRPC metrics interceptor names the status a call ended with, case by case (`_code_of`)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from supervisor_service.edge.grpc_metrics import GO_CODE_NAMES, _code_of


class _Context:
    def __init__(self, code=None, remaining=None, cancelled=False) -> None:
        self._code, self._remaining, self._cancelled = code, remaining, cancelled

    def code(self):
        return self._code

    def time_remaining(self):
        return self._remaining

    def cancelled(self):
        return self._cancelled


S = grpc.StatusCode


@pytest.mark.parametrize("context, exc, expected", [
    (_Context(), None, S.OK),
    (_Context(code=S.INVALID_ARGUMENT), None, S.INVALID_ARGUMENT),  # set_code and return
    (_Context(code=S.UNAVAILABLE), grpc.aio.AbortError("aborted"), S.UNAVAILABLE),
    # A write racing the stream's abort fails after the status went out: the status stands.
    (_Context(code=S.UNAVAILABLE), RuntimeError("Failed grpc_call_start_batch"), S.UNAVAILABLE),
    (_Context(), ValueError("a bug"), S.UNKNOWN),
    (_Context(code=0), ValueError("not a StatusCode"), S.UNKNOWN),
    (_Context(), asyncio.CancelledError(), S.CANCELLED),
    (_Context(remaining=0.0), asyncio.CancelledError(), S.DEADLINE_EXCEEDED),
    (_Context(remaining=-3.0), None, S.DEADLINE_EXCEEDED),  # returned after the deadline
    (_Context(remaining=5.0, cancelled=True), None, S.CANCELLED),  # the client's cancel seen as the end
    (_Context(remaining=5.0), None, S.OK),
])
def test_the_code_a_call_ended_with(context, exc, expected):
    assert _code_of(context, exc) == expected


def test_every_status_code_has_grpc_go_s_name():
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert GO_CODE_NAMES[S.CANCELLED] == "Canceled" and GO_CODE_NAMES[S.INVALID_ARGUMENT] == "InvalidArgument"
    assert len(set(GO_CODE_NAMES.values())) == len(GO_CODE_NAMES)
